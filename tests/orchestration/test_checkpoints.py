"""The one checkpoint resolver (pipelines.checkpoints): listing complete checkpoints of a run's
storage on a local disk, ``file://`` and a real S3 server (moto, in-process) with the same rules;
keep-K rotation over attempts; ``--fresh`` retirement; resolving every reference form (directories,
storage dirs, URIs, ``models:/``, ``runs:/``, official) to local files plus provenance; byte-identical
downloads; one-line errors.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from elf_core.checkpoint import CheckpointError, checkpoint_path, load_checkpoint, save_checkpoint
from elf_core.config import ExperimentConfig, ModelConfig, resolve
from elf_core.network import ELFNetwork
from pipelines import checkpoints as ck
from pipelines.checkpoints import incomplete_reason
from pipelines.infra.filesystems import StorageError, child, redact
from pipelines.tracking.store import TrackingError

CFG = resolve(ExperimentConfig(name="remote-test", model=ModelConfig(
    preset="tiny", depth=1, hidden_size=32, num_heads=2, bottleneck_dim=8)))
CKPT_FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.yaml", "meta.json")


def _save(directory: Path, step: int, run_id: str = "") -> Path:
    """A real tiny checkpoint (weights depend on the step, so checkpoints differ byte-wise)."""
    torch.manual_seed(step)
    net = ELFNetwork(CFG.model, 16, 50)
    ema = {n: p.detach() * 0.5 for n, p in net.named_parameters()}
    run = {"name": CFG.name, "mlflow_run_id": run_id} if run_id else None
    return save_checkpoint(directory, model=net, config=CFG, ema_state=ema, step=step, run=run)


def _steps(found) -> list[int]:
    return [c.step for c in found]


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


def test_local_and_file_uri_listings_agree(tmp_path):
    run = _run_tree(tmp_path)
    local = ck.list_checkpoints(run)
    assert _steps(local) == [2, 4, 6]
    assert [c.location for c in local] == [str(run / "attempt-1" / "checkpoint_a"), str(run / "attempt-1" / "checkpoint_b"),
                                           str(run / "attempt-2" / "checkpoint_c")]
    assert [c.attempt for c in local] == ["attempt-1", "attempt-1", "attempt-2"]
    remote = ck.list_checkpoints(run.as_uri())
    assert [(c.step, c.location) for c in remote] == [(c.step, Path(c.location).as_uri()) for c in local]
    assert ck.list_checkpoints((tmp_path / "not-yet").as_uri()) == []  # a first submission: nothing to resume
    assert ck.list_checkpoints(tmp_path / "not-yet") == []


def test_newest_is_by_step_not_by_name(tmp_path):
    _save(tmp_path / "step_9", 9)
    _save(tmp_path / "step_10", 10)
    _save(tmp_path / "zzz", 2)
    assert ck.newest_checkpoint(tmp_path).location == str(tmp_path / "step_10")
    assert ck.newest_checkpoint(tmp_path / "missing") is None


def test_rotation_keeps_the_newest_and_the_protected_over_attempts(tmp_path):
    for step in (10, 20, 30, 40, 50):
        _save(checkpoint_path(tmp_path, step), step)
    removed = ck.rotate_checkpoints(tmp_path, keep=2, protect=[str(checkpoint_path(tmp_path, 10))])
    assert removed == [str(checkpoint_path(tmp_path, 20)), str(checkpoint_path(tmp_path, 30))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010", "step_00000040", "step_00000050"]
    assert ck.rotate_checkpoints(tmp_path, keep=2, protect=[str(checkpoint_path(tmp_path, 10))]) == []
    assert ck.rotate_checkpoints(tmp_path, keep=1) == [str(checkpoint_path(tmp_path, 10)), str(checkpoint_path(tmp_path, 40))]
    assert load_checkpoint(ck.newest_checkpoint(tmp_path).location).step == 50
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ck.rotate_checkpoints(tmp_path, keep=0)
    # Over attempts: keep-K counts every attempt (each submission is one).
    run = _run_tree(tmp_path / "over")
    _save(run / "attempt-3" / "checkpoint_h", 8)
    _save(run / "attempt-3" / "checkpoint_i", 9)
    removed = ck.rotate_checkpoints(run, keep=2)
    assert [Path(r).name for r in removed] == ["checkpoint_a", "checkpoint_b", "checkpoint_c"]
    assert _steps(ck.list_checkpoints(run)) == [8, 9]
    assert sorted(p.name for p in run.iterdir()) == ["attempt-3"]  # attempts left empty are removed


def test_retire_moves_attempts_aside_for_good(tmp_path):
    run = _run_tree(tmp_path)
    line = ck.retire_run(run)
    assert line.startswith("--fresh: moved 2 earlier attempt(s) (3 checkpoint(s), the newest at step 6) aside to ")
    assert "will never be resumed" in line
    assert ck.list_checkpoints(run) == [] and ck.newest_checkpoint(run) is None
    (aside,) = (run / ck.RETIRED_DIR).iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["attempt-1", "attempt-2"]  # nothing deleted
    assert load_checkpoint(aside / "attempt-2" / "checkpoint_c").step == 6
    assert ck.retire_run(run).startswith("--fresh: no earlier attempts")


def test_incomplete_reason_follows_meta_json():
    meta = {"has_ema": True, "file_sizes": {"model.safetensors": 10, "state.pt": 5, "config.yaml": 3,
                                            "ema.safetensors": 10}}
    full = dict(meta["file_sizes"], **{"meta.json": 100})
    assert incomplete_reason(meta, full) is None
    assert "ema.safetensors missing" in incomplete_reason(meta, {k: v for k, v in full.items() if k != "ema.safetensors"})
    assert "state.pt is 4 bytes but meta.json recorded 5" in incomplete_reason(meta, {**full, "state.pt": 4})
    assert incomplete_reason({"has_ema": False}, {"model.safetensors": 1, "config.yaml": 1}) == \
        "state.pt missing (an interrupted copy?)"


def test_uri_helpers_keep_queries_and_hide_secrets():
    base = "s3://key:secret@bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert child(base, "name", "attempt-1/") == \
        "s3://key:secret@bucket/runs/name/attempt-1?endpoint_override=127.0.0.1:9000&scheme=http"
    assert child("s3://bucket", "name") == "s3://bucket/name"
    assert child("gs://bucket/a/", "b") == "gs://bucket/a/b"
    assert child("/data/runs", "name", "attempt-1") == "/data/runs/name/attempt-1"
    assert redact(base) == "s3://key:***@bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert redact("s3://bucket/x") == "s3://bucket/x"


# ---- a real S3 API: moto's server on a local port (the ``s3`` fixture, conftest.py) -------------------
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
    found = ck.list_checkpoints(uri("ckpts/runs/run"), on_incomplete=lambda u, why: skipped.append((u, why)))
    assert _steps(found) == [2, 4, 6]
    assert found[-1].location == uri("ckpts/runs/run/attempt-2/checkpoint_c")
    assert [(u.split("?")[0].rsplit("/", 1)[1], why.split(" (")[0]) for u, why in skipped] == [
        ("checkpoint_f", "model.safetensors missing"),
        ("checkpoint_g", f"state.pt is 100 bytes but meta.json recorded "
                         f"{(uploaded / 'attempt-3' / 'checkpoint_g' / 'state.pt').stat().st_size}")]
    assert ck.list_checkpoints(uri("ckpts/runs/never-ran")) == []


def test_s3_download_is_byte_identical_and_cleaned_up(s3, uploaded):
    fs, uri, _ = s3
    newest = ck.list_checkpoints(uri("ckpts/runs/run"), on_incomplete=lambda *_: None)[-1].location
    source = uploaded / "attempt-2" / "checkpoint_c"
    with ck.resolve(newest) as r:
        local = r.path
        assert r.step == 6 and r.pinned == newest and r.kind == "elf-lab"
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
        ck.list_checkpoints(uri("ckpts/damaged/run"))
    assert "s3://testing:***@ckpts/damaged/run/attempt-1/checkpoint_x/meta.json" in str(err.value)
    assert "secret" not in str(err.value)


def test_unreachable_storage_is_one_line_naming_the_uri(s3):
    fs, uri, _ = s3
    cases = [(uri("no-such-bucket/runs"), "NO_SUCH_BUCKET"),  # the server answers: an AWS error
             ("s3://bucket/runs?no_such_option=1", "Unexpected query parameter"),  # refused by pyarrow
             ("nosuchfs://bucket/runs", "")]
    for bad, cause in cases:
        with pytest.raises(StorageError) as err:
            ck.list_checkpoints(bad)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(redact(bad).split("?")[0]) and cause in msg, msg
        assert "testing:testing" not in msg
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL"):
        ck.list_checkpoints(uri("no-such-bucket/runs"))
    with pytest.raises(CheckpointError, match="no complete ELF Lab checkpoint there"):
        with ck.resolve(uri("ckpts/runs/run/attempt-9/checkpoint_z")):
            pass


# ---- resolving references ------------------------------------------------------------------------
def test_resolve_directories_storage_dirs_and_weights(tmp_path):
    run = _run_tree(tmp_path)
    with ck.resolve(str(run)) as r:  # a storage dir: its newest complete checkpoint
        assert r.path == run / "attempt-2" / "checkpoint_c" and r.step == 6 and r.pinned == str(r.path)
        assert r.config.name == CFG.name and r.meta["has_ema"] and r.kind == "elf-lab"
        assert r.weights == "raw"  # step 6 < 1/(1 - 0.9999): the EMA still remembers its random start
    with ck.resolve(str(run / "attempt-1" / "checkpoint_a"), use_ema=True) as r:
        assert r.step == 2 and r.weights == "ema"
    with pytest.raises(CheckpointError, match="model.safetensors without meta.json: incomplete"):
        with ck.resolve(str(run / "attempt-2" / "checkpoint_e")):
            pass
    with pytest.raises(CheckpointError, match="checkpoint not found: .*/nowhere"):
        with ck.resolve(str(tmp_path / "nowhere")):
            pass
    with ck.resolve("some-org/ELF-B-owt-torch") as r:  # neither a path nor an MLflow reference: the hub
        assert r.kind == "official" and r.config is None and r.weights == "ema"


def test_resolve_mlflow_references_with_provenance(tmp_path, mlflow_uri):
    from pipelines.tracking import registry, runs
    from pipelines.tracking.store import make_client

    client = make_client(mlflow_uri)
    eid = runs.ensure_experiment("elf/ckpt", client)
    run_id = runs.create_run(client, eid, "trainer", kind="training")
    saved = _save(tmp_path / "checkpoint_00000004", 4, run_id=run_id)
    files = ["model.safetensors", "ema.safetensors", "config.yaml", "meta.json"]
    assert registry.register_checkpoint(client, run_id, saved, "elf-ckpt", alias="best", files=files) == "1"
    for ref in ("models:/elf-ckpt/1", "models:/elf-ckpt@best", "models:/elf-ckpt/latest"):
        with ck.resolve(ref, tracking_uri=mlflow_uri) as r:
            assert r.step == 4 and r.training_run_id == run_id and r.model_version == "elf-ckpt/1"
            assert r.pinned == "models:/elf-ckpt/1"  # latest / aliases may move; the version does not
            assert (r.path / "model.safetensors").read_bytes() == (saved / "model.safetensors").read_bytes()
    with ck.resolve(f"runs:/{run_id}", tracking_uri=mlflow_uri) as r:
        assert r.step == 4 and r.training_run_id == run_id and r.training_run_source == "runs:/ reference"
    with ck.resolve(str(saved)) as r:  # a local checkpoint knows its run from meta.json
        assert r.training_run_id == run_id and r.training_run_source == "meta.json run record"
    with ck.resolve("models:/elf-ckpt/1", tracking_uri=mlflow_uri, files=ck.LIGHT_FILES) as r:
        assert sorted(os.listdir(r.path)) == ["config.yaml", "meta.json"]  # a config read fetches no weights
    assert ck.read_config("models:/elf-ckpt@best", mlflow_uri).name == CFG.name
    # Bad references: one line naming the reference.
    with pytest.raises(TrackingError, match=r"'models:/nope/1': not in the model registry"):
        with ck.resolve("models:/nope/1", tracking_uri=mlflow_uri):
            pass
    with pytest.raises(TrackingError, match=r"'models:/elf-ckpt@gone': not in the model registry.*\['best'\]"):
        with ck.resolve("models:/elf-ckpt@gone", tracking_uri=mlflow_uri):
            pass
    other = runs.create_run(client, eid, "no-checkpoint", kind="training")
    with pytest.raises(TrackingError, match=rf"'runs:/{other}': run {other} holds no checkpoint"):
        with ck.resolve(f"runs:/{other}", tracking_uri=mlflow_uri):
            pass
