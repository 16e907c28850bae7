"""The training pipeline end to end on a real local Ray cluster with a real MLflow store.

One tiny, fast configuration (tiny ELF, MiniLM encoder, 16-token rows, 2 DDP workers over gloo).
A reference run trains 8 steps; runs that fail mid-way — a worker exception, a hard worker death —
must end at the same step with the same data order and the same loss curve as the reference.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from elf_core.config import load_config
from pipelines import checkpoints, train
from pipelines.infra.paths import DEFAULT_CONFIG, absolutise
from pipelines.training import driver
from conftest import FAST_TRAIN as FAST, FAST_TRAIN_STEPS as STEPS

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.integration


def _cfg(name: str, tmp: Path, uri: str, *extra: str):
    cfg = load_config(DEFAULT_CONFIG, FAST + [
        f"name={name}", f"tracking.uri={uri}", f"ray.storage_path={tmp / 'ray'}",
        f"train.output_dir={tmp / 'out'}", f"data.cache_dir={tmp.parent / 'data-cache'}", *extra])
    absolutise(cfg)
    return cfg


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """The last value logged at each step (a resumed run re-logs the steps after its checkpoint)."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def _run(name, tmp, uri, *extra: str, **kw) -> str:
    outcome = driver.run(_cfg(name, tmp, uri, *extra), **kw)
    assert outcome.action == "trained"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("elf/local")
    (run,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    assert run.info.run_id == outcome.run_id
    return run.info.run_id


@pytest.fixture(scope="module")
def shared(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("train")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return tmp, uri


@pytest.fixture(scope="module")
def reference(shared):
    tmp, uri = shared
    return _run("reference", tmp / "reference", uri)


def test_two_workers_learn_and_everything_lands_in_mlflow(shared, reference):
    tmp, uri = shared
    client = MlflowClient(uri)
    run = client.get_run(reference)
    assert run.info.status == "FINISHED"
    # every resolved config value is a param; provenance tags
    assert run.data.params["model.hidden_size"] == "64" and run.data.params["ray.num_workers"] == "2"
    assert run.data.params["flow.p_mean"] == "-1.5"
    assert "elf.hostname" in run.data.tags and "mlflow.source.git.commit" in run.data.tags
    # metrics at every step, and the held-out probe improves
    loss = _history(client, reference, "curves/loss")
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in loss.values())
    for key in ("curves/ce", "curves/l2", "lr", "grad_norm", "tokens_per_s", "step_time_s", "curves/decode_acc"):
        assert key in run.data.metrics, key
    probe = _history(client, reference, "curves/probe_loss")  # one series: at step 0 and at the end
    assert sorted(probe) == [0, STEPS]
    assert probe[STEPS] < 0.98 * probe[0]  # measured: 3.75 -> 3.62 in 8 steps
    assert sorted(_history(client, reference, "curves/probe_clean_decode_acc")) == [0, STEPS]
    # artifacts: resolved config, samples, checkpoint; a registered model version with alias "last"
    arts = {a.path for a in client.list_artifacts(reference, "samples")}
    assert {"samples/final.jsonl", "samples/start.jsonl"} <= arts
    assert client.download_artifacts(reference, "config/resolved.yaml", str(tmp)).endswith("resolved.yaml")
    ckpt_files = {Path(a.path).name for a in client.list_artifacts(reference, "checkpoint")}
    assert {"model.safetensors", "ema.safetensors", "config.yaml", "meta.json"} <= ckpt_files
    mv = client.get_model_version_by_alias("elf-reference", "last")
    assert mv.run_id == reference
    # checkpoints: the newest at the last step, and it records its MLflow run
    ckpts = checkpoints.list_checkpoints(tmp / "reference" / "ray" / "reference")
    assert ckpts[-1].step == STEPS and ckpts[-1].run_record["mlflow_run_id"] == reference


@pytest.mark.parametrize("failure", ["exception@6", "exit@6"])
def test_failed_worker_resumes_with_same_data_order_and_loss(shared, reference, failure):
    tmp, uri = shared
    name = "fail-" + failure.split("@")[0]
    run_id = _run(name, tmp / name, uri, inject_failure=failure)
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    ref_rows, rows = _history(client, reference, "data_first_row"), _history(client, run_id, "data_first_row")
    assert rows == ref_rows  # every step saw the same batch as the uninterrupted run: none repeated or skipped
    ref_loss, loss = _history(client, reference, "curves/loss"), _history(client, run_id, "curves/loss")
    assert sorted(loss) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # the resumed loss curve continues the original one
        assert loss[step] == pytest.approx(ref_loss[step], rel=1e-4, abs=1e-5), step
    marker = tmp / name / "out" / name / "failure-markers"
    assert any(marker.iterdir())  # the failure really happened


def test_fsdp2_workers_follow_the_ddp_run_through_a_worker_death(shared, reference):
    """ray.strategy=fsdp2: sharded params/grads/optimizer state give the DDP reference's loss curve and
    data order, and a hard worker death resumes from the (unsharded) checkpoint like DDP does."""
    tmp, uri = shared
    run_id = _run("fsdp2", tmp / "fsdp2", uri, "ray.strategy=fsdp2", inject_failure="exit@6")
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["ray.strategy"] == "fsdp2"
    assert _history(client, run_id, "data_first_row") == _history(client, reference, "data_first_row")
    ref_loss, loss = _history(client, reference, "curves/loss"), _history(client, run_id, "curves/loss")
    assert sorted(loss) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert loss[step] == pytest.approx(ref_loss[step], rel=1e-4, abs=1e-5), step
    ref_m = client.get_run(reference).data.metrics
    assert run.data.metrics["curves/probe_loss"] == pytest.approx(ref_m["curves/probe_loss"], rel=1e-4)
    assert any((tmp / "fsdp2" / "out" / "fsdp2" / "failure-markers").iterdir())
    assert checkpoints.newest_checkpoint(tmp / "fsdp2" / "ray" / "fsdp2").step == STEPS


def test_bad_inputs_fail_fast_with_one_message(shared, capsys):
    tmp, uri = shared
    argv = [f"tracking.uri={uri}", f"ray.storage_path={tmp / 'bad'}"]
    assert train.main(["model.dpeth=3"]) == 2
    assert "unknown config key 'model.dpeth'" in capsys.readouterr().err
    assert train.main(argv + ["data.source=/nonexistent/corpus.jsonl"]) == 2
    assert "/nonexistent/corpus.jsonl" in capsys.readouterr().err
    assert train.main(argv + FAST + ["ray.num_workers=64"]) == 2
    assert "64 workers" in capsys.readouterr().err
    assert train.main(argv + ["tracking.uri=http://127.0.0.1:9"]) == 2
    assert "not reachable" in capsys.readouterr().err
    assert train.main(["optim.lr=-1"]) == 2
    assert "optim.lr=-1.0 is not in (0, inf)" in capsys.readouterr().err
