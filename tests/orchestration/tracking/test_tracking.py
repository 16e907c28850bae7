"""pipelines.tracking (store, runs, metrics, registry, ui) against real MLflow 3.x stores: SQLite in
tmp (fast) and a real local ``mlflow server`` over HTTP (integration). Everything is read back
through ``MlflowClient``."""

from __future__ import annotations

import http.server
import importlib.metadata
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from conftest import free_port
from mlflow import MlflowClient

from pipelines.tracking import registry, runs, store, ui
from pipelines.tracking.metrics import MetricsLogger
from pipelines.tracking.store import TrackingError, TrackingUnavailable, make_client


def _run(client, eid, name, **tags):
    return runs.create_run(client, eid, name, kind="test", tags=tags)


# ---- URIs ---------------------------------------------------------------------------------------
def test_resolve_tracking_uri_order_and_absolute_default(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store.resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert store.resolve_tracking_uri(None, tmp_path).startswith("sqlite:////")  # absolute path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert store.resolve_tracking_uri(None, tmp_path) == "http://example.invalid:5000"
    assert store.resolve_tracking_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"  # config wins
    with pytest.raises(TrackingError, match=r"'sqlite:///rel\.db' \(from the config's tracking URI\)"):
        store.resolve_tracking_uri("sqlite:///rel.db", tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "mlruns")
    with pytest.raises(TrackingError, match=r"'mlruns' \(from MLFLOW_TRACKING_URI\).*relative"):
        store.resolve_tracking_uri(None, tmp_path)


def test_telemetry_off_by_default_but_user_value_kept(monkeypatch):
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY")
    store.disable_telemetry_by_default()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    from mlflow.telemetry import get_telemetry_client

    assert get_telemetry_client() is None
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    store.resolve_tracking_uri("sqlite:////abs/x.db", Path("/"))
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"


def test_quick_http_env_restores_user_values(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with store.quick_http_env(3):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_unreachable_server_fails_fast_with_one_message():
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable) as info:
        store.check_tracking_reachable(uri, timeout_s=5)
    elapsed = time.monotonic() - t0
    assert elapsed < 10, elapsed
    msg = str(info.value)
    assert msg.startswith(f"MLflow tracking server at {uri} is not reachable (")
    assert "mlflow server" in msg and "unset MLFLOW_TRACKING_URI" in msg
    assert "--port " + uri.rsplit(":", 1)[1] in msg


def test_non_mlflow_http_server_is_named(tmp_path):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        with pytest.raises(TrackingUnavailable, match=rf"{uri} answered HTTP 404 on {uri}/health"):
            store.check_tracking_reachable(uri, timeout_s=2)
    finally:
        srv.shutdown()


def test_sqlite_store_directory_is_created(tmp_path):
    uri = f"sqlite:///{tmp_path}/a/b/mlflow.db"
    store.check_tracking_reachable(uri)
    assert (tmp_path / "a" / "b").is_dir()


# ---- experiments, runs, params, metrics ----------------------------------------------------------
def test_ensure_experiment_absolute_artifact_location(mlflow_uri, tmp_path):
    client = make_client(mlflow_uri)
    eid = runs.ensure_experiment("elf/local", mlflow_uri)
    exp = client.get_experiment(eid)
    assert exp.name == "elf/local"
    # MLflow 3.17's UI opens experiments with this tag in the model-training view, not the GenAI one
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == (tmp_path / "mlruns" / "artifacts" / "elf-local").as_uri()
    assert runs.ensure_experiment("elf/local", client) == eid  # idempotent, accepts a client
    eid2 = runs.ensure_experiment("elf/other", mlflow_uri, artifact_root=tmp_path / "elsewhere")
    assert client.get_experiment(eid2).artifact_location == (tmp_path / "elsewhere" / "elf-other").as_uri()
    client.delete_experiment(eid2)
    with pytest.raises(TrackingError, match=r"'elf/other' .* is deleted; restore it"):
        runs.ensure_experiment("elf/other", mlflow_uri)


def test_log_params_one_batch_values_and_changes(mlflow_uri, monkeypatch):
    client = make_client(mlflow_uri)
    run_id = _run(client, runs.ensure_experiment("p", client), "params")
    flat = {f"group{i % 7}.key_{i:03d}": i * 0.5 for i in range(247)}
    flat.update({"a.none": None, "a.flag": True, "a.long": "x" * 7000})  # 250 params
    calls = []
    real = client.log_batch
    monkeypatch.setattr(client, "log_batch", lambda *a, **k: (calls.append(len(k.get("params", []))), real(*a, **k)))
    assert runs.log_params(client, run_id, flat) == 250
    assert calls == [250]  # one call: MlflowClient.log_batch splits it to MLflow's limits itself
    params = MlflowClient(mlflow_uri).get_run(run_id).data.params
    assert len(params) == 250
    assert params["group3.key_010"] == "5.0"
    assert params["a.none"] == "None" and params["a.flag"] == "True"
    assert len(params["a.long"]) == 6000 and params["a.long"].endswith("...[truncated, 7000 chars]")
    # A resumed run re-logs the same config: accepted. A changed value is named.
    runs.log_params(client, run_id, flat)
    with pytest.raises(TrackingError, match=r"already has different values.*group3\.key_010"):
        runs.log_params(client, run_id, {**flat, "group3.key_010": 99})
    with pytest.raises(TrackingError, match=r"param name 'bad\|key'"):
        runs.log_params(client, run_id, {"bad|key": 1})


def test_metrics_logger_batches_by_count_time_and_close(mlflow_uri):
    client = make_client(mlflow_uri)
    run_id = _run(client, runs.ensure_experiment("m", client), "metrics")
    now = [0.0]
    ml = MetricsLogger(run_id, client, flush_every_n=3, flush_every_s=100.0, clock=lambda: now[0])
    for step in range(7):
        ml.log({"loss": 10.0 - step, "lr": 1e-3 * step}, step=step)
    assert ml.flushes == 2  # after calls 3 and 6; step 6 still buffered
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(6))
    now[0] = 150.0  # time-based flush on the next call
    ml.log({"loss": 2.5}, step=7)
    assert ml.flushes == 3
    ml.log({"loss": 2.0}, step=8)
    ml.close()
    hist = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(s, 10.0 - s) for s in range(7)] + [(7, 2.5), (8, 2.0)]
    assert [m.value for m in client.get_metric_history(run_id, "lr")] == pytest.approx([1e-3 * s for s in range(7)])
    assert ml.flushes == 4
    with pytest.raises(TrackingError, match="closed"):
        ml.log({"loss": 1.0}, step=9)
    # More than MLflow's 1000 metrics per batch: one flush, split by MlflowClient.log_batch.
    with MetricsLogger(run_id, client, flush_every_n=100) as big:
        big.log({f"m/{i}": float(i) for i in range(1200)}, step=0)
    assert big.flushes == 1
    assert client.get_run(run_id).data.metrics["m/1199"] == 1199.0
    with pytest.raises(TrackingError, match=r"metric 'x' at step 3 is not a number"):
        MetricsLogger(run_id, client).log({"x": "abc"}, step=3)


