"""Evaluation beside training (pipelines.training.evaluator) on a real local Ray and a real MLflow
store, with a tiny ELF and a one-layer byte-level GPT-2 as the evaluator: metrics at the right
steps of the training run, the frontier-over-training plot and ``@best``; a killed evaluator, and
one gone for good; a resumed run that repeats no evaluation; rotation that spares the checkpoint being
scored (and rank 0 never waiting for it); bad inputs refused before any step. The training-time
overhead of evaluating beside training is a benchmark (benchmarks/embedded_default.py), not a test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from elf_core.config import load_config
from pipelines import checkpoints, train
from pipelines.infra.paths import DEFAULT_CONFIG, absolutise
from pipelines.training import driver, evaluator
from pipelines.training.eval_record import best_threshold
from conftest import FAST_TRAIN as FAST

pytestmark = pytest.mark.integration


def _args(tmp: Path, uri: str, name: str, ev_dir: str, steps: int, *extra: str) -> list[str]:
    return FAST + [f"name={name}", f"train.max_steps={steps}", "train.checkpoint_every=2", "ray.num_workers=1",
                   "ray.cpus_per_worker=1",  # training on one core, the evaluator (ray.eval_cpus=1) on the other
                   f"tracking.uri={uri}", f"ray.storage_path={tmp / 'ray'}", f"train.output_dir={tmp / 'out'}",
                   f"data.cache_dir={tmp / 'cache'}", f"eval.evaluator={ev_dir}", "eval.num_samples=2", *extra]


def _run(tmp: Path, uri: str, name: str, ev_dir: str, steps: int, *extra: str, **kw) -> driver.TrainOutcome:
    cfg = load_config(DEFAULT_CONFIG, _args(tmp, uri, name, ev_dir, steps, *extra))
    absolutise(cfg)
    return driver.run(cfg, **kw)


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("beside")
    return tmp, f"sqlite:///{tmp / 'mlflow.db'}"


@pytest.fixture(scope="module")
def evaluated(world, ev_dir):
    tmp, uri = world
    return _run(tmp, uri, "with-eval", ev_dir, 8, "train.eval_every=4")


def test_eval_metrics_land_at_their_steps_with_plot_samples_and_best(world, evaluated, ev_dir):
    tmp, uri = world
    client = MlflowClient(uri)
    run = client.get_run(evaluated.run_id)
    assert run.info.status == "FINISHED"
    for key in ("eval/evaluated", "eval/gen_ppl", "eval/entropy", "eval/skipped"):
        assert _steps(client, evaluated.run_id, key) == [4, 8], key  # next to the loss curve, at each step
    assert evaluated.evaluation == {"evaluated": [4, 8], "skipped": 0, "errors": 0}
    assert max(evaluated.handoff_s) < 1.0  # handing a checkpoint over never holds training up
    arts = {a.path for a in client.list_artifacts(evaluated.run_id, "eval")}
    assert {"eval/frontier_over_training.png", "eval/samples"} <= arts
    samples = {a.path for a in client.list_artifacts(evaluated.run_id, "eval/samples")}
    assert samples == {"eval/samples/step_00000004.jsonl", "eval/samples/step_00000008.jsonl"}
    # @best under the documented rule: lowest Gen PPL among evaluations with entropy >= 5·ln16/ln1024 = 2.0
    cfg = load_config(DEFAULT_CONFIG, _args(tmp, uri, "with-eval", ev_dir, 8))
    threshold = best_threshold(cfg, "unconditional")
    assert threshold == pytest.approx(2.0)
    ppl = {m.step: m.value for m in client.get_metric_history(evaluated.run_id, "eval/gen_ppl")}
    ent = {m.step: m.value for m in client.get_metric_history(evaluated.run_id, "eval/entropy")}
    ok = [s for s in ppl if ent[s] >= threshold]
    if ok:
        best_step = min(ok, key=lambda s: ppl[s])
        mv = client.get_model_version_by_alias("elf-with-eval", "best")
        assert mv.run_id == evaluated.run_id and mv.tags["elf.step"] == str(best_step)
        with checkpoints.resolve("models:/elf-with-eval@best", tracking_uri=uri, files=checkpoints.LIGHT_FILES) as r:
            assert r.step == best_step  # evaluate.py / a frontier sweep can start from it
    else:  # no evaluation met the rule: no @best
        assert "best" not in client.get_registered_model("elf-with-eval").aliases


def test_a_resumed_run_repeats_no_evaluation(world, evaluated, ev_dir):
    tmp, uri = world
    again = _run(tmp, uri, "with-eval", ev_dir, 12, "train.eval_every=4")
    assert again.run_id == evaluated.run_id
    client = MlflowClient(uri)
    assert _steps(client, again.run_id, "eval/evaluated") == [4, 8, 12]  # each once
    assert again.evaluation["evaluated"] == [4, 8, 12]


def test_a_killed_evaluator_does_not_stop_training(world, ev_dir):
    tmp, uri = world
    out = _run(tmp, uri, "killed-eval", ev_dir, 8, "train.eval_every=2",
               eval_faults={"exit_at": 4, "marker_dir": str(tmp / "markers")})
    client = MlflowClient(uri)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED" and sorted(_steps(client, out.run_id, "curves/loss")) == list(range(1, 9))
    assert run.data.tags["elf.eval.restarts"] == "1"  # logged once; Ray restarted it
    assert (tmp / "markers" / "evaluator-exit-4").exists()  # the process really died at step 4
    evaluated = _steps(client, out.run_id, "eval/evaluated")
    assert 4 not in evaluated and 8 in evaluated  # the last checkpoint is always evaluated


def test_an_evaluator_gone_for_good_leaves_a_finished_run(world, ev_dir):
    tmp, uri = world
    # The evaluator dies at every checkpoint: Ray restarts it max_restarts=3 times, then it is gone.
    out = _run(tmp, uri, "dead-eval", ev_dir, 8, "train.eval_every=2", "train.keep_checkpoints=2",
               eval_faults={"exit_always": True})
    client = MlflowClient(uri)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED" and sorted(_steps(client, out.run_id, "curves/loss")) == list(range(1, 9))
    assert "elf.eval.error" in run.data.tags and out.evaluation == {"error": run.data.tags["elf.eval.error"]}
    assert not client.get_metric_history(out.run_id, "eval/evaluated")
    assert out.model_uri and out.steps == 8  # the trained model is registered all the same
    # With nobody to ask what is being scored (no such actor), rank 0's handoff spares every checkpoint.
    root = str(tmp / "ray" / "dead-eval")
    stored = [c.location for c in checkpoints.list_checkpoints(root)]
    assert len(stored) >= 2 and evaluator.hand_over(f"elf-evaluator-{out.run_id}", root, 8, due=True) == tuple(stored)


def test_rotation_spares_the_checkpoint_being_scored(world, ev_dir):
    tmp, uri = world
    # keep 1 checkpoint; each evaluation first waits 8 s, while training writes steps 4 and 6
    out = _run(tmp, uri, "spared", ev_dir, 6, "train.eval_every=2", "train.keep_checkpoints=1",
               eval_faults={"delay_s": 8.0})
    client = MlflowClient(uri)
    run = client.get_run(out.run_id)
    assert "elf.eval.error" not in run.data.tags  # step 2 could still be read after 4 and 6 landed
    assert _steps(client, out.run_id, "eval/evaluated") == [2, 6]
    skipped = {m.step: m.value for m in client.get_metric_history(out.run_id, "eval/skipped")}
    assert skipped == {2: 0.0, 6: 1.0}  # fell behind: 4 was replaced by 6, never queued
    assert out.evaluation["skipped"] == 1
    # Rank 0 does not wait for the scoring: each evaluation took over 8 s, every handoff far less.
    assert len(out.handoff_s) == 3 and max(out.handoff_s) < 2.0, out.handoff_s


def test_bad_evaluation_inputs_are_one_line_before_any_step(world, ev_dir, capsys):
    tmp, uri = world
    assert train.main(_args(tmp, uri, "bad-1", ev_dir, 4, "train.eval_every=3")) == 2
    assert "train.eval_every=3 is not a multiple of train.checkpoint_every=2" in capsys.readouterr().err
    assert train.main(_args(tmp, uri, "bad-2", ev_dir, 4, "train.eval_every=2", "eval.evaluator=/no/such/lm")) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "eval.evaluator='/no/such/lm': the evaluator beside training could not be loaded" in line
    assert "no such file or directory" in line and "Traceback" not in err
    assert train.main(_args(tmp, uri, "bad-3", ev_dir, 4, "train.eval_every=2", "ray.eval_cpus=64")) == 2
    assert "ray.eval_cpus=64" in capsys.readouterr().err
    assert train.main(_args(tmp, uri, "bad-4", ev_dir, 4, "train.eval_every=2", "eval.sampling=no/such.yaml")) == 2
    assert "sampling config file not found: no/such.yaml" in capsys.readouterr().err
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("elf/local").experiment_id
    (run,) = client.search_runs([exp], "attributes.run_name = 'bad-2'")  # no step was taken
    assert run.info.status == "FAILED" and not client.get_metric_history(run.info.run_id, "curves/loss")
    for name in ("bad-3", "bad-4"):  # refused before any MLflow run
        assert not client.search_runs([exp], f"attributes.run_name = '{name}'")
