"""Shared pytest fixtures: one local Ray for the whole session, throw-away MLflow stores, a lean
local ``mlflow server``, and the environment every test runs with.

The env defaults come first, before anything imports ray or mlflow: both read some settings only
at import time (Ray's loopback switch, MLflow's telemetry switch). See ``shared/stack-notes.md``.

Fixtures:
  ``ray_local``      session: one local Ray (6 logical CPUs, 512 MiB object store, no dashboard,
                     own temp dir). Tests that use it are marked ``integration`` automatically.
  ``mlflow_uri``     function: absolute ``sqlite:///`` URI in ``tmp_path`` (copied from a
                     pre-initialised empty database: creating one costs ~2.5 s, a copy ~0.05 s).
  ``mlflow_server``  session: ``http://127.0.0.1:<free port>`` of a lean ``mlflow server`` with
                     proxied artifacts; booted at collection time when a selected test needs it,
                     stopped (SIGTERM to its process group) at the end.
An autouse check fails a test that leaves Ray CPUs held (a dead Train controller once kept them
and the next test waited forever) and restarts Ray so later tests still run.
"""

from __future__ import annotations

import os
import shutil
import tempfile

# ---- environment defaults (before any ray / mlflow import) --------------------------------------
_SESSION_TMP = tempfile.mkdtemp(prefix="elf-tests-")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_SESSION_TMP, "matplotlib"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Hermetic: a developer's shell may point at a real server / cluster / active run.
for _var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME",
             "MLFLOW_EXPERIMENT_ID", "RAY_ADDRESS"):
    os.environ.pop(_var, None)

import logging  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

import pytest  # noqa: E402

# The pipeline tests' tiny, fast training run (tiny ELF, MiniLM, 16-token rows, 2 DDP workers): 8 steps.
FAST_TRAIN_STEPS = 8
FAST_TRAIN = [
    "model.hidden_size=64", "model.depth=1", "data.max_length=16", "data.max_rows=4",
    "train.global_batch_size=8", f"train.max_steps={FAST_TRAIN_STEPS}", "train.log_every=1",
    "train.checkpoint_every=4", "optim.lr=3e-3", "optim.warmup_epochs=null", "optim.warmup_steps=1",
    "tracking.log_samples=2", "sample.steps=4", "sample.batch_size=2", "ray.num_workers=2", "ray.cpus_per_worker=1",
]
# How long Ray may take to release CPUs after a test (Train teardown measured ~4 s).
RAY_RELEASE_GRACE_S = float(os.environ.get("ELF_TEST_RAY_RELEASE_S", "20"))
# pytest's exit status, kept by pytest_sessionfinish for pytest_unconfigure.
_EXIT_STATUS: list[int] = []
# Fixtures whose use makes a test an integration test.
INTEGRATION_FIXTURES = {"ray_local", "mlflow_server"}


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Tests use tiny tensors: one intra-op thread is fastest on the shared 2-core machine (two threads
    measured up to ~100x slower under contention) and makes CPU matmuls bit-reproducible."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that starts Ray or an MLflow server ``integration`` (even if its author
    forgot), so ``-m "not integration"`` gives the fast unit suite."""
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Boot the MLflow server (~8-20 s) while the first tests run, if a selected test needs it."""
    if session.config.option.collectonly:
        return
    if any("mlflow_server" in getattr(item, "fixturenames", ()) for item in session.items):
        _MlflowServer.get()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))  # for pytest_unconfigure (the end of this file)
    # A server booted at collection whose tests never ran (-x, Ctrl-C) must not outlive pytest.
    if _MlflowServer._instance is not None:
        _MlflowServer._instance.stop()
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


def free_port() -> int:
    """A TCP port nothing listens on right now (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- Ray ----------------------------------------------------------------------------------------
class LocalRay:
    """The session's local Ray instance; restartable when a test leaves it unusable."""

    num_cpus = 6
    object_store_mb = 512

    def __init__(self) -> None:
        # Short path: Ray's unix sockets live under it (107-byte limit); not pytest's long tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="elf-ray-", dir="/tmp")
        self.session = None
        self.start()

    def start(self) -> None:
        from pipelines.infra.ray_env import init_ray

        self.session = init_ray(
            address="local",
            num_cpus=self.num_cpus,
            object_store_mb=self.object_store_mb,
            temp_dir=self.temp_dir,
        )

    def stop(self) -> None:
        import ray

        ray.shutdown()

    def restart(self) -> None:
        self.stop()
        self.start()


_LOCAL_RAY: LocalRay | None = None


@pytest.fixture(scope="session")
def ray_local() -> Iterator[LocalRay]:
    global _LOCAL_RAY
    local = _LOCAL_RAY = LocalRay()
    try:
        yield local
    finally:
        _LOCAL_RAY = None
        local.stop()
        shutil.rmtree(local.temp_dir, ignore_errors=True)


