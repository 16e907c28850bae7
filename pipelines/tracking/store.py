"""Where MLflow runs go and whether they can go there: the tracking URI (config, env or the default
absolute SQLite store), a fail-fast reachability check, clients, and the telemetry default.

Traps handled here (measured, ``shared/stack-notes.md``): MLflow 3 refuses the old ``./mlruns`` file
store and Ray workers / Tune trials run in other directories, so local stores must be absolute; an
unreachable ``http://`` server makes MLflow retry for minutes (7 retries, 120 s timeout), while
:func:`check_tracking_reachable` answers in about a second; telemetry is on by default and phones
home, so it is switched off unless the user set it (MLflow reads the switch at import time, hence
the env default before ``import mlflow``).
"""

from __future__ import annotations

import os

# Before the first ``import mlflow`` anywhere in this process (MLflow decides at import time).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import contextlib  # noqa: E402
import urllib.error  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

from mlflow import MlflowClient  # noqa: E402

from elf_core.errors import ElfError  # noqa: E402


class TrackingError(ElfError):
    """A tracking operation that cannot proceed; the message names the run / model / key at fault."""


class TrackingUnavailable(TrackingError):
    """The configured tracking store cannot be reached or written."""


def disable_telemetry_by_default() -> None:
    """``MLFLOW_DISABLE_TELEMETRY=true`` unless the user set it; re-initialise MLflow's telemetry
    client so the setting applies even if mlflow was imported before this module."""
    if "MLFLOW_DISABLE_TELEMETRY" not in os.environ:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    with contextlib.suppress(Exception):  # telemetry internals are not API; best effort by design
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()


def make_client(uri: str) -> MlflowClient:
    """A client whose tracking *and* registry stores are ``uri`` (no process-global state)."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def client_for(uri_or_client: str | MlflowClient) -> MlflowClient:
    """``uri_or_client`` itself when it is a client, else :func:`make_client` of the URI."""
    return uri_or_client if isinstance(uri_or_client, MlflowClient) else make_client(uri_or_client)


# ------------------------------------------------------------------------------------------------
# Where runs go


def default_tracking_uri(project_root: Path) -> str:
    """``sqlite:///<abs project_root>/mlruns/mlflow.db`` (four slashes: the path is absolute)."""
    return "sqlite:///" + str((Path(project_root).resolve() / "mlruns" / "mlflow.db"))


def resolve_tracking_uri(configured: str | None, project_root: Path | None = None) -> str:
    """The tracking URI to use: ``configured`` (the config's value), else ``$MLFLOW_TRACKING_URI``,
    else :func:`default_tracking_uri` under ``project_root`` (default: ELF Lab's root,
    :func:`pipelines.infra.paths.runs_root`). Local stores must be absolute (workers and Tune trials
    run with other working directories); a relative one is an error naming where it came from."""
    if project_root is None:
        from pipelines.infra.paths import runs_root

        project_root = runs_root()
    disable_telemetry_by_default()
    if configured:
        uri, origin = str(configured).strip(), "the config's tracking URI"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri, origin = os.environ["MLFLOW_TRACKING_URI"].strip(), "MLFLOW_TRACKING_URI"
    else:
        return default_tracking_uri(project_root)

    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        # sqlite:///rel.db -> path "/rel.db" (relative); sqlite:////abs.db -> "//abs.db" (absolute)
        db = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
        if db and db != ":memory:" and not db.startswith("/"):
            raise TrackingError(
                f"tracking URI {uri!r} (from {origin}) is a relative SQLite path; Ray workers and "
                f"Tune trials run in other directories. Use an absolute one, e.g. "
                f"'sqlite:///{(Path(project_root).resolve() / db)}'."
            )
    elif parsed.scheme in ("", "file") and not Path(parsed.path or uri).is_absolute():
        raise TrackingError(
            f"tracking URI {uri!r} (from {origin}) is a relative file-store path; MLflow 3 refuses "
            f"file stores and workers run in other directories. Use e.g. "
            f"{default_tracking_uri(project_root)!r}."
        )
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if db in ("", ":memory:") else Path(db)


@contextlib.contextmanager
def quick_http_env(timeout_s: float) -> Iterator[None]:
    """Within the block, MLflow's HTTP client retries once at most and times out after
    ``timeout_s`` (defaults: 7 retries with backoff, 120 s timeout). Restores the user's values."""
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(round(timeout_s)))),
    }
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _server_hint(uri: str) -> str:
    port = urllib.parse.urlparse(uri).port or 5000
    return (
        "start it with `MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --backend-store-uri "
        f"sqlite:///ABS/PATH/mlflow.db --host 127.0.0.1 --port {port} --workers 1` "
        "or unset MLFLOW_TRACKING_URI / the config's tracking URI to log to a local SQLite store"
    )


def check_tracking_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with one message, if runs cannot be logged to ``uri``.

    http(s): ``GET <uri>/health`` then one REST call through MLflow with :func:`quick_http_env`
    (catches wrong path prefixes and authentication problems); raises :class:`TrackingUnavailable`
    naming the URI. sqlite: creates the database's directory and checks it is writable.
    Other schemes (databricks, postgresql, …) are left to MLflow.
    """
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout_s) as resp:  # noqa: S310
                status = resp.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnavailable(
                f"MLflow tracking server at {uri} is not reachable ({reason}); {_server_hint(uri)}."
            ) from None
        if status != 200:
            raise TrackingUnavailable(
                f"MLflow tracking server at {uri} answered HTTP {status} on {health}; is this an "
                f"MLflow server? {_server_hint(uri)}."
            )
        with quick_http_env(timeout_s):
            try:
                make_client(uri).search_experiments(max_results=1)
            except Exception as e:  # MlflowException, requests errors: all mean "cannot log here"
                msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                raise TrackingUnavailable(
                    f"MLflow tracking server at {uri} is up but its REST API failed ({msg}); check "
                    "the URI's path prefix and credentials (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN)."
                ) from None
    elif scheme == "sqlite":
        db = sqlite_path(uri)
        if db is None:
            return
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingUnavailable(
                f"cannot create the directory of the MLflow store {uri} ({e})"
            ) from None
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingUnavailable(f"the MLflow store {uri} is not writable by this user")
