"""The one MLflow run lifecycle of ELF Lab: experiments, create / reattach / guard / finish, params,
tags and provenance. Every entry point (train, evaluate, the frontier sweep and its trials, the
scaling ablation) opens its runs through :func:`tracked_run`, so a run is never left RUNNING by
Ctrl-C (SIGINT), SIGTERM (``ray job stop``, schedulers) or a crash: it ends KILLED or FAILED (with
the error as the ``elf.error`` tag). Only SIGKILL can leave one RUNNING.

Conventions (``shared/design.md``):

* Experiments carry ``mlflow.experimentKind=custom_model_development`` so MLflow 3.17's UI opens
  them in the model-training view rather than the GenAI one (Traces, Judges).
* Runs are found by id — the checkpoint or ledger that belongs to them records it — never by name.
* ``elf.kind`` says what produced a run: training | evaluation | frontier-sweep | sweep-trial |
  scaling-ablation. Child runs carry ``mlflow.parentRunId`` (the UI nests them).
* Params and tags go through ``MlflowClient.log_batch``, which splits batches to MLflow's limits.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import posixpath
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from mlflow import MlflowClient
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException

from pipelines.tracking.store import TrackingError, client_for

EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "elf.kind"
ERROR_TAG = "elf.error"
FAULT_ENV = "ELF_LAB_FAULT"  # test hook: the kind of run to crash inside (see tracked_run)
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
PROVENANCE_PACKAGES = ("torch", "transformers", "datasets", "ray", "mlflow", "elf-lab")
MAX_PARAM_VALUE_LEN, MAX_TAG_VALUE_LEN, MAX_KEY_LEN = 6000, 8000, 250  # mlflow.utils.validation (3.17)
_KEY_RE = re.compile(r"^[/\w.\- ]+$")  # MLflow's key characters, minus ':' which Windows stores refuse


def slug(text: str, fallback: str = "run") -> str:
    """``elf/local default`` -> ``elf-local-default``: letters, digits, ``._-`` (registry names, dirs)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or fallback


def stringify(value: Any, limit: int = MAX_TAG_VALUE_LEN) -> str:
    """``str(value)`` cut to ``limit`` characters with a visible ``...[truncated, N chars]``."""
    s = "None" if value is None else str(value)
    if len(s) > limit:
        note = f"...[truncated, {len(s)} chars]"
        s = s[: limit - len(note)] + note
    return s


def check_key(key: str, what: str) -> str:
    key = str(key)
    if len(key) > MAX_KEY_LEN or not _KEY_RE.match(key) or posixpath.normpath(key) != key:
        raise TrackingError(f"{what} name {key!r} is not accepted by MLflow: at most {MAX_KEY_LEN} characters of "
                            "letters, digits, '_', '-', '.', ' ', '/', and no empty or '..' path parts")
    return key


# ------------------------------------------------------------------------------------------------
# Experiments


def ensure_experiment(name: str, client: str | MlflowClient, artifact_root: Path | None = None) -> str:
    """The id of experiment ``name``, created if missing, tagged as a model-training experiment.

    New experiments get ``artifact_location = <artifact_root>/<slug(name)>`` (absolute file URI);
    with ``artifact_root=None`` that is ``<dir of the sqlite db>/artifacts/<slug>`` for SQLite
    stores and the server's default (e.g. ``mlflow-artifacts:/``) for servers. An existing
    experiment keeps its location; a deleted one is an error (MLflow keeps its name reserved).
    """
    from pipelines.tracking.store import sqlite_path

    client = client_for(client)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {name!r} (id {exp.experiment_id}) is deleted; restore it with "
                f"`mlflow experiments restore --experiment-id {exp.experiment_id}` (with MLFLOW_TRACKING_URI="
                f"{client.tracking_uri}) or use another experiment name.")
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    db = sqlite_path(client.tracking_uri)
    if artifact_root is not None:
        location = (Path(artifact_root).resolve() / slug(name)).as_uri()
    elif db is not None:
        location = (db.resolve().parent / "artifacts" / slug(name)).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # a concurrent trial created it first


