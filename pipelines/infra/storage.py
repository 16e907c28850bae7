"""Shared-storage checks for multi-node runs: refuse, before training starts, a checkpoint path or an
MLflow store that only one node can reach.

Why: Ray Train writes checkpoints from the workers (rank 0 may sit on any node) into
``ray.storage_path`` and the Train controller, on the driver's node, reads them back; every node
must see the same directory. A node-local path (the container's disk, ``/tmp``, an ext4 volume)
works on one machine and fails at the first checkpoint of a multi-node run, minutes or hours in.
Likewise rank 0 logs metrics to the MLflow tracking URI from whatever node it landed on: a local
``sqlite:///`` file or a ``http://127.0.0.1:5000`` server is a different (or no) store there.

What counts as shared:

* object-store URIs that Ray Train hands to pyarrow/fsspec (``s3://``, ``gs://``, ``abfs://``, …);
* a local path whose mount point (longest prefix in ``/proc/mounts``) has a network/cluster
  filesystem type: NFS, CIFS/SMB, Lustre, GPFS, CephFS, GlusterFS, BeeGFS, …, or FUSE (gcsfuse,
  s3fs, JuiceFS, blobfuse, … — a few FUSE types known to be local are excluded);
* anything, when the user opts in with ``ELF_SHARED_STORAGE=1`` — for mounts this check cannot
  classify, or a "cluster" whose nodes all run on one machine (the local multi-node test).

Entry points: :func:`check_storage_for_cluster` (pure given its inputs; raises
:class:`StorageNotShared`) and :func:`nodes_for_run` (how many nodes a run spans, from Ray's state;
the counting itself is :func:`count_nodes_for_run`). The driver calls both once Ray is connected:

    report = check_storage_for_cluster(cfg.ray.storage_path,
                                       nodes_for_run(num_workers, cpus_per_worker, gpus_per_worker),
                                       tracking_uri=resolved_uri)
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from pipelines.infra.filesystems import StorageError

OPT_IN_ENV = "ELF_SHARED_STORAGE"
_TRUE = ("1", "true", "yes", "on")

# Filesystem types (field 3 of /proc/mounts) that several machines mount at once.
SHARED_FS_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "cephfs", "glusterfs", "beegfs",
    "ocfs2", "gfs2", "panfs", "wekafs", "afs", "orangefs", "pvfs2", "9p", "virtiofs", "quobyte",
    "vxfs", "dcfs", "fuse",
})  # fmt: skip
# FUSE types (``fuse.<name>``) that are known to be local to the machine.
LOCAL_FUSE_TYPES = frozenset({
    "fuse.lxcfs", "fuse-overlayfs", "fuse.fuse-overlayfs", "fuse.gvfsd-fuse", "fuse.portal",
    "fuse.snapfuse", "fuse.squashfuse", "fuse.appimagefuse", "fuse.vmhgfs-fuse", "fuseblk",
})  # fmt: skip

_LOOPBACK_HOSTS = ("localhost", "127.", "::1", "0.0.0.0", "ip6-localhost")


class StorageNotShared(StorageError):
    """A multi-node run would write checkpoints or MLflow records where other nodes cannot see them.
    The message names the config key, the value, why it is node-local and what to use instead."""


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/mounts``: where, and which filesystem type."""

    mount_point: str
    fs_type: str
    source: str = ""


@dataclass(frozen=True)
class StorageReport:
    """What :func:`check_storage_for_cluster` concluded (for the driver's log line)."""

    num_nodes: int
    storage: str  # "remote" | "shared filesystem" | "local" | "local (opted in)"
    tracking: str  # "remote" | "local" | "local (opted in)" | "not checked"
    mount: Mount | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        where = f" on {self.mount.fs_type} at {self.mount.mount_point}" if self.mount else ""
        return (f"{self.num_nodes} node(s); checkpoints: {self.storage}{where}; MLflow: {self.tracking}"
                + "".join(f"; {n}" for n in self.notes))


# ------------------------------------------------------------------------------------------------
# Mounts


