"""Checkpoints of a training run kept under a URI storage (``s3://``, ``gs://``, ``file://`` — any
pyarrow filesystem URI): list the complete ones, and bring one to a local directory to load it.

Why: Ray Train writes ``<ray.storage_path>/<name>/attempt-*/checkpoint_*``. For a filesystem path the
driver finds the newest complete checkpoint of any attempt with
:func:`elf_core.checkpoint_dirs.list_checkpoints`; this module does the same through ``pyarrow.fs`` (the
library Ray Train itself uses for its storage), so a resubmitted run on object storage resumes too.

What "complete" means — the rules of ``list_checkpoints``, plus one that object stores need:

* directly under the run root or one level down (``attempt-*/checkpoint_*``); hidden names (temp /
  old / being-deleted directories, any path part starting with ``.``) are never checkpoints;
* ``meta.json`` must be there; one that does not parse is an error (``CheckpointError``), not a skip,
  so a damaged newest checkpoint is never silently passed over for an older one;
* every file the checkpoint needs (weights, state, config, EMA when ``meta.json`` says so) and every
  file ``meta.json`` lists in ``file_sizes`` is there with that size. A local checkpoint is renamed
  into place atomically, an upload is not: Ray copies the files one by one, in parallel, so an
  interrupted upload can leave ``meta.json`` without the weights. Such a checkpoint is skipped and
  reported through ``on_incomplete`` (default: one line on stderr).

Credentials and endpoints are pyarrow's: for S3 the AWS SDK chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws``, instance or pod
roles), ``AWS_ENDPOINT_URL`` for an S3-compatible server (MinIO, Ceph), or the URI's own query
(``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``); for GCS Application Default
Credentials (``GOOGLE_APPLICATION_CREDENTIALS``). Failures become one-line
:class:`RemoteStorageError` messages naming the URI (credentials in a URI are redacted).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import sys
import tempfile
import urllib.parse
from typing import Callable, Iterator, Mapping, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from elf_core.checkpoint import CONFIG_FILE, EMA_FILE, META_FILE, MODEL_FILE, STATE_FILE, parse_meta

# Longest part of an underlying pyarrow / AWS SDK message kept in an error line.
_MAX_CAUSE_CHARS = 300


class RemoteStorageError(RuntimeError):
    """A storage URI that cannot be reached, listed or downloaded; the message (one line) names it."""


def is_uri(path: str) -> bool:
    """``s3://…``, ``gs://…``, ``file://…``: anything with a scheme (the rule ``train.absolutise`` uses)."""
    return "://" in str(path)