def test_create_reattach_and_parents(mlflow_uri):
    client = make_client(mlflow_uri)
    eid = runs.ensure_experiment("r", client)
    a = runs.create_run(client, eid, "job-1", kind="training", tags={"seed": 0})
    run = client.get_run(a)
    assert run.info.status == "RUNNING" and run.info.run_name == "job-1"
    assert run.data.tags["seed"] == "0" and run.data.tags["elf.kind"] == "training"
    assert "elf.git.sha" in run.data.tags or "elf.git.error" in run.data.tags  # provenance on every run
    runs.finish_run(client, a, "FAILED")
    assert runs.reattach_run(client, a, {"attempt": 3}) == a  # found by id, never by name
    run = client.get_run(a)
    assert run.info.status == "RUNNING"
    assert run.data.tags["elf.resume_count"] == "1" and run.data.tags["attempt"] == "3"
    child = runs.create_run(client, eid, "eval", kind="evaluation", parent_run_id=a)
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == a
    assert [r.info.run_id for r in runs.child_runs(client, eid, a)] == [child]
    with pytest.raises(TrackingError, match="not in"):
        runs.reattach_run(client, "0" * 32)


def test_finish_run_statuses_and_guard(mlflow_uri):
    client = make_client(mlflow_uri)
    eid = runs.ensure_experiment("f", client)
    for status in runs.RUN_STATUSES:
        rid = _run(client, eid, status)
        runs.finish_run(client, rid, status)
        info = client.get_run(rid).info
        assert info.status == status and info.end_time is not None
    with pytest.raises(ValueError, match="RUNNING"):
        runs.finish_run(client, rid, "RUNNING")

    cases = [(None, "FINISHED"), (RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
             (SystemExit(143), "KILLED"), (SystemExit(0), "FINISHED")]  # fmt: skip
    for exc, expected in cases:
        rid = _run(client, eid, f"guard-{expected}-{exc!r}")
        try:
            with runs.run_guard(client, rid):
                if exc is not None:
                    raise exc
        except BaseException as e:  # noqa: BLE001 - re-raised by the guard, checked here
            assert e is exc
        assert client.get_run(rid).info.status == expected, exc
    assert client.get_run(rid).data.tags.get("elf.error") is None  # SystemExit(0): no error recorded
    with pytest.raises(RuntimeError):
        with runs.tracked_run(client, eid, "crash", kind="test"):
            raise RuntimeError("disk full")
    (crashed,) = client.search_runs([eid], "attributes.run_name = 'crash'")
    assert crashed.info.status == "FAILED" and crashed.data.tags["elf.error"] == "RuntimeError: disk full"
    with runs.tracked_run(client, eid, "interrupted", kind="test") as run:
        run.end_status = "KILLED"  # handled inside (a sweep stopped early): ends as said
    assert client.get_run(run.run_id).info.status == "KILLED"


def test_sigterm_ends_run_killed(mlflow_uri):
    """``ray job stop`` sends SIGTERM: the guard turns it into a KILLED run, not a RUNNING zombie,
    and puts the previous handler back. (A real signal to this process; pytest runs tests in the
    main thread, where Python delivers signals.)"""
    client = make_client(mlflow_uri)
    rid = _run(client, runs.ensure_experiment("s", client), "sigterm")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        with runs.run_guard(client, rid):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler
    assert info.value.code == 143
    assert client.get_run(rid).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is before


def test_provenance_tags(tmp_path):
    tags = runs.provenance_tags()
    assert tags["elf.version.mlflow"] == importlib.metadata.version("mlflow") == mlflow.__version__
    assert tags["elf.version.elf-lab"] == importlib.metadata.version("elf-lab")
    assert tags["elf.python"] == ".".join(map(str, sys.version_info[:3]))
    for pkg in ("torch", "transformers", "ray"):
        assert tags[f"elf.version.{pkg}"] == importlib.metadata.version(pkg)

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    (repo / "untracked.bin").write_text("ignored for dirtiness")
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    tags = runs.provenance_tags(repo)
    assert tags["elf.git.sha"] == tags["mlflow.source.git.commit"] == sha and len(sha) == 40
    assert tags["elf.git.dirty"] == "false"
    (repo / "a.txt").write_text("2")
    assert runs.provenance_tags(repo)["elf.git.dirty"] == "true"

    plain = tmp_path / "plain"
    plain.mkdir()
    tags = runs.provenance_tags(plain)
    assert "elf.git.sha" not in tags and str(plain) in tags["elf.git.error"]


# ---- checkpoints as registered models -----------------------------------------------------------
def _checkpoint(path: Path, seed: int) -> dict[str, bytes]:
    files = {
        "model.safetensors": os.urandom(2048) + bytes([seed]),
        "ema.safetensors": os.urandom(1024),
        "config.yaml": f"model:\n  preset: tiny\nseed: {seed}\n".encode(),
        "extra/state.pt": os.urandom(512),
    }
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _register_round_trip(uri: str, tmp_path: Path, name: str) -> None:
    client = make_client(uri)
    eid = runs.ensure_experiment("elf/ckpt", uri)
    run_id = _run(client, eid, "ckpt")
    files1 = _checkpoint(tmp_path / "step100", 1)
    assert registry.register_checkpoint(client, run_id, tmp_path / "step100", name, alias="best",
                                        tags={"step": 100}) == "1"  # fmt: skip
    files2 = _checkpoint(tmp_path / "step200", 2)
    keep = ["model.safetensors", "config.yaml"]
    assert registry.register_checkpoint(client, run_id, tmp_path / "step200", name, files=keep,
                                        artifact_path="checkpoint-200") == "2"  # fmt: skip
    mv = client.get_model_version(name, "1")
    assert mv.run_id == run_id and mv.source.endswith("/checkpoint") and mv.tags["step"] == "100"
    assert str(client.get_model_version_by_alias(name, "best").version) == "1"

    def download(model_uri: str, dst: str) -> dict[str, bytes]:
        # models:/ URIs resolve through the registry of the *global* URIs; set them via env.
        os.environ["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_REGISTRY_URI"] = uri
        try:
            return _read_tree(Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / dst))))
        finally:
            del os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_REGISTRY_URI"]

    assert download(f"models:/{name}@best", "dl-best") == files1
    assert download(f"models:/{name}/latest", "dl-latest") == {k: files2[k] for k in keep}
    assert download(f"models:/{name}/1", "dl-1") == files1
    with pytest.raises(TrackingError, match="reserves the model alias 'latest'"):
        registry.register_checkpoint(client, run_id, tmp_path / "step100", name, alias="latest")
    with pytest.raises(TrackingError, match="forbids '/'"):
        registry.register_checkpoint(client, run_id, tmp_path / "step100", "elf/ckpt")
    assert registry.registered_model_name("wmt14 de-en") == "elf-wmt14-de-en"
    with pytest.raises(TrackingError, match="is missing"):
        registry.register_checkpoint(client, run_id, tmp_path / "nope", name)
    # models:/ references resolve to versions; a missing name or alias is one line naming it
    assert str(registry.resolve_version(client, f"models:/{name}/latest").version) == "2"
    assert str(registry.resolve_version(client, f"models:/{name}@best").version) == "1"
    with pytest.raises(TrackingError, match=rf"'models:/{name}@nope': not in the model registry.*aliases \['best'\]"):
        registry.resolve_version(client, f"models:/{name}@nope")
    with pytest.raises(TrackingError, match="'models:/no-such-model/1': not in the model registry"):
        registry.resolve_version(client, "models:/no-such-model/1")
    assert [str(v.version) for v in registry.versions_of_run(client, name, run_id)] == ["2", "1"]
    runs.finish_run(client, run_id, "FINISHED")