def _unescape(field_: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in paths as octal escapes (\\040 …)."""
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and i + 4 <= len(field_) and field_[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def read_mounts(mounts_file: str | Path = "/proc/mounts") -> list[Mount]:
    """Parse ``mounts_file`` (``/proc/mounts`` format: source, mount point, type, options, …)."""
    mounts = []
    for line in Path(mounts_file).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            mounts.append(Mount(mount_point=_unescape(parts[1]), fs_type=parts[2], source=_unescape(parts[0])))
    return mounts


def mount_of(path: str | Path, mounts: list[Mount]) -> Mount | None:
    """The mount that holds ``path``: the longest mount point that is a prefix of its real path
    (symlinks of the existing part resolved; the path need not exist yet). The last matching line
    wins, as later mounts over the same point hide earlier ones."""
    p = Path(path).expanduser()
    real = os.path.realpath(p if p.is_absolute() else Path.cwd() / p)
    best: Mount | None = None
    for m in mounts:
        mp = m.mount_point.rstrip("/") or "/"
        if real == mp or real.startswith(mp if mp.endswith("/") else mp + "/") or mp == "/":
            if best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/"):
                best = m
    return best


def is_shared_fs_type(fs_type: str) -> bool:
    """True for network / cluster filesystems and FUSE mounts not known to be local."""
    t = fs_type.lower()
    if t in LOCAL_FUSE_TYPES:
        return False
    return t in SHARED_FS_TYPES or t.startswith("fuse.") or t.startswith("nfs")


# ------------------------------------------------------------------------------------------------
# The check


def opted_in(environ: Mapping[str, str] | None = None) -> bool:
    """``ELF_SHARED_STORAGE`` is set to a true value (1/true/yes/on)."""
    env = os.environ if environ is None else environ
    return env.get(OPT_IN_ENV, "").strip().lower() in _TRUE


def _scheme(uri: str) -> str:
    # "C:\\x" style paths do not occur on the Linux nodes Ray clusters run on.
    return urllib.parse.urlparse(uri).scheme.lower() if "://" in uri else ""


def _is_loopback(host: str | None) -> bool:
    return bool(host) and any(host.lower().startswith(h) for h in _LOOPBACK_HOSTS)


def _storage_verdict(storage_path: str, mounts: list[Mount]) -> tuple[str, Mount | None, str]:
    """("remote" | "shared filesystem" | "local", mount, why-local)."""
    scheme = _scheme(storage_path)
    if scheme and scheme not in ("file", "local"):
        return "remote", None, ""
    local = urllib.parse.urlparse(storage_path).path if scheme else storage_path
    mount = mount_of(local, mounts)
    if mount is None:
        return "local", None, "no mount in /proc/mounts holds it"
    if is_shared_fs_type(mount.fs_type):
        return "shared filesystem", mount, ""
    return "local", mount, f"'{mount.fs_type}' filesystem mounted at {mount.mount_point}"


def _tracking_verdict(uri: str) -> tuple[str, str]:
    """("remote" | "local", why-local) for a resolved MLflow tracking URI."""
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if uri.split(":", 1)[0].lower() in ("databricks", "databricks-uc"):  # "databricks", "databricks://profile"
        return "remote", ""
    if scheme == "sqlite":
        return "local", ("a SQLite file lives on one node's disk, and SQLite locking over network "
                         "filesystems is unreliable")
    if scheme in ("", "file"):
        return "local", "a file store is local to one node (and MLflow 3 refuses file stores)"
    if _is_loopback(parsed.hostname):
        return "local", (f"'{parsed.hostname}' is loopback: rank 0 on another node would reach its own "
                         "machine, not this one")
    return "remote", ""


def _check_tracking(uri: str, key: str, opt_in: bool, problems: list[str]) -> str:
    """The tracking store's verdict; a node-local store without the opt-in adds a problem."""
    verdict, why = _tracking_verdict(uri)
    if verdict != "local":
        return verdict
    if opt_in:
        return "local (opted in)"
    problems.append(f"{key}='{uri}' cannot be written from other nodes ({why}). Run an MLflow tracking server "
                    "every node can reach (cluster/README.md, 'The MLflow tracking server') and set "
                    "MLFLOW_TRACKING_URI=http://HOST:5000 (or tracking.uri=...)")
    return verdict


def check_storage_for_cluster(
    storage_path: str,
    num_nodes: int,
    *,
    tracking_uri: str | None = None,
    environ: Mapping[str, str] | None = None,
    mounts: list[Mount] | None = None,
    storage_key: str = "ray.storage_path",
    tracking_key: str = "tracking.uri / MLFLOW_TRACKING_URI",
) -> StorageReport:
    """Refuse a multi-node run whose checkpoints or MLflow store are node-local.

    ``storage_path``: Ray Train's storage (``ray.storage_path``, already absolutised). ``num_nodes``:
    how many Ray nodes the run may span (see :func:`nodes_for_run`); at most 1 passes everything.
    ``tracking_uri``: the *resolved* MLflow URI (None: not checked). ``ELF_SHARED_STORAGE=1`` in
    ``environ`` (default ``os.environ``) accepts local paths and stores — for mounts this cannot
    classify, or nodes that share one machine. ``mounts`` defaults to :func:`read_mounts`.

    Raises :class:`StorageNotShared` naming the key, the value and the fix; returns a
    :class:`StorageReport` otherwise.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    if not storage_path:
        raise StorageNotShared(f"{storage_key} is empty; set it to a directory every node sees or an s3:// URI")
    opt_in = opted_in(environ)
    if num_nodes == 1:
        return StorageReport(1, "single node: not checked", "single node: not checked")

    if mounts is None and _scheme(storage_path) in ("", "file", "local"):
        mounts = read_mounts()
    storage, mount, why = _storage_verdict(storage_path, mounts or [])
    problems = []
    if storage == "local":
        if opt_in:
            storage = "local (opted in)"
        else:
            problems.append(
                f"{storage_key}='{storage_path}' is node-local ({why}), but this run spans {num_nodes} Ray "
                "nodes: workers on other nodes would write checkpoints this node never sees and the run would "
                "fail at its first checkpoint. Use an object store (ray.storage_path=s3://BUCKET/elf, gs://…, "
                "abfs://…) or a directory on a filesystem every node mounts (NFS, Lustre, CephFS, EFS, …)"
            )
    tracking = "not checked" if tracking_uri is None else _check_tracking(tracking_uri, tracking_key, opt_in, problems)
    if problems:
        raise StorageNotShared(
            "; and ".join(problems)
            + f". If every node does see the same path and store (e.g. all nodes run on one machine, or a "
            f"shared mount this check cannot classify), set {OPT_IN_ENV}=1 to proceed."
        )
    return StorageReport(num_nodes, storage, tracking, mount)


# ------------------------------------------------------------------------------------------------
# How many nodes a run spans (needs a connected Ray)


def nodes_for_run(num_workers: int, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """How many Ray nodes a run of these workers may span, for :func:`check_storage_for_cluster`,
    from the connected cluster's state (see :func:`count_nodes_for_run`)."""
    import ray

    client = False
    try:
        from ray.util.client import ray as client_ray

        client = client_ray.is_connected()
    except ImportError:  # pragma: no cover - ray without client support
        pass
    return count_nodes_for_run(ray.nodes(), ray.get_runtime_context().get_node_id(), num_workers,
                               cpus_per_worker, gpus_per_worker, ray_client=client)


def count_nodes_for_run(nodes: list[Mapping], driver_node_id: str | None, num_workers: int,
                        cpus_per_worker: float, gpus_per_worker: float, *, ray_client: bool = False) -> int:
    """The number of alive ``nodes`` (``ray.nodes()`` entries); at least 2 when the driver's own node
    can never host all workers (an autoscaling cluster that starts with a bare head adds worker nodes
    later) or when the driver connects through Ray Client (``ray://``: its disk is not the cluster's)."""
    alive = [n for n in nodes if n.get("Alive", False)]
    count = max(len(alive), 1)
    if ray_client:
        return max(count, 2)
    res = next((n.get("Resources", {}) for n in alive if n.get("NodeID") == driver_node_id), {})
    fits_here = min(
        res.get("CPU", 0.0) // cpus_per_worker if cpus_per_worker > 0 else float("inf"),
        res.get("GPU", 0.0) // gpus_per_worker if gpus_per_worker > 0 else float("inf"),
    )
    return max(count, 2) if fits_here < num_workers else count
