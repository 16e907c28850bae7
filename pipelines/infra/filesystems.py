"""Local paths and storage URIs (``s3://``, ``gs://``, ``file://``, any pyarrow filesystem URI) behind
one small interface, through ``pyarrow.fs`` — the library Ray Train itself writes checkpoints with.

Why one interface: a training run's storage (``ray.storage_path``) is a local directory, a shared
mount or an object store, and everything that reads or tidies it (resume, checkpoint rotation,
``--fresh``, evaluation) must behave the same on all of them.

Credentials and endpoints are pyarrow's: for S3 the AWS SDK chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws``, instance or pod
roles), ``AWS_ENDPOINT_URL`` for an S3-compatible server (MinIO, Ceph), or the URI's own query
(``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``); for GCS Application Default
Credentials. Every failure is one :class:`StorageError` line naming the (redacted) location.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import urllib.parse
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from elf_core.errors import ElfError

_MAX_CAUSE_CHARS = 300  # longest part of an underlying pyarrow / AWS SDK message kept in an error line


class StorageError(ElfError):
    """A storage location that cannot be reached, listed, read or written."""


def is_uri(location: str | Path) -> bool:
    """``s3://…``, ``gs://…``, ``file://…``: anything with a scheme."""
    return "://" in str(location)


def redact(uri: str) -> str:
    """``uri`` without a password / secret key in its user-info part (safe to print or log)."""
    parts = urllib.parse.urlsplit(str(uri))
    if "@" not in parts.netloc:
        return str(uri)
    userinfo, host = parts.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"))


def child(base: str | Path, *parts: str) -> str:
    """``base`` with path parts appended; a URI keeps its query (``?endpoint_override=…``) last."""
    if not is_uri(base):
        return str(Path(base, *[p.strip("/") for p in parts if p.strip("/")]))
    split = urllib.parse.urlsplit(str(base))
    path = "/".join([split.path.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")])
    return urllib.parse.urlunsplit(split._replace(path=path))


def basename(location: str | Path) -> str:
    return posixpath.basename(urllib.parse.urlsplit(str(location)).path.rstrip("/")) if is_uri(location) \
        else Path(location).name


def _hint(location: str) -> str:
    scheme = urllib.parse.urlsplit(location).scheme.lower() if is_uri(location) else ""
    if scheme in ("s3", "s3a"):
        return ("check the URI, the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance "
                "role) and, for an S3-compatible server, AWS_ENDPOINT_URL")
    if scheme in ("gs", "gcs"):
        return "check the URI and the credentials (GOOGLE_APPLICATION_CREDENTIALS or gcloud application-default login)"
    if not scheme:
        return "check the path and its permissions"
    return "check that the URI is right and this machine can reach it"


def storage_error(location: str | Path, doing: str, exc: BaseException) -> StorageError:
    """One line: what failed, on which (redacted) location, the first line of the cause, and a hint."""
    location = str(location)
    cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0].replace(location, redact(location))
    secret = urllib.parse.urlsplit(location).password if is_uri(location) else None
    if secret:
        cause = cause.replace(secret, "***")
    if len(cause) > _MAX_CAUSE_CHARS:
        cause = cause[:_MAX_CAUSE_CHARS] + " …"
    return StorageError(f"{redact(location)}: cannot {doing}: {cause} ({_hint(location)})")


_FS_ERRORS = (OSError, pa.ArrowException, ValueError)


def filesystem(location: str | Path, doing: str) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path inside it)`` for a local path or a URI."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(str(location)))
    try:
        fs, path = pafs.FileSystem.from_uri(str(location))
    except _FS_ERRORS as e:
        raise storage_error(location, doing, e) from None
    return fs, path.rstrip("/")


def list_files(location: str | Path, doing: str = "list files") -> dict[str, int]:
    """Every file under ``location`` as ``{relative posix path: size in bytes}``; ``{}`` when the
    location does not exist yet (a missing *bucket* is an error). One recursive listing: on S3 a
    few paginated requests."""
    fs, root = filesystem(location, doing)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except FileNotFoundError:
        return {}
    except _FS_ERRORS as e:
        raise storage_error(location, doing, e) from None
    prefix = root.rstrip("/") + "/"
    return {i.path[len(prefix):]: int(i.size) for i in infos
            if i.type == pafs.FileType.File and i.path.startswith(prefix)}


def list_dirs(location: str | Path, doing: str = "list directories") -> list[str]:
    """The names of the directories directly under ``location`` (``[]`` when it does not exist)."""
    fs, root = filesystem(location, doing)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    except _FS_ERRORS as e:
        raise storage_error(location, doing, e) from None
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory)


def read_text(location: str | Path, doing: str = "read") -> str:
    fs, path = filesystem(location, doing)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8", errors="replace")
    except _FS_ERRORS as e:
        raise storage_error(location, doing, e) from None


def download_files(location: str | Path, names: tuple[str, ...], local_dir: Path, doing: str = "download") -> Path:
    """Copy the files ``names`` of the directory ``location`` into ``local_dir`` (created)."""
    fs, path = filesystem(location, doing)
    local_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            with fs.open_input_stream(posixpath.join(path, name)) as src, open(local_dir / name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except _FS_ERRORS as e:
            raise storage_error(child(location, name), doing, e) from None
    return local_dir


def download_dir(location: str | Path, local_dir: Path, doing: str = "download") -> Path:
    """Copy the directory ``location`` into ``local_dir`` (created) and return ``local_dir``."""
    fs, path = filesystem(location, doing)
    try:
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise StorageError(f"{redact(str(location))}: cannot {doing}: no directory there")
        local_dir.mkdir(parents=True, exist_ok=True)  # copy_files creates no local directory
        pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except _FS_ERRORS as e:
        raise storage_error(location, doing, e) from None
    return local_dir


def delete_dir(location: str | Path, doing: str = "delete") -> None:
    fs, path = filesystem(location, doing)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        return
    except _FS_ERRORS as e:
        raise storage_error(location, doing, e) from None


def check_writable(location: str | Path, doing: str = "write to the run's storage") -> None:
    """Create ``location`` if needed and write + delete a marker file there; raise StorageError if not."""
    fs, path = filesystem(location, doing)
    marker = posixpath.join(path, f".elf-write-check-{os.getpid()}")
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(marker) as f:
            f.write(b"ok")
        fs.delete_file(marker)
    except _FS_ERRORS as e:
        raise storage_error(location, doing, e) from None


__all__ = ["StorageError", "is_uri", "redact", "child", "basename", "storage_error", "filesystem", "list_files",
           "list_dirs", "read_text", "download_files", "download_dir", "delete_dir", "check_writable"]
