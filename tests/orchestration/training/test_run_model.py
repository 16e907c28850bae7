"""The run model (pipelines.training.run_model) end to end, on a real local Ray and a real MLflow store:
the same name is the same run.

One run is taken through every case in order: trained; resubmitted when finished (nothing runs);
resubmitted with a changed config (refused); continued with a longer schedule (the same MLflow run,
keep-K over all attempts); started over with ``--fresh`` (the old attempts retired, a new MLflow
run); resubmitted again (resumes at the fresh run's step). Then the same keep-K over resubmissions on
``s3://`` storage (a moto server), and the bad-input cases.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines import checkpoints, train
from conftest import FAST_TRAIN as FAST  # the pipeline tests' tiny, fast configuration

pytestmark = pytest.mark.integration
NAME = "same-name"


def _argv(tmp: Path, uri: str, steps: int, *extra: str, name: str = NAME) -> list[str]:
    return FAST + [f"name={name}", f"train.max_steps={steps}", "train.checkpoint_every=2", "train.keep_checkpoints=2",
                   "ray.num_workers=1", f"tracking.uri={uri}", f"ray.storage_path={tmp / 'ray'}",
                   f"train.output_dir={tmp / 'out'}", f"data.cache_dir={tmp / 'cache'}", *extra]


def _runs(client: MlflowClient, name: str = NAME) -> list:
    exp = client.get_experiment_by_name("elf/local")
    return sorted(client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'"),
                  key=lambda r: r.info.start_time) if exp else []


def _steps(client: MlflowClient, run_id: str, key: str = "curves/loss") -> dict[int, float]:
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def _attempts(tmp: Path, name: str = NAME) -> list[str]:
    return sorted(p.name for p in (tmp / "ray" / name).glob("attempt-*"))


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("run-model")
    return tmp, f"sqlite:///{tmp / 'mlflow.db'}"


@pytest.fixture(scope="module")
def first(world):
    tmp, uri = world
    assert train.main(_argv(tmp, uri, 6)) == 0
    (run,) = _runs(MlflowClient(uri))
    return run.info.run_id


def test_a_finished_run_resubmitted_does_nothing_and_says_so(world, first, capsys):
    tmp, uri = world
    client = MlflowClient(uri)
    assert client.get_run(first).info.status == "FINISHED"
    attempts = _attempts(tmp)
    capsys.readouterr()
    assert train.main(_argv(tmp, uri, 6)) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "already finished" in ln]
    assert len(lines) == 1
    line = lines[0]
    assert f"'{NAME}' already finished at step 6" in line and first in line
    assert f"models:/elf-{NAME}/1" in line and "raise train.max_steps (now 6)" in line and "--fresh" in line
    assert [r.info.run_id for r in _runs(client)] == [first]  # no new MLflow run
    assert _attempts(tmp) == attempts  # no Ray attempt


def test_a_changed_config_is_refused_naming_the_keys(world, first, capsys):
    tmp, uri = world
    assert train.main(_argv(tmp, uri, 6, "model.depth=2", "optim.lr=1e-3")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.depth (1 -> 2)" in err and "optim.lr (0.003 -> 0.001)" in err
    assert "--fresh" in err and "name=" in err
    assert [r.info.run_id for r in _runs(MlflowClient(uri))] == [first]


def test_a_longer_schedule_continues_the_same_mlflow_run_and_keep_k_spans_attempts(world, first):
    tmp, uri = world
    assert train.main(_argv(tmp, uri, 10)) == 0
    client = MlflowClient(uri)
    assert [r.info.run_id for r in _runs(client)] == [first]
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.data.tags["elf.resume_count"] == "1"
    assert run.data.tags["elf.resubmitted.train.max_steps"] == "10"  # params are immutable: the change is a tag
    assert sorted(_steps(client, first)) == list(range(1, 11))  # metrics carried on from step 7
    assert sorted(_steps(client, first, "curves/probe_loss")) == [0, 6, 10]
    assert len(_attempts(tmp)) == 1  # the first attempt held only rotated-away checkpoints: removed
    found = checkpoints.list_checkpoints(tmp / "ray" / NAME)
    assert [c.step for c in found] == [8, 10]  # train.keep_checkpoints=2 over all attempts


def test_fresh_retires_the_old_attempts_and_a_resubmission_resumes_the_fresh_run(world, first, capsys):
    tmp, uri = world
    client = MlflowClient(uri)
    capsys.readouterr()
    assert train.main(_argv(tmp, uri, 2) + ["--fresh"]) == 0
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if "--fresh:" in ln]
    assert "moved 1 earlier attempt(s) (2 checkpoint(s), the newest at step 10) aside" in line
    old, fresh = _runs(client)
    assert old.info.run_id == first and fresh.info.run_id != first
    assert [c.step for c in checkpoints.list_checkpoints(tmp / "ray" / NAME)] == [2]
    # A plain resubmission resumes at step 2 of the fresh run — never at step 10 of the retired one.
    assert train.main(_argv(tmp, uri, 4)) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    assert [r.info.run_id for r in _runs(client)] == [first, fresh.info.run_id]
    assert sorted(_steps(client, fresh.info.run_id)) == [1, 2, 3, 4]
    assert sorted(_steps(client, first)) == list(range(1, 11))  # the retired run is untouched
    newest = checkpoints.newest_checkpoint(tmp / "ray" / NAME)
    assert newest.step == 4 and newest.run_record["mlflow_run_id"] == fresh.info.run_id


def test_bad_storage_and_foreign_checkpoints_are_one_line(world, first, capsys):
    tmp, uri = world
    assert train.main(_argv(tmp, uri, 2, "ray.storage_path=/proc/elf-cannot-write")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/proc/elf-cannot-write" in err and "cannot write" in err
    # a checkpoint directory of another run name, under this run's storage
    theirs = checkpoints.newest_checkpoint(tmp / "ray" / NAME).location
    shutil.copytree(theirs, tmp / "ray" / "intruder" / "attempt-x" / Path(theirs).name)
    assert train.main(_argv(tmp, uri, 2, name="intruder")) == 2
    err = capsys.readouterr().err
    assert f"is a checkpoint of run '{NAME}', not 'intruder'" in err and "--fresh" in err


# ---- the same on s3:// storage ---------------------------------------------------------------------
def test_resubmissions_on_s3_resume_and_keep_k(s3_env, tmp_path, capsys):
    storage, uri = "s3://ckpts/ray-runs", f"sqlite:///{tmp_path / 'mlflow.db'}"

    def submit(steps: int) -> None:
        assert train.main(_argv(tmp_path, uri, steps, f"ray.storage_path={storage}", name="on-s3")) == 0

    submit(4)
    first = checkpoints.list_checkpoints(f"{storage}/on-s3")
    assert [c.step for c in first] == [2, 4]
    assert not (tmp_path / "ray").exists() and not list(tmp_path.glob("**/checkpoint_*"))  # all in S3
    capsys.readouterr()
    submit(6)
    submit(8)
    assert "resuming from step 6" in capsys.readouterr().out
    after = checkpoints.list_checkpoints(f"{storage}/on-s3")
    assert [c.step for c in after] == [6, 8]  # keep-K over all three attempts, on object storage too
    client = MlflowClient(uri)
    (run,) = _runs(client, "on-s3")  # one MLflow run for the whole history
    assert sorted(_steps(client, run.info.run_id)) == list(range(1, 9))
    assert sorted(_steps(client, run.info.run_id, "curves/probe_loss")) == [0, 4, 6, 8]
