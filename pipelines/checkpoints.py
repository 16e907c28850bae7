"""The one checkpoint resolver of ELF Lab: every consumer — train's resume, evaluate, the sampling
shards, the frontier sweep, the scaling ablation — turns a checkpoint reference into a local
directory plus provenance here, and every listing, rotation and retirement of a run's stored
checkpoints happens here.

References :func:`resolve` accepts:

* an ELF Lab checkpoint directory (``meta.json`` + weights + ``config.yaml``);
* a training run's storage directory (``outputs/ray/<name>``): its newest complete checkpoint;
* ``s3://…``, ``gs://…`` or any pyarrow URI of either of those (downloaded through pyarrow);
* ``models:/<name>/<version>``, ``models:/<name>/latest``, ``models:/<name>@<alias>`` and
  ``runs:/<run id>[/<path>]`` (default path ``checkpoint``), downloaded with
  ``mlflow.artifacts.download_artifacts``;
* an official ELF checkpoint (a ``checkpoint_<step>`` file, a directory of them, or a hub id).

It yields a :class:`ResolvedCheckpoint`: the local directory, the step, EMA or raw weights, the
training run that wrote it (``meta.json``'s ``run`` record, or the model version's run), the model
version, and ``pinned`` — a reference that resolves to exactly the same files later (what Ray
workers are given: ``models:/x/latest`` may move, ``models:/x/3`` does not).

A run's storage holds ``<storage>/<name>/attempt-*/checkpoint_*`` (one attempt per submission).
A checkpoint is *complete* when its ``meta.json`` is there and every file it needs is there with
the size ``meta.json`` recorded: a local checkpoint is renamed into place atomically, but Ray copies
files into storage one by one, so an interrupted copy can leave ``meta.json`` without the weights.
Hidden names (``.retired``, temp / being-deleted directories) are never checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional
from urllib.parse import urlsplit

from elf_core.checkpoint import CONFIG_FILE, EMA_FILE, META_FILE, MODEL_FILE, STATE_FILE, CheckpointError, parse_meta
from elf_core.config import ExperimentConfig, from_yaml_text
from elf_core.ema import ema_is_warm
from pipelines.infra import filesystems as fsx

LIGHT_FILES = (META_FILE, CONFIG_FILE)  # enough to know a checkpoint's step, config and run
RETIRED_DIR = ".retired"


@dataclass(frozen=True)
class StoredCheckpoint:
    """A complete checkpoint in a run's storage."""

    step: int
    location: str  # local path or URI of the checkpoint directory
    meta: dict = field(hash=False, compare=False)

    @property
    def attempt(self) -> str:
        """The attempt directory's name (``""`` for a checkpoint directly under the run root). A URI's
        ``?query`` (``endpoint_override=…``) is not part of the path."""
        path = urlsplit(self.location).path if "://" in self.location else self.location
        parent = posixpath.basename(posixpath.dirname(path.rstrip("/")))
        return parent if parent.startswith("attempt-") else ""

    @property
    def run_record(self) -> dict:
        return dict(self.meta.get("run") or {})


def incomplete_reason(meta: Mapping, present: Mapping[str, int]) -> Optional[str]:
    """Why a checkpoint whose ``meta.json`` says ``meta`` and whose directory holds ``present``
    (file name -> size) is not complete, or None when it is."""
    required = [MODEL_FILE, STATE_FILE, CONFIG_FILE] + ([EMA_FILE] if meta.get("has_ema") else [])
    recorded = dict(meta.get("file_sizes") or {})
    missing = [n for n in dict.fromkeys(required + list(recorded)) if n not in present]
    if missing:
        return f"{', '.join(missing)} missing (an interrupted copy?)"
    for name, size in recorded.items():
        if present[name] != size:
            return f"{name} is {present[name]} bytes but {META_FILE} recorded {size} (an interrupted copy?)"
    return None


def _report_incomplete(location: str, reason: str) -> None:
    print(f"[elf] skipping incomplete checkpoint {fsx.redact(location)}: {reason}", file=sys.stderr, flush=True)


