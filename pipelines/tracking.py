"""MLflow tracking for ELF runs (MLflow 3.x, rank 0 only): URIs, experiments, runs, params, metrics,
checkpoints as registered model versions, and the command that opens the UI on a run.

Traps this module absorbs (measured, see ``shared/stack-notes.md``):

* MLflow >= 3.13 refuses the old ``./mlruns`` file store, and every default is relative to the
  current directory while Tune trials / Ray workers run elsewhere: the default store is an
  *absolute* SQLite file and experiments get an explicit absolute ``artifact_location``.
* An unreachable ``http://`` server makes MLflow retry for minutes (7 retries, 120 s timeout);
  :func:`check_tracking_reachable` fails in about a second with one message instead.
* Per-call HTTP logging is slow: params and metrics go through ``log_batch`` in MLflow's chunk
  limits (100 params/tags, 1000 metrics per call).
* The alias ``latest`` is reserved by MLflow 3.17 (``set_registered_model_alias`` raises);
  ``models:/<name>/latest`` already resolves to the newest version.
* Telemetry is on by default and phones home; it is switched off here unless the user set it.
  MLflow reads the switch when it is first imported, hence the env default before ``import mlflow``.
"""

from __future__ import annotations

import os

# Before the first ``import mlflow`` anywhere in this process (MLflow decides at import time).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import contextlib  # noqa: E402
import importlib.metadata  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import posixpath  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator, Mapping, Sequence  # noqa: E402

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation, 3.17): per log_batch call and per value.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE_LEN = 6000
MAX_TAG_VALUE_LEN = 8000
MAX_KEY_LEN = 250
# MLflow's accepted key characters (minus ':' which Windows stores refuse).
_KEY_RE = re.compile(r"^[/\w.\- ]+$")

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
PROVENANCE_PACKAGES = ("torch", "transformers", "datasets", "ray", "mlflow", "elf-lab")


from pipelines.tracking_store import (  # noqa: E402,F401  (re-exported: callers use tracking.X)
    TrackingError, TrackingUnavailable, _client, check_tracking_reachable, default_tracking_uri,
    disable_telemetry_by_default, make_client, quick_http_env, resolve_tracking_uri, sqlite_path)


# ------------------------------------------------------------------------------------------------
# Experiments and runs


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "experiment"


def ensure_experiment(
    name: str, uri: str | MlflowClient, artifact_root: Path | None = None
) -> str:
    """The id of experiment ``name``, created if missing.

    New experiments get ``artifact_location = <artifact_root>/<slug(name)>`` (absolute file URI);
    with ``artifact_root=None`` that is ``<dir of the sqlite db>/artifacts/<slug>`` for SQLite
    stores, and the server's default (e.g. ``mlflow-artifacts:/``) for servers. An existing
    experiment keeps its location; a deleted one is an error (MLflow keeps its name reserved).
    """
    client = _client(uri)
    store_uri = uri if isinstance(uri, str) else client.tracking_uri
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {name!r} (id {exp.experiment_id}) is deleted; restore it with "
                f"`mlflow experiments restore --experiment-id {exp.experiment_id}` (with "
                f"MLFLOW_TRACKING_URI={store_uri}) or use another experiment name."
            )
        return exp.experiment_id

    location: str | None = None
    if artifact_root is not None:
        location = (Path(artifact_root).resolve() / _slug(name)).as_uri()
    else:
        db = sqlite_path(store_uri)
        if db is not None:
            location = (db.resolve().parent / "artifacts" / _slug(name)).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        # Another process (a concurrent trial) created it between our get and create.
        exp = client.get_experiment_by_name(name)
        assert exp is not None
        return exp.experiment_id


def _stringify(value: Any, limit: int) -> str:
    s = "None" if value is None else str(value)
    if len(s) > limit:
        note = f"...[truncated, {len(s)} chars]"
        s = s[: limit - len(note)] + note
    return s


