"""What a person sees in the MLflow UI, in a real headless Chromium with a real-time wait for the
charts (scripts/check_ui.py): a training run logged as the pipeline logs it — the loss curves and the
probe, named by pipelines.tracking.names — shows the loss chart on the first screen of its "Model
metrics" tab, the frontier PNG of the sweep nested under it loads on that sweep's artifact page, and
the frontier-over-training plot loads from the run's own artifact page.

Needs Debian's chromium (``apt-get install chromium``; .ci/run installs it). Without it the test is
skipped — unless ``ELF_REQUIRE_BROWSER=1`` (CI), where a missing browser fails it."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from pipelines.sweeps.plot import FrontierSeries, plot_frontier, plot_over_training
from pipelines.sweeps.settings import Objective
from pipelines.tracking import names, runs
from pipelines.tracking.metrics import log_metrics
from pipelines.tracking.store import make_client

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.integration


def _check_ui():
    spec = importlib.util.spec_from_file_location("check_ui", ROOT / "scripts" / "check_ui.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def browser_available():
    if not Path("/usr/bin/chromium").exists() or shutil.which("chromium") is None:
        if os.environ.get("ELF_REQUIRE_BROWSER") == "1":
            pytest.fail("ELF_REQUIRE_BROWSER=1 but /usr/bin/chromium is missing (apt-get install chromium)")
        pytest.skip("no /usr/bin/chromium: apt-get install chromium to run the UI check")
    pytest.importorskip("playwright")


def test_loss_chart_first_and_the_frontier_png_under_the_training_run(browser_available, mlflow_uri, tmp_path):
    client = make_client(mlflow_uri)
    exp = runs.ensure_experiment("elf/local", client)
    train = runs.create_run(client, exp, "local-default", kind="training")
    for step in range(0, 31, 5):
        if step:
            log_metrics(client, train, names.step_metrics({"loss": 3.0 / step ** 0.3, "ce": 9.0 / step, "l2": 1.6,
                                                           "decode_acc": step / 40, "lr": 2e-3,
                                                           "grad_norm": 1.0}), step=step)
    for step in (0, 30):
        log_metrics(client, train, names.probe_metrics({"loss": 3.5 if step == 0 else 1.6,
                                                        "clean_decode_acc": step / 37}), step=step)
    over = plot_over_training([{"step": 10, "gen_ppl": 80.0, "entropy": 3.6}, {"step": 30, "gen_ppl": 40.0, "entropy": 3.3}],
                              tmp_path / "frontier_over_training.png", threshold=3.0)
    client.log_artifact(train, str(over), "eval")  # where the evaluator beside training puts it
    runs.finish_run(client, train, "FINISHED")
    sweep = runs.create_run(client, exp, "sweep", kind="frontier-sweep", parent_run_id=train)
    rows = [dict(status="FINISHED", sampler="sde", steps=8, gamma=g, sc_cfg=w, grid="uniform", gen_ppl=p, entropy=e,
                 pareto=f) for g, w, p, e, f in [(1.5, 3.0, 30.0, 3.4, True), (0.0, 1.0, 50.0, 3.9, True),
                                                  (1.0, 5.0, 60.0, 3.0, False)]]
    png = plot_frontier([FrontierSeries("local-default", rows)], tmp_path / "frontier.png",
                        [Objective("gen_ppl", "min"), Objective("entropy", "max")], threshold=3.0)
    client.log_artifact(sweep, str(png), "frontier")
    runs.finish_run(client, sweep, "FINISHED")

    report = _check_ui().run_checks(mlflow_uri, None, tmp_path / "shots")
    print(report)
    assert report["training_run"] == train
    metrics = report["metrics"]
    assert "curves/loss" in metrics["charts_on_first_screen"], metrics
    assert metrics["loss_chart_points"] == 6 and metrics["ok"]  # the whole curve, drawn
    assert report["frontier"]["ok"] and report["frontier"]["image_size"] == [1100, 715]
    assert report["over_training"]["ok"] and report["over_training"]["image_size"] == [880, 605]
    for shot in ("model-metrics.png", "frontier.png", "frontier_over_training.png"):
        assert (tmp_path / "shots" / shot).stat().st_size > 20_000