def test_register_alias_download_round_trip(mlflow_uri, tmp_path):
    _register_round_trip(mlflow_uri, tmp_path, "elf-ckpt")


def test_ui_links_open_the_model_training_view(mlflow_uri):
    cmd = ui.ui_command(mlflow_uri, "3", "abc123")
    first, second = cmd.splitlines()
    assert first == (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {mlflow_uri} "
                     "--host 127.0.0.1 --port 5000 --workers 1")  # fmt: skip
    assert second == "then open http://127.0.0.1:5000/#/experiments/3/runs/abc123?workflowType=machine_learning"
    assert ui.ui_command("http://h:8080/", "3", "r") == \
        "open http://h:8080/#/experiments/3/runs/r?workflowType=machine_learning"
    assert ui.run_url("http://h", "3", "r", "model-metrics").endswith("/runs/r/model-metrics?workflowType=machine_learning")
    assert ui.ui_command("sqlite:////a b/m.db").startswith(
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri 'sqlite:////a b/m.db'"
    )


# ---- a real tracking server over HTTP -----------------------------------------------------------
@pytest.mark.integration
def test_logging_through_http_server(mlflow_server, tmp_path):
    uri = mlflow_server
    t0 = time.monotonic()
    store.check_tracking_reachable(uri)
    assert time.monotonic() - t0 < 5
    client = make_client(uri)
    eid = runs.ensure_experiment("elf/http", uri)
    assert client.get_experiment(eid).artifact_location.startswith("mlflow-artifacts:/")
    run_id = _run(client, eid, "http-run")
    assert runs.log_params(client, run_id, {f"k.{i}": i for i in range(150)}) == 150
    with MetricsLogger(run_id, client, flush_every_n=10) as ml:
        for step in range(25):
            ml.log({"loss": 1.0 / (step + 1), "tokens_per_s": 100.0 + step}, step=step)
    assert ml.flushes == 3
    _register_round_trip(uri, tmp_path, "elf-http")
    runs.finish_run(client, run_id, "FINISHED")

    fresh = MlflowClient(tracking_uri=uri)
    run = fresh.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "http-run"
    assert len(run.data.params) == 150 and run.data.params["k.149"] == "149"
    assert run.data.tags["elf.version.mlflow"] == mlflow.__version__
    hist = fresh.get_metric_history(run_id, "loss")
    assert [m.step for m in hist] == list(range(25)) and hist[-1].value == pytest.approx(1 / 25)