def _check_key(key: str, what: str) -> str:
    key = str(key)
    if len(key) > MAX_KEY_LEN or not _KEY_RE.match(key) or posixpath.normpath(key) != key:
        raise ValueError(
            f"{what} name {key!r} is not accepted by MLflow: at most {MAX_KEY_LEN} characters of "
            "letters, digits, '_', '-', '.', ' ', '/', and no empty or '..' path parts"
        )
    return key


def start_or_resume_run(
    experiment_id: str,
    run_name: str,
    uri: str | MlflowClient,
    tags: Mapping[str, Any] | None = None,
    *,
    resume: bool = True,
) -> str:
    """The id of the run to log to: the newest run named ``run_name`` in the experiment if it is
    not FINISHED (RUNNING after a dead driver, FAILED, KILLED — a re-submitted job continues it;
    it is set back to RUNNING and its ``elf.resume_count`` tag incremented), else a new run.
    ``resume=False`` always starts a new run. ``tags`` are set either way (stringified)."""
    client = _client(uri)
    if "'" in run_name and '"' in run_name:
        raise ValueError(f"run name {run_name!r} cannot contain both ' and \" (MLflow filter syntax)")
    quote = '"' if "'" in run_name else "'"
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"attributes.run_name = {quote}{run_name}{quote} and attributes.status != 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    str_tags = {str(k): _stringify(v, MAX_TAG_VALUE_LEN) for k, v in (tags or {}).items()}
    for run in runs if resume else []:
        run_id = run.info.run_id
        count = int(run.data.tags.get("elf.resume_count", "0")) + 1
        client.update_run(run_id, status="RUNNING")
        _log_tags(client, run_id, {**str_tags, "elf.resume_count": str(count)})
        log.info("resuming MLflow run %s (%s, was %s)", run_id, run_name, run.info.status)
        return run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=str_tags)
    return run.info.run_id


def _log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    items = [RunTag(k, v) for k, v in tags.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=items[i : i + MAX_PARAMS_PER_BATCH])


def provenance_tags(project_root: Path | None = None) -> dict[str, str]:
    """Tags that say what produced a run: git commit and dirty flag of ``project_root`` (default:
    this checkout; ``$ELF_GIT_SHA`` overrides where no ``.git`` travels, e.g. some job uploads),
    package versions, hostname, Python version."""
    root = Path(project_root) if project_root is not None else Path(__file__).resolve().parents[1]
    tags: dict[str, str] = {
        "elf.hostname": socket.gethostname(),
        "elf.python": platform.python_version(),
    }
    for pkg in PROVENANCE_PACKAGES:
        try:
            tags[f"elf.version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            tags[f"elf.version.{pkg}"] = "not installed"

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "git failed")
        return out.stdout.strip()

    sha = os.environ.get("ELF_GIT_SHA", "").strip()
    try:
        if not sha:
            sha = git("rev-parse", "HEAD")
        # Tracked files only: an untracked .venv or data dir should not make every run "dirty".
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        tags["elf.git.dirty"] = str(dirty).lower()
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        tags["elf.git.dirty"] = "unknown"
        if not sha:
            tags["elf.git.error"] = _stringify(f"{root}: {e}", 500)
    if sha:
        tags["elf.git.sha"] = sha
        tags["mlflow.source.git.commit"] = sha  # shown by the MLflow UI
    return tags


# ------------------------------------------------------------------------------------------------
# Params and metrics


def log_params_flat(run_id: str, flat: Mapping[str, Any], client: str | MlflowClient) -> int:
    """Log ``{"model.depth": 12, ...}`` as params in batches of 100. Values are stringified
    (``None`` -> ``"None"``) and cut to 6000 characters with a visible ``...[truncated, N chars]``.
    Re-logging identical values (a resumed run) is fine; different values raise
    :class:`TrackingError` naming them. Returns the number of params logged."""
    client = _client(client)
    params = [
        Param(_check_key(k, "param"), _stringify(v, MAX_PARAM_VALUE_LEN)) for k, v in flat.items()
    ]
    for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
        try:
            client.log_batch(run_id, params=params[i : i + MAX_PARAMS_PER_BATCH])
        except MlflowException as e:
            if "Changing param values is not allowed" in str(e):
                raise TrackingError(
                    f"MLflow run {run_id} already has different values for some params (was the "
                    f"config changed before resuming? start a new run name instead): {e.message}"
                ) from None
            raise
    return len(params)


