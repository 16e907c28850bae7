"""``benchmarks/embedded_default.py`` reads its figures from what the training driver prints: the
summary of a real (tiny) MLflow run, printed by ``driver.print_summary``, parses into the numbers it
was given — so a change to the summary's wording cannot silently empty the benchmark's table."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import embedded_default  # noqa: E402

from pipelines.tracking import names, runs  # noqa: E402
from pipelines.tracking.metrics import log_metrics  # noqa: E402
from pipelines.tracking.store import make_client  # noqa: E402
from pipelines.training.driver import TrainOutcome, print_summary  # noqa: E402


def test_the_benchmark_parses_the_drivers_summary(mlflow_uri, capsys):
    client = make_client(mlflow_uri)
    exp = runs.ensure_experiment("elf/local", client)
    run_id = runs.create_run(client, exp, "local-default", kind="training")
    for step, loss, acc in ((0, 3.5429, 0.0), (300, 1.5916, 0.8198)):
        log_metrics(client, run_id, names.probe_metrics({"loss": loss, "clean_decode_acc": acc}), step=step)
    outcome = TrainOutcome("trained", run_id, exp, 300, None, 350.4, train_seconds=272.7,
                           evaluation={"evaluated": [100, 200, 300], "skipped": 0, "errors": 0}, handoff_s=(0.01,))
    print_summary(client, outcome, {}, mlflow_uri)
    text = capsys.readouterr().out
    parsed = embedded_default.parse(text)
    assert parsed == {"done_min": 5.8, "loss": 1.5916, "decode_acc": 0.8198, "train_loop_s": 272.7,
                      "evaluated_at": "[100, 200, 300]"}, text
    table = embedded_default.table([{"label": "x", "wall_s": 350.4, **parsed}])
    assert table.splitlines()[-1] == "| x | 350.4 s | 5.8 min | 272.7 s | 1.5916 | 0.8198 | [100, 200, 300] |"