def ray_cpus_held_after(grace_s: float) -> tuple[float, float]:
    """(CPUs still held after waiting up to ``grace_s`` for them to be released, total CPUs)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.monotonic() + grace_s
    while True:
        held = total - ray.available_resources().get("CPU", 0.0)
        if held <= 1e-6:
            return 0.0, total
        if time.monotonic() >= deadline:
            return held, total
        time.sleep(0.25)


@pytest.fixture(autouse=True)
def _ray_cpus_released(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, all of Ray's CPUs must be free again within the grace period."""
    yield
    if "ray" not in sys.modules:
        return
    import ray

    if not ray.is_initialized():
        return
    held, total = ray_cpus_held_after(RAY_RELEASE_GRACE_S)
    if not held:
        return
    # Restart so the following tests do not wait forever on the held CPUs.
    if _LOCAL_RAY is not None:
        _LOCAL_RAY.restart()
    else:
        ray.shutdown()
    pytest.fail(
        f"{request.node.nodeid} left {held:g} of {total:g} Ray CPUs held "
        f"{RAY_RELEASE_GRACE_S:g} s after it ended (a Train controller / actor still alive?); "
        "Ray was restarted for the remaining tests.",
        pytrace=False,
    )


# ---- MLflow -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def _mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite database, created once per session."""
    from pipelines.tracking.store import make_client

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    make_client(f"sqlite:///{db}").search_experiments(max_results=1)
    return db


@pytest.fixture
def mlflow_uri(tmp_path: Path, _mlflow_db_template: Path) -> str:
    """``sqlite:///<tmp_path>/mlruns/mlflow.db`` — absolute, empty, private to the test."""
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True)
    shutil.copyfile(_mlflow_db_template, db)
    return f"sqlite:///{db}"


class _MlflowServer:
    """A lean local tracking server (stack-notes): 1 worker, no job execution, artifacts proxied
    through HTTP (``mlflow-artifacts:/``) as with a remote server. One per session, started early."""

    _instance: "_MlflowServer | None" = None

    @classmethod
    def get(cls) -> "_MlflowServer":
        if cls._instance is None:
            cls._instance = cls(Path(tempfile.mkdtemp(prefix="mlflow-server-", dir=_SESSION_TMP)))
        return cls._instance

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", (root / "artifacts").as_uri(),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        self.started = time.monotonic()
        with open(self.log_path, "wb") as log_file:
            # Own process group: teardown signals the server and its workers, nothing else.
            self.proc = subprocess.Popen(
                cmd, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.healthy_after_s: float | None = None

    def wait_healthy(self, timeout_s: float = 120.0) -> str:
        while self.healthy_after_s is None:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        self.healthy_after_s = time.monotonic() - self.started
                        break
            except OSError:
                pass
            if time.monotonic() - self.started > timeout_s:
                raise RuntimeError(
                    f"mlflow server not healthy after {timeout_s:g} s:\n{self.log_path.read_text()[-3000:]}"
                )
            time.sleep(0.25)
        return self.url

    def stop(self) -> None:
        _stop_group(self.proc)
        type(self)._instance = None


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[str]:
    """Base URL of the session's lean ``mlflow server``; SIGTERM to its process group at the end."""
    server = _MlflowServer.get()
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


def _stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group we started, SIGKILL it if it outlives ``grace_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    # The group's other members (uvicorn/gunicorn workers) may outlive the leader.
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=5)


# ---- S3 -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
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
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                               secret_key="testing", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir("ckpts")
        query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        yield fs, lambda path: f"s3://testing:testing@{path}{query}", f"http://127.0.0.1:{port}"
    finally:
        server.stop()




@pytest.fixture
def s3_env(s3, request, monkeypatch):
    """The standard AWS variables pointing at the moto server, in this process and in Ray's: Ray's
    processes keep the environment they started with, so the session's Ray is started now — or
    restarted if it runs already. This process's variables are restored afterwards; Ray is not
    restarted again (its processes keep AWS_* variables pointing at the moto server, which lives for
    the whole session, and a restart costs ~7 s)."""
    keys = {"AWS_ENDPOINT_URL": s3[2], "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in keys.items():  # restored after the test by monkeypatch
        monkeypatch.setenv(k, v)
    running = _LOCAL_RAY is not None
    ray_local = request.getfixturevalue("ray_local")
    if running:
        ray_local.restart()
    return s3


# ---- a tiny Gen-PPL evaluator ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def ev_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A one-layer GPT-2 over bytes (every text tokenises), saved with save_pretrained: loads in
    well under a second, so evaluations in tests cost sampling time only."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_layer=1, n_embd=16, n_head=2, n_positions=1024))
    d = tmp_path_factory.mktemp("evaluator") / "byte-gpt2"
    model.save_pretrained(d)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(d)
    return str(d)


# ---- exit -----------------------------------------------------------------------------------------
# One clean-clone run in seven (ci7, 2026-12-03) passed all 485 tests and then segfaulted while the
# interpreter finalised (C-extension threads of Ray / gRPC / torch torn down after the tests), which
# turns a green suite red. Once pytest has reported, leave with its own exit status and skip
# finalisation; every fixture, report and plugin teardown has already run by then.
@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _EXIT_STATUS and not hasattr(config, "workerinput"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
