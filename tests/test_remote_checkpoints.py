"""Checkpoints under a URI storage (pipelines.remote_checkpoints): listing with the completeness rules
of elf_core.checkpoint_dirs.list_checkpoints, on ``file://`` and on a real S3 server (moto, in-process),
byte-identical downloads, one-line errors; and a run on ``s3://`` storage that is resubmitted and
resumes from its checkpoint instead of step 0 (integration).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from elf_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from elf_core.checkpoint_dirs import list_checkpoints
from elf_core.config import ExperimentConfig, ModelConfig, load_config, resolve
from elf_core.network import ELFNetwork
from pipelines.remote_checkpoints import (RemoteStorageError, child_uri, incomplete_reason, list_checkpoints_at,
                                          local_checkpoint, redact, run_checkpoints_at)

CFG = resolve(ExperimentConfig(name="remote-test", model=ModelConfig(
    preset="tiny", depth=1, hidden_size=32, num_heads=2, bottleneck_dim=8)))
CKPT_FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.yaml", "meta.json")


def _save(directory: Path, step: int) -> Path:
    """A real tiny checkpoint (weights depend on the step, so checkpoints differ byte-wise)."""
    torch.manual_seed(step)
    net = ELFNetwork(CFG.model, 16, 50)
    ema = {n: p.detach() * 0.5 for n, p in net.named_parameters()}
    return save_checkpoint(directory, model=net, config=CFG, ema_state=ema, step=step)


def _run_tree(root: Path) -> Path:
    """``root/run`` laid out like Ray Train's storage of run ``run``: complete checkpoints at steps 2, 4
    (attempt-1) and 6 (attempt-2), plus newer directories that are *not* complete checkpoints: a hidden
    temp directory (step 10) and one without meta.json (step 12)."""
    run = root / "run"
    _save(run / "attempt-1" / "checkpoint_a", 2)
    _save(run / "attempt-1" / "checkpoint_b", 4)
    _save(run / "attempt-2" / "checkpoint_c", 6)
    _save(run / "attempt-2" / ".checkpoint_d.tmp-0123", 10)
    (_save(run / "attempt-2" / "checkpoint_e", 12) / "meta.json").unlink()
    (run / "attempt-2" / ".validate_storage_marker").write_text("")  # Ray's own files are ignored
    return run


def test_file_uri_listing_agrees_with_the_local_listing(tmp_path):
    run = _run_tree(tmp_path)
    local = list_checkpoints(run)
    remote = list_checkpoints_at(run.as_uri())
    assert [s for s, _ in remote] == [2, 4, 6]
    assert remote == [(s, p.as_uri()) for s, p in local]
    assert run_checkpoints_at(tmp_path.as_uri(), "run") == remote
    assert list_checkpoints_at((tmp_path / "not-yet").as_uri()) == []  # a first submission: nothing to resume
    # a file:// checkpoint is used in place
    with local_checkpoint(remote[-1][1]) as d:
        assert d == str(run / "attempt-2" / "checkpoint_c")
    with local_checkpoint(str(run)) as d:
        assert d == str(run)


def test_incomplete_reason_follows_meta_json():
    meta = {"has_ema": True, "file_sizes": {"model.safetensors": 10, "state.pt": 5, "config.yaml": 3,
                                            "ema.safetensors": 10}}
    full = dict(meta["file_sizes"], **{"meta.json": 100})
    assert incomplete_reason(meta, full) is None
    assert "ema.safetensors missing" in incomplete_reason(meta, {k: v for k, v in full.items() if k != "ema.safetensors"})
    assert "state.pt is 4 bytes but meta.json recorded 5" in incomplete_reason(meta, {**full, "state.pt": 4})
    assert incomplete_reason({"has_ema": False}, {"model.safetensors": 1, "config.yaml": 1}) == \
        "state.pt missing (an interrupted upload?)"


def test_uri_helpers_keep_queries_and_hide_secrets():
    base = "s3://key:secret@bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert child_uri(base, "name", "attempt-1/") == \
        "s3://key:secret@bucket/runs/name/attempt-1?endpoint_override=127.0.0.1:9000&scheme=http"
    assert child_uri("s3://bucket", "name") == "s3://bucket/name"
    assert child_uri("gs://bucket/a/", "b") == "gs://bucket/a/b"
    assert redact(base) == "s3://key:***@bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert redact("s3://bucket/x") == "s3://bucket/x"


# ---- a real S3 API: moto's server on a local port -------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    """``(filesystem, uri_of(bucket_path), endpoint URL)`` of an in-process moto S3 server with one bucket."""
    pytest.importorskip("moto", reason="moto[server] (dev extra) runs a local S3 server")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                               secret_key="testing", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir("ckpts")
        query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        yield fs, lambda path: f"s3://testing:testing@{path}{query}", f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def uploaded(s3, tmp_path_factory):
    """The run tree of :func:`_run_tree` in the bucket, plus two uploads that were cut short:
    step 14 lost its weights, step 16 has a truncated state.pt — both with meta.json present."""
    fs, uri, _ = s3
    local = _run_tree(tmp_path_factory.mktemp("remote"))
    _save(local / "attempt-3" / "checkpoint_f", 14)
    _save(local / "attempt-3" / "checkpoint_g", 16)
    pafs.copy_files(str(local), "ckpts/runs/run", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    fs.delete_file("ckpts/runs/run/attempt-3/checkpoint_f/model.safetensors")
    with fs.open_output_stream("ckpts/runs/run/attempt-3/checkpoint_g/state.pt") as f:
        f.write((local / "attempt-3" / "checkpoint_g" / "state.pt").read_bytes()[:100])
    return local


def test_s3_listing_picks_the_newest_complete_checkpoint(s3, uploaded):
    fs, uri, _ = s3
    skipped = []
    found = run_checkpoints_at(uri("ckpts/runs"), "run", on_incomplete=lambda u, why: skipped.append((u, why)))
    assert [s for s, _ in found] == [2, 4, 6]
    assert found[-1][1] == uri("ckpts/runs/run/attempt-2/checkpoint_c")
    assert [(u.split("?")[0].rsplit("/", 1)[1], why.split(" (")[0]) for u, why in skipped] == [
        ("checkpoint_f", "model.safetensors missing"),
        ("checkpoint_g", f"state.pt is 100 bytes but meta.json recorded "
                         f"{(uploaded / 'attempt-3' / 'checkpoint_g' / 'state.pt').stat().st_size}")]
    assert run_checkpoints_at(uri("ckpts/runs"), "never-ran") == []


def test_s3_download_is_byte_identical_and_cleaned_up(s3, uploaded):
    fs, uri, _ = s3
    newest = run_checkpoints_at(uri("ckpts/runs"), "run", on_incomplete=lambda *_: None)[-1][1]
    source = uploaded / "attempt-2" / "checkpoint_c"
    with local_checkpoint(newest) as d:
        local = Path(d)
        assert local.name == "checkpoint_c" and sorted(os.listdir(local)) == sorted(CKPT_FILES)
        for name in CKPT_FILES:
            assert (local / name).read_bytes() == (source / name).read_bytes(), name
        loaded = load_checkpoint(local)
        torch.manual_seed(6)
        expected = ELFNetwork(CFG.model, 16, 50).state_dict()
        assert loaded.step == 6
        assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in expected.items())
    assert not local.parent.exists()  # the temp download is gone


def test_s3_damaged_meta_is_an_error_not_a_skip(s3, uploaded):
    fs, uri, _ = s3
    pafs.copy_files(str(uploaded / "attempt-2" / "checkpoint_c"), "ckpts/damaged/run/attempt-1/checkpoint_x",
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    with fs.open_output_stream("ckpts/damaged/run/attempt-1/checkpoint_x/meta.json") as f:
        f.write(b"{")
    with pytest.raises(CheckpointError) as err:
        run_checkpoints_at(uri("ckpts/damaged"), "run")
    assert "s3://testing:***@ckpts/damaged/run/attempt-1/checkpoint_x/meta.json" in str(err.value)
    assert "secret" not in str(err.value)


def test_unreachable_storage_is_one_line_naming_the_uri(s3):
    fs, uri, _ = s3
    cases = [(uri("no-such-bucket/runs"), "NO_SUCH_BUCKET"),  # the server answers: an AWS error
             ("s3://bucket/runs?no_such_option=1", "Unexpected query parameter"),  # refused by pyarrow
             ("nosuchfs://bucket/runs", "")]
    for bad, cause in cases:
        with pytest.raises(RemoteStorageError) as err:
            list_checkpoints_at(bad)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(redact(bad).split("?")[0]) and cause in msg, msg
        assert "testing:testing" not in msg
    with pytest.raises(RemoteStorageError, match="AWS_ENDPOINT_URL"):
        list_checkpoints_at(uri("no-such-bucket/runs"))
    with pytest.raises(RemoteStorageError, match="no checkpoint directory there"):
        with local_checkpoint(uri("ckpts/runs/run/attempt-9/checkpoint_z")):
            pass


# ---- integration: a run on s3:// storage, resubmitted ---------------------------------------------
@pytest.fixture
def s3_env(s3, request, monkeypatch):
    """The standard AWS variables pointing at the moto server, in this process and in Ray's: Ray's
    processes keep the environment they started with, so the session's Ray is started now — or
    restarted if it runs already. This process's variables are restored afterwards; Ray is not
    restarted again (its processes keep AWS_* variables pointing at a closed port, which no other
    test uses, and a restart costs ~7 s)."""
    import conftest

    keys = {"AWS_ENDPOINT_URL": s3[2], "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in keys.items():  # restored after the test by monkeypatch
        monkeypatch.setenv(k, v)
    running = conftest._LOCAL_RAY is not None
    ray_local = request.getfixturevalue("ray_local")
    if running:
        ray_local.restart()
    return s3


@pytest.mark.integration
def test_resubmitted_run_on_s3_storage_resumes_from_its_checkpoint(s3_env, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipelines import train
    from test_train_pipeline import FAST  # the pipeline tests' tiny, fast configuration

    storage, name, uri = "s3://ckpts/ray-runs", "on-s3", f"sqlite:///{tmp_path / 'mlflow.db'}"

    def submit(steps: int) -> None:
        cfg = load_config(train.DEFAULT_CONFIG, FAST + [
            "ray.num_workers=1", f"train.max_steps={steps}", "train.checkpoint_every=2", f"name={name}",
            f"tracking.uri={uri}", f"ray.storage_path={storage}", f"train.output_dir={tmp_path / 'out'}",
            f"data.cache_dir={tmp_path / 'data-cache'}"])
        train.absolutise(cfg)
        assert train.run(cfg) == 0

    submit(4)
    first = run_checkpoints_at(storage, name)
    assert [s for s, _ in first] == [2, 4]
    assert not (tmp_path / "ray-runs").exists() and not list(tmp_path.glob("**/checkpoint_*"))  # all in S3

    submit(6)  # the same run, resubmitted with a longer schedule
    assert f"[elf] resuming from {first[-1][1]}" in capsys.readouterr().out
    after = run_checkpoints_at(storage, name)
    attempts: dict[str, list[int]] = {}
    for step, ckpt in after:
        attempts.setdefault(ckpt.split("/")[-2], []).append(step)
    (first_attempt, resumed_attempt) = sorted(attempts)
    assert attempts[first_attempt] == [2, 4]
    assert attempts[resumed_attempt] == [6]  # from step 0 it would have written 2, 4 and 6 again

    # The first run FINISHED and the config changed (max_steps), so MLflow has a second run (tracking's
    # rule); it holds only the steps trained after the checkpoint.
    client = MlflowClient(uri)
    old, new = sorted(client.search_runs([client.get_experiment_by_name("elf/local").experiment_id]),
                      key=lambda r: r.info.start_time)
    assert old.info.status == new.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(old.info.run_id, "loss")] == [1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(new.info.run_id, "loss")) == [5, 6]
    assert client.get_metric_history(new.info.run_id, "probe_start/loss") == []  # step 0 never re-measured
    assert [m.step for m in client.get_metric_history(new.info.run_id, "probe_end/loss")] == [6]