def list_checkpoints(root: str | Path, on_incomplete: Callable[[str, str], None] = _report_incomplete
                     ) -> list[StoredCheckpoint]:
    """Complete checkpoints directly under ``root`` or one level down (``attempt-*/checkpoint_*``),
    ascending by step. A ``meta.json`` that does not parse is an error, not a skip, so a damaged
    newest checkpoint is never silently passed over for an older one."""
    files: dict[tuple[str, ...], dict[str, int]] = {}
    for rel, size in fsx.list_files(root, "list checkpoints").items():
        *dirs, name = rel.split("/")
        if 1 <= len(dirs) <= 2 and not any(d.startswith(".") for d in dirs):
            files.setdefault(tuple(dirs), {})[name] = size
    found = []
    for dirs, present in sorted(files.items()):
        if META_FILE not in present or (len(dirs) == 2 and META_FILE in files.get(dirs[:1], {})):
            continue  # not a checkpoint, or a directory inside one
        location = fsx.child(root, *dirs)
        meta_at = fsx.child(location, META_FILE)
        meta = parse_meta(fsx.read_text(meta_at, "read checkpoint metadata"), fsx.redact(meta_at))
        reason = incomplete_reason(meta, present)
        if reason is not None:
            on_incomplete(location, reason)
            continue
        found.append(StoredCheckpoint(meta["step"], location, meta))
    return sorted(found, key=lambda c: (c.step, c.location))


def newest_checkpoint(root: str | Path) -> Optional[StoredCheckpoint]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _delete(location: str) -> None:
    """Delete a directory; locally it is first renamed to a hidden name, so a half-deleted
    directory can never look like a checkpoint."""
    if fsx.is_uri(location):
        fsx.delete_dir(location, "delete an old checkpoint")
        return
    path = Path(location)
    doomed = path.parent / f".{path.name}.del-{uuid.uuid4().hex[:12]}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _attempt_dirs(root: str | Path) -> list[str]:
    """The non-hidden top-level directories of a run root (its attempts)."""
    return [d for d in fsx.list_dirs(root, "list attempts") if not d.startswith(".")]