def redact(uri: str) -> str:
    """``uri`` without a password / secret key in its user-info part (safe to print or log)."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"))


def child_uri(base: str, *parts: str) -> str:
    """``base`` with path parts appended, keeping its query (``?endpoint_override=…``) at the end."""
    split = urllib.parse.urlsplit(base)
    path = "/".join([split.path.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")])
    return urllib.parse.urlunsplit(split._replace(path=path))


def _hint(uri: str) -> str:
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("s3", "s3a"):
        return ("check the URI, the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance "
                "role) and, for an S3-compatible server, AWS_ENDPOINT_URL")
    if scheme in ("gs", "gcs"):
        return "check the URI and the credentials (GOOGLE_APPLICATION_CREDENTIALS or gcloud application-default login)"
    return "check that the URI is right and this machine can reach it"


def _error(uri: str, doing: str, exc: BaseException) -> RemoteStorageError:
    """One line: what failed, on which (redacted) URI, the first line of the cause, and a hint."""
    cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0].replace(uri, redact(uri))
    secret = urllib.parse.urlsplit(uri).password
    if secret:
        cause = cause.replace(secret, "***")
    if len(cause) > _MAX_CAUSE_CHARS:
        cause = cause[:_MAX_CAUSE_CHARS] + " …"
    return RemoteStorageError(f"{redact(uri)}: cannot {doing}: {cause} ({_hint(uri)})")


def _filesystem(uri: str, doing: str) -> tuple[pafs.FileSystem, str]:
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (OSError, pa.ArrowException, ValueError) as e:
        raise _error(uri, doing, e) from None
    return fs, path.rstrip("/")


def incomplete_reason(meta: Mapping, present: Mapping[str, int]) -> Optional[str]:
    """Why a checkpoint whose ``meta.json`` says ``meta`` and whose directory holds ``present``
    (file name -> size in bytes) is not complete, or None when it is."""
    required = [MODEL_FILE, STATE_FILE, CONFIG_FILE] + ([EMA_FILE] if meta.get("has_ema") else [])
    recorded = dict(meta.get("file_sizes") or {})
    missing = [n for n in dict.fromkeys(required + list(recorded)) if n not in present]
    if missing:
        return f"{', '.join(missing)} missing (an interrupted upload?)"
    for name, size in recorded.items():
        if present[name] != size:
            return f"{name} is {present[name]} bytes but {META_FILE} recorded {size} (an interrupted upload?)"
    return None


def _report_incomplete(uri: str, reason: str) -> None:
    print(f"[elf] skipping incomplete checkpoint {redact(uri)}: {reason}", file=sys.stderr, flush=True)


def list_checkpoints_at(uri: str, on_incomplete: Callable[[str, str], None] = _report_incomplete
                        ) -> list[tuple[int, str]]:
    """Complete checkpoints under the storage URI ``uri`` as ``(step, checkpoint URI)``, ascending by
    step (ties by URI), found as :func:`elf_core.checkpoint_dirs.list_checkpoints` finds them locally.
    A root that does not exist yet holds none. ``on_incomplete(uri, reason)`` hears of each skip."""
    fs, root = _filesystem(uri, "list checkpoints")
    try:
        # One recursive listing (on S3 a few paginated requests) gives every file with its size.
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except FileNotFoundError:  # nothing written under the root yet (a missing *bucket* is an error)
        return []
    except (OSError, pa.ArrowException) as e:
        raise _error(uri, "list checkpoints", e) from None
    prefix = root + "/" if root else ""
    files: dict[tuple[str, ...], dict[str, int]] = {}  # directory parts under root -> {file name: size}
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.startswith(prefix):
            continue
        *dirs, name = info.path[len(prefix):].split("/")
        if 1 <= len(dirs) <= 2 and not any(d.startswith(".") for d in dirs):
            files.setdefault(tuple(dirs), {})[name] = int(info.size)

    found = []
    for dirs in sorted(files):
        present = files[dirs]
        if META_FILE not in present:
            continue
        if len(dirs) == 2 and META_FILE in files.get(dirs[:1], {}):
            continue  # a directory inside a checkpoint, not a checkpoint
        ckpt = child_uri(uri, *dirs)
        meta_path = posixpath.join(prefix + "/".join(dirs), META_FILE)
        try:
            with fs.open_input_stream(meta_path) as f:
                text = f.read().decode("utf-8", errors="replace")
        except (OSError, pa.ArrowException) as e:
            raise _error(child_uri(uri, *dirs, META_FILE), "read checkpoint metadata", e) from None
        meta = parse_meta(text, redact(child_uri(uri, *dirs, META_FILE)))  # CheckpointError if damaged
        reason = incomplete_reason(meta, present)
        if reason is not None:
            on_incomplete(ckpt, reason)
            continue
        found.append((meta["step"], ckpt))
    return sorted(found, key=lambda sp: (sp[0], sp[1]))


def run_checkpoints_at(storage_uri: str, name: str,
                       on_incomplete: Callable[[str, str], None] = _report_incomplete) -> list[tuple[int, str]]:
    """Complete checkpoints of run ``name`` (``<storage>/<name>/attempt-*/checkpoint_*``), ascending."""
    return list_checkpoints_at(child_uri(storage_uri, name), on_incomplete)


@contextlib.contextmanager
def local_checkpoint(path_or_uri: str) -> Iterator[str]:
    """A local directory holding the checkpoint ``path_or_uri``: a local path (or ``file://`` URI)
    as it is; anything else downloaded into a temporary directory (under ``$TMPDIR``) that is
    deleted when the block ends."""
    if not is_uri(path_or_uri):
        yield str(path_or_uri)
        return
    fs, path = _filesystem(path_or_uri, "open the checkpoint")
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="elf-resume-")
    try:
        local = os.path.join(tmp, posixpath.basename(path) or "checkpoint")
        try:
            info = fs.get_file_info(path)
            if info.type != pafs.FileType.Directory:
                raise RemoteStorageError(f"{redact(path_or_uri)}: no checkpoint directory there "
                                         f"({info.type.name})")
            os.makedirs(local)  # copy_files creates no local directory for the files it copies
            pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        except (OSError, pa.ArrowException) as e:
            raise _error(path_or_uri, "download the checkpoint", e) from None
        if not os.path.isfile(os.path.join(local, META_FILE)):
            raise RemoteStorageError(f"{redact(path_or_uri)}: downloaded, but it holds no "
                                     f"{META_FILE} (not an ELF Lab checkpoint)")
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["RemoteStorageError", "is_uri", "redact", "child_uri", "incomplete_reason", "list_checkpoints_at",
           "run_checkpoints_at", "local_checkpoint"]