def experiment_of(client: MlflowClient, run_id: str) -> str | None:
    """The experiment id of ``run_id``, or None when the store has no such run."""
    try:
        return client.get_run(run_id).info.experiment_id
    except MlflowException:
        return None


def jsonl(rows: list[dict]) -> str:
    """One JSON object per line, non-ASCII text kept as is: how samples are written everywhere."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def log_jsonl(client: MlflowClient, run_id: str, rows: list[dict], artifact_file: str) -> None:
    client.log_text(run_id, jsonl(rows), artifact_file)


def home_of(client: MlflowClient, training_run_id: str | None, fallback_experiment: str,
            *, note: str = "") -> tuple[str, str | None]:
    """``(experiment id, parent run id)`` for runs about a checkpoint (an evaluation, a sweep): the
    training run's experiment with the training run as parent when this store has it, else
    ``fallback_experiment`` and no parent (said on stderr with ``note`` as prefix, when the checkpoint
    names a training run this store lacks)."""
    exp_id = experiment_of(client, training_run_id) if training_run_id else None
    if exp_id is not None:
        return exp_id, training_run_id
    if training_run_id and note:
        print(f"{note} note: training run {training_run_id} is not in {client.tracking_uri}; logging to "
              f"'{fallback_experiment}' without a parent", file=sys.stderr)
    return ensure_experiment(fallback_experiment, client), None


# ------------------------------------------------------------------------------------------------
# Provenance, params, tags


def provenance_tags(project_root: Path | None = None) -> dict[str, str]:
    """What produced a run: git commit and dirty flag of ``project_root`` (default: this checkout;
    ``$ELF_GIT_SHA`` overrides where no ``.git`` travels, e.g. job uploads), package versions, host."""
    root = Path(project_root) if project_root is not None else Path(__file__).resolve().parents[2]
    tags = {"elf.hostname": socket.gethostname(), "elf.python": platform.python_version()}
    for pkg in PROVENANCE_PACKAGES:
        try:
            tags[f"elf.version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            tags[f"elf.version.{pkg}"] = "not installed"

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "git failed")
        return out.stdout.strip()

    sha = os.environ.get("ELF_GIT_SHA", "").strip()
    try:
        sha = sha or git("rev-parse", "HEAD")
        # Tracked files only: an untracked .venv or data dir should not make every run "dirty".
        tags["elf.git.dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        tags["elf.git.dirty"] = "unknown"
        if not sha:
            tags["elf.git.error"] = stringify(f"{root}: {e}", 500)
    if sha:
        tags["elf.git.sha"] = tags["mlflow.source.git.commit"] = sha  # the UI shows the latter
    return tags


def log_params(client: MlflowClient, run_id: str, flat: Mapping[str, Any]) -> int:
    """Log ``{"model.depth": 12, ...}`` as params (stringified, cut to 6000 characters). Re-logging
    identical values (a resumed run) is fine; a different value raises :class:`TrackingError`
    naming the run. Returns the number of params."""
    params = [Param(check_key(k, "param"), stringify(v, MAX_PARAM_VALUE_LEN)) for k, v in flat.items()]
    try:
        client.log_batch(run_id, params=params)
    except MlflowException as e:
        if "Changing param values is not allowed" in str(e):
            raise TrackingError(f"MLflow run {run_id} already has different values for some params: "
                                f"{e.message.splitlines()[0][:500]}") from None
        raise
    return len(params)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(check_key(k, "tag"), stringify(v)) for k, v in tags.items()])


# ------------------------------------------------------------------------------------------------
# The lifecycle


def create_run(client: MlflowClient, experiment_id: str, name: str, *, kind: str,
               parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None) -> str:
    """A new RUNNING run named ``name`` with provenance tags, ``elf.kind`` and an optional parent."""
    all_tags = {**provenance_tags(), KIND_TAG: kind, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    return client.create_run(experiment_id, run_name=name,
                             tags={k: stringify(v) for k, v in all_tags.items()}).info.run_id


def reattach_run(client: MlflowClient, run_id: str, tags: Mapping[str, Any] | None = None) -> str:
    """Set an existing run back to RUNNING (a resubmission, a resumed sweep) and count the resume."""
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise TrackingError(f"MLflow run {run_id} is not in {client.tracking_uri}: {e.message.splitlines()[0]}") from None
    count = int(run.data.tags.get("elf.resume_count", "0")) + 1
    client.update_run(run_id, status="RUNNING")
    set_tags(client, run_id, {**(tags or {}), "elf.resume_count": str(count)})
    return run_id


def status_for_exception(exc: BaseException | None) -> str:
    """FINISHED for no exception (or ``SystemExit(0)``), KILLED for Ctrl-C / SIGTERM / other
    ``SystemExit``, FAILED for everything else."""
    if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
        return "FINISHED"
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return "KILLED"
    return "FAILED"


def finish_run(client: MlflowClient, run_id: str, status: str, error: BaseException | None = None) -> None:
    """End the run FINISHED, FAILED or KILLED (sets its end time); a failure's message becomes ``elf.error``."""
    if status not in RUN_STATUSES:
        raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
    if error is not None and status != "FINISHED":
        with contextlib.suppress(Exception):  # the store may be what failed: ending the run matters more
            set_tags(client, run_id, {ERROR_TAG: stringify(f"{type(error).__name__}: {error}", 5000)})
    client.set_terminated(run_id, status)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM raises ``SystemExit(143)`` so ``finally`` blocks
    run; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class TrackedRun:
    """An open run: its id, and how it ends when the block exits normally (a sweep that was
    interrupted but handled it sets ``end_status = "KILLED"``)."""

    run_id: str
    end_status: str = "FINISHED"