def rotate_checkpoints(root: str | Path, keep: int, *, protect: Iterable[str] = ()) -> list[str]:
    """Keep the ``keep`` newest complete checkpoints (by step) over all attempts of a run; delete the
    others except those in ``protect`` (e.g. a checkpoint being evaluated). Attempts left without a
    checkpoint are removed too. Returns the deleted locations."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    found = list_checkpoints(root, on_incomplete=lambda *_: None)
    protected = {str(p).rstrip("/") for p in protect}
    removed = []
    for ckpt in found[:-keep]:
        if ckpt.location.rstrip("/") not in protected:
            _delete(ckpt.location)
            removed.append(ckpt.location)
    alive = {c.attempt for c in found if c.location not in removed}
    for attempt in _attempt_dirs(root):
        if attempt not in alive and attempt.startswith("attempt-"):
            _delete(fsx.child(root, attempt))
    return removed


def retire_run(root: str | Path) -> str:
    """``--fresh``: make every earlier attempt of a run impossible to resume. Locally they are moved
    aside into ``<root>/.retired/<time>/`` (a rename: nothing is copied or lost); on object storage,
    where a move is a copy, they are deleted. Returns the one line that says which."""
    attempts = _attempt_dirs(root)
    ckpts = list_checkpoints(root, on_incomplete=lambda *_: None)
    if not attempts:
        return f"--fresh: no earlier attempts under {fsx.redact(str(root))}"
    what = (f"{len(attempts)} earlier attempt(s) ({len(ckpts)} checkpoint(s)"
            + (f", the newest at step {ckpts[-1].step}" if ckpts else "") + ")")
    if fsx.is_uri(root):
        for attempt in attempts:
            fsx.delete_dir(fsx.child(root, attempt), "delete an earlier attempt (--fresh)")
        return f"--fresh: deleted {what} under {fsx.redact(str(root))}; they can never be resumed"
    aside = Path(root) / RETIRED_DIR / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for attempt in attempts:
        os.replace(Path(root) / attempt, aside / attempt)
    return f"--fresh: moved {what} aside to {aside}; they will never be resumed (delete it to free the space)"


# ------------------------------------------------------------------------------------------------
# Resolving a reference


@dataclass
class ResolvedCheckpoint:
    """A checkpoint reference turned into files on this machine, with where it came from."""

    spec: str  # what was asked for
    path: Path  # local checkpoint directory (official: the file / directory / hub id as given)
    kind: str  # "elf-lab" | "official"
    step: int
    weights: str  # "ema" | "raw"
    pinned: str  # a reference to exactly these files
    config: Optional[ExperimentConfig] = None  # None for official checkpoints (the task decides)
    meta: dict = field(default_factory=dict)
    training_run_id: Optional[str] = None
    training_run_source: str = ""  # how training_run_id was found
    model_version: Optional[str] = None  # "name/version" for models:/ references


def choose_weights(use_ema: Optional[bool], has_ema: bool, step: int, decay: float, where: str) -> str:
    """``ema`` or ``raw``: ``use_ema=None`` takes the EMA once it has forgotten its random start
    (step ≥ 1/(1 − decay)); asking for EMA weights a checkpoint lacks is an error."""
    if use_ema and not has_ema:
        raise CheckpointError(f"{where}: EMA weights were asked for, but the checkpoint has none")
    take = (has_ema and ema_is_warm(step, decay)) if use_ema is None else bool(use_ema)
    return "ema" if take else "raw"


def _official(spec: str, use_ema: Optional[bool]) -> ResolvedCheckpoint:
    m = re.search(r"checkpoint_(\d+)", spec)
    return ResolvedCheckpoint(spec=spec, path=Path(spec), kind="official", step=int(m.group(1)) if m else -1,
                              weights="raw" if use_ema is False else "ema", pinned=spec)


def _from_dir(spec: str, local: Path, use_ema: Optional[bool], pinned: str, **prov: Any) -> ResolvedCheckpoint:
    """A downloaded or local ELF Lab checkpoint directory with its ``meta.json`` and ``config.yaml``."""
    for name in LIGHT_FILES:
        if not (local / name).is_file():
            raise CheckpointError(f"{spec}: {name} missing (not an ELF Lab checkpoint)")
    meta = parse_meta((local / META_FILE).read_text(), f"{spec} {META_FILE}")
    cfg = from_yaml_text((local / CONFIG_FILE).read_text(), origin=f"{spec} {CONFIG_FILE}")
    run_id = prov.pop("training_run_id", None) or (meta.get("run") or {}).get("mlflow_run_id")
    source = prov.pop("training_run_source", "") or ("meta.json run record" if run_id else "")
    return ResolvedCheckpoint(spec=spec, path=local, kind="elf-lab", step=int(meta["step"]), pinned=pinned,
                              weights=choose_weights(use_ema, bool(meta.get("has_ema")), int(meta["step"]),
                                                     cfg.optim.ema_decay, spec),
                              config=cfg, meta=meta, training_run_id=run_id, training_run_source=source, **prov)


def _download_mlflow(artifact_uri: str, files: Optional[tuple[str, ...]], dst: Path, tracking_uri: str) -> Path:
    import mlflow.artifacts

    if files is None:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst),
                                                        tracking_uri=tracking_uri))
    for name in files:
        mlflow.artifacts.download_artifacts(artifact_uri=f"{artifact_uri.rstrip('/')}/{name}", dst_path=str(dst),
                                            tracking_uri=tracking_uri)
    return dst


def _resolve_mlflow(spec: str, tracking_uri: str, files, use_ema, dst: Path) -> ResolvedCheckpoint:
    from mlflow.exceptions import MlflowException

    from pipelines.tracking.registry import resolve_version
    from pipelines.tracking.store import TrackingError, make_client

    if spec.startswith("models:/"):
        mv = resolve_version(make_client(tracking_uri), spec)
        source, prov = mv.source, dict(training_run_id=mv.run_id, training_run_source="model version run_id",
                                       model_version=f"{mv.name}/{mv.version}")
        pinned = f"models:/{mv.name}/{mv.version}"
    else:
        run_id, _, path = spec[len("runs:/"):].strip("/").partition("/")
        source, pinned = f"runs:/{run_id}/{path or 'checkpoint'}", spec
        prov = dict(training_run_id=run_id, training_run_source="runs:/ reference")
    try:
        local = _download_mlflow(source, files, dst, tracking_uri)
    except MlflowException as e:
        what = f"run {prov['training_run_id']} holds no checkpoint at {source}" if spec.startswith("runs:/") \
            else f"cannot download its files ({source})"
        raise TrackingError(f"'{spec}': {what}: {e.message.splitlines()[0][:300]}") from None
    if not (local / META_FILE).is_file():
        raise CheckpointError(f"'{spec}': {source} holds no ELF Lab checkpoint (no {META_FILE}); a training run's "
                              "checkpoint is its 'checkpoint' artifact (runs:/<run id>/checkpoint)")
    return _from_dir(spec, local, use_ema, pinned, **prov)


def _resolve_stored(spec: str, files, use_ema, dst: Path) -> ResolvedCheckpoint:
    """A local or URI checkpoint directory, or a run's storage directory (its newest checkpoint)."""
    location = spec if fsx.is_uri(spec) else str(Path(spec).expanduser())
    present = fsx.list_files(location, "open the checkpoint")
    if META_FILE not in present:
        newest = newest_checkpoint(location)
        if newest is None:
            raise CheckpointError(f"{fsx.redact(spec)}: no complete ELF Lab checkpoint there"
                                  + (f" ({MODEL_FILE} without {META_FILE}: incomplete?)" if MODEL_FILE in present else ""))
        location = newest.location
    if not fsx.is_uri(location):
        return _from_dir(spec, Path(location), use_ema, location)
    local = dst / fsx.basename(location)
    if files is None:
        fsx.download_dir(location, local, "download the checkpoint")
    else:
        here = fsx.list_files(location, "open the checkpoint")  # only the asked-for files it has (EMA is optional)
        fsx.download_files(location, tuple(n for n in files if n in here), local, "download the checkpoint")
    return _from_dir(spec, local, use_ema, location)