class MetricsLogger:
    """Buffers metrics and sends them with ``log_batch``: every ``flush_every_n`` calls to
    :meth:`log`, when ``flush_every_s`` seconds passed since the last flush, when 1000 values are
    waiting, and on :meth:`close` (also as a context manager). One HTTP round trip per flush
    instead of one per value."""

    def __init__(
        self,
        run_id: str,
        client: str | MlflowClient,
        flush_every_n: int = 20,
        flush_every_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if flush_every_n < 1 or flush_every_s <= 0:
            raise ValueError("flush_every_n must be >= 1 and flush_every_s > 0")
        self.run_id = run_id
        self.client = _client(client)
        self.flush_every_n = flush_every_n
        self.flush_every_s = flush_every_s
        self._clock = clock
        self._buffer: list[Metric] = []
        self._calls = 0
        self._last_flush = clock()
        self._closed = False
        self.flushes = 0  # number of log_batch round trips so far (for tests / diagnostics)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue ``metrics`` (name -> number; tensors / numpy scalars are converted) at ``step``."""
        if self._closed:
            raise TrackingError(f"MetricsLogger for run {self.run_id} is closed")
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            try:
                value = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"metric {k!r} at step {step} is not a number: {v!r}") from None
            self._buffer.append(Metric(_check_key(k, "metric"), value, ts, int(step)))
        self._calls += 1
        if (
            self._calls >= self.flush_every_n
            or len(self._buffer) >= MAX_METRICS_PER_BATCH
            or self._clock() - self._last_flush >= self.flush_every_s
        ):
            self.flush()

    def flush(self) -> int:
        """Send what is buffered; returns how many values were sent."""
        sent = len(self._buffer)
        while self._buffer:
            chunk = self._buffer[:MAX_METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=chunk)
            del self._buffer[: len(chunk)]
            self.flushes += 1
        self._calls = 0
        self._last_flush = self._clock()
        return sent

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# Checkpoints as model versions


def run_artifact_uri(run_id: str, client: str | MlflowClient, artifact_path: str = "") -> str:
    base = _client(client).get_run(run_id).info.artifact_uri.rstrip("/")
    return f"{base}/{artifact_path.strip('/')}" if artifact_path else base


def registered_model_name(experiment: str) -> str:
    """A registry name for an experiment's models: ``elf/owt`` -> ``elf-owt`` (MLflow forbids '/'
    and ':' in model names, and ``models:/a/b/latest`` would not parse)."""
    return _slug(experiment)