@contextlib.contextmanager
def run_guard(client: MlflowClient, run_id: str) -> Iterator[TrackedRun]:
    """Ends ``run_id`` whatever happens in the block (re-raising): ``end_status`` when it exits
    normally, else :func:`status_for_exception` (KILLED for Ctrl-C / SIGTERM, FAILED for errors)."""
    run, error = TrackedRun(run_id), None
    try:
        with sigterm_as_exit():
            yield run
    except BaseException as e:
        error = e
        raise
    finally:
        finish_run(client, run_id, status_for_exception(error) if error is not None else run.end_status, error)


@contextlib.contextmanager
def tracked_run(client: MlflowClient, experiment_id: str, name: str, *, kind: str, reattach: str | None = None,
                parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None) -> Iterator[TrackedRun]:
    """Create a run (or reattach ``reattach``), yield it, and end it as :func:`run_guard` does.
    Tests crash any entry point inside its run with ``ELF_LAB_FAULT=<kind>``."""
    run_id = (reattach_run(client, reattach, tags) if reattach else
              create_run(client, experiment_id, name, kind=kind, parent_run_id=parent_run_id, tags=tags))
    with run_guard(client, run_id) as run:
        if os.environ.get(FAULT_ENV) == kind:
            raise RuntimeError(f"injected crash inside the {kind} run ({FAULT_ENV}={kind})")
        yield run


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Any]:
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=5000)


__all__ = ["ensure_experiment", "experiment_of", "home_of", "jsonl", "log_jsonl", "provenance_tags", "log_params", "set_tags", "create_run",
           "reattach_run", "finish_run", "status_for_exception", "run_guard", "tracked_run", "TrackedRun", "sigterm_as_exit",
           "child_runs", "slug", "stringify", "check_key", "RUN_STATUSES", "KIND_TAG", "PARENT_TAG", "ERROR_TAG"]