def _looks_local(spec: str) -> bool:
    head = Path(spec.split("/")[0]).expanduser()
    return spec.startswith(("/", ".", "~")) or (head.is_dir() and "/" in spec)


@contextlib.contextmanager
def resolve(spec: str, *, tracking_uri: Optional[str] = None, use_ema: Optional[bool] = None,
            files: Optional[tuple[str, ...]] = None) -> Iterator[ResolvedCheckpoint]:
    """Resolve ``spec`` (module docstring) to a local checkpoint for the duration of the block.
    ``files`` limits what is downloaded (e.g. :data:`LIGHT_FILES` to read the config only); remote
    downloads go to a temporary directory deleted afterwards. ``use_ema``: see :func:`choose_weights`."""
    spec = str(spec).strip()
    with tempfile.TemporaryDirectory(prefix="elf-ckpt-") as tmp:
        if spec.startswith(("models:/", "runs:/")):
            from pipelines.tracking.store import resolve_tracking_uri

            yield _resolve_mlflow(spec, resolve_tracking_uri(tracking_uri), files, use_ema, Path(tmp))
        elif fsx.is_uri(spec) or Path(spec).expanduser().is_dir() and _is_elf_lab_dir(Path(spec).expanduser()):
            yield _resolve_stored(spec, files, use_ema, Path(tmp))
        elif Path(spec).expanduser().exists() or not _looks_local(spec):
            yield _official(spec, use_ema)  # a file, a directory of checkpoint_<step> files, or a hub id
        else:
            raise CheckpointError(f"checkpoint not found: {Path(spec).expanduser()}")


def _is_elf_lab_dir(path: Path) -> bool:
    """A checkpoint directory, a run storage directory, or a half-written checkpoint (reported)."""
    return (path / META_FILE).is_file() or (path / MODEL_FILE).is_file() or bool(list_checkpoints(path, lambda *_: None))


def read_config(spec: str, tracking_uri: Optional[str] = None) -> Optional[ExperimentConfig]:
    """The experiment config saved with a checkpoint, reading only its light files (None: official)."""
    with resolve(spec, tracking_uri=tracking_uri, files=LIGHT_FILES) as r:
        return r.config


__all__ = ["StoredCheckpoint", "ResolvedCheckpoint", "list_checkpoints", "newest_checkpoint", "rotate_checkpoints",
           "retire_run", "resolve", "read_config", "choose_weights", "incomplete_reason", "LIGHT_FILES"]