def log_checkpoint_model(
    run_id: str,
    checkpoint_dir: Path,
    registered_name: str,
    client: str | MlflowClient,
    alias: str | None = None,
    *,
    files: Sequence[str] | None = None,
    artifact_path: str = "checkpoint",
    tags: Mapping[str, Any] | None = None,
) -> str:
    """Log ``checkpoint_dir`` as run artifacts under ``artifact_path`` and register it as a new
    version of ``registered_name`` (created if missing); returns the version number as a string.

    ``files`` limits what is logged (e.g. weights + config, not the optimizer state). ``alias``
    (e.g. ``"best"``) points ``models:/<name>@<alias>`` at the version; ``models:/<name>/latest``
    needs none — MLflow reserves the alias ``latest`` and this raises if asked for it.
    ``mlflow.artifacts.download_artifacts("models:/<name>/<version>")`` gives the files back.
    """
    client = _client(client)
    ckpt = Path(checkpoint_dir)
    if "/" in registered_name or ":" in registered_name or not registered_name.strip():
        raise ValueError(
            f"registered model name {registered_name!r}: MLflow forbids '/' and ':' "
            "(use e.g. 'elf-local' for experiment 'elf/local')"
        )
    if alias is not None and alias.strip().lower() == "latest":
        raise ValueError(
            "MLflow reserves the model alias 'latest'; `models:/<name>/latest` already resolves to "
            "the newest version. Pass another alias (e.g. 'last' or 'best') or none."
        )
    if not ckpt.is_dir() or not any(ckpt.iterdir()):
        raise FileNotFoundError(f"checkpoint directory {ckpt} is missing or empty")
    if files is None:
        client.log_artifacts(run_id, str(ckpt), artifact_path)
    else:
        missing = [f for f in files if not (ckpt / f).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {ckpt} lacks {missing}")
        for f in files:
            sub = posixpath.dirname(f)
            client.log_artifact(run_id, str(ckpt / f), posixpath.join(artifact_path, sub) if sub else artifact_path)

    source = run_artifact_uri(run_id, client, artifact_path)
    try:
        client.get_registered_model(registered_name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        with contextlib.suppress(MlflowException):  # a concurrent creator is fine
            client.create_registered_model(registered_name)
    mv = client.create_model_version(
        registered_name,
        source=source,
        run_id=run_id,
        tags={str(k): _stringify(v, MAX_TAG_VALUE_LEN) for k, v in (tags or {}).items()} or None,
    )
    deadline = time.monotonic() + 60
    while mv.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
        time.sleep(0.2)
        mv = client.get_model_version(registered_name, mv.version)
    if mv.status != "READY":
        raise TrackingError(
            f"model version {registered_name}/{mv.version} is {mv.status}: {mv.status_message}"
        )
    if alias:
        client.set_registered_model_alias(registered_name, alias, mv.version)
    return str(mv.version)


# ------------------------------------------------------------------------------------------------
# Ending runs


def finish_run(run_id: str, status: str, client: str | MlflowClient) -> None:
    """Mark the run FINISHED, FAILED or KILLED (sets its end time). Call it from ``finally``."""
    if status not in RUN_STATUSES:
        raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
    _client(client).set_terminated(run_id, status)


def status_for_exception(exc: BaseException | None) -> str:
    """FINISHED for no exception (or ``SystemExit(0)``), KILLED for Ctrl-C / SIGTERM / other
    ``SystemExit``, FAILED for everything else."""
    if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
        return "FINISHED"
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return "KILLED"
    return "FAILED"


@contextlib.contextmanager
def run_guard(
    run_id: str, client: str | MlflowClient, *, handle_sigterm: bool = True
) -> Iterator[None]:
    """Ends the run with :func:`status_for_exception` whatever happens in the block (re-raising).

    With ``handle_sigterm`` (main thread only) SIGTERM — what ``ray job stop`` and schedulers send
    — becomes ``SystemExit(143)`` inside the block, so the run ends KILLED instead of staying
    RUNNING; the previous handler is restored afterwards. Only SIGKILL leaves a RUNNING run, which
    :func:`start_or_resume_run` then resumes."""
    client = _client(client)
    previous: Any = None
    installed = handle_sigterm and threading.current_thread() is threading.main_thread()
    if installed:

        def _on_sigterm(signum: int, frame: object) -> None:
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    error: BaseException | None = None
    try:
        yield
    except BaseException as e:
        error = e
        raise
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)
        finish_run(run_id, status_for_exception(error), client)


# ------------------------------------------------------------------------------------------------
# Where to look


def run_url(base_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """The UI page of a run (the runs table if ``run_id`` is None). Note ``#/experiments/<id>``
    alone opens a GenAI overview with no runs in MLflow 3.17."""
    path = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base_url.rstrip('/')}/{path}"


def ui_command(
    uri: str, experiment_id: str | None = None, run_id: str | None = None, port: int = 5000
) -> str:
    """What a user runs to see the run: for a local store, the lean ``mlflow ui`` command line
    followed by the URL to open; for a server, just the URL."""

    if urllib.parse.urlparse(uri).scheme in ("http", "https"):
        return f"open {run_url(uri, experiment_id, run_id)}" if experiment_id else f"open {uri}"
    cmd = (
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri "
        f"{shlex.quote(uri)} --host 127.0.0.1 --port {int(port)} --workers 1"
    )
    if experiment_id:
        cmd += f"\nthen open {run_url(f'http://127.0.0.1:{int(port)}', experiment_id, run_id)}"
    return cmd

