"""Ray environment helpers: the env vars, ``ray.init`` settings and resource checks ELF drivers need.

Why this module exists (details in ``shared/stack-notes.md``, Ray 2.60):

* A local run needs a handful of env vars (loopback binding, no auth token, no usage stats, a fast
  Train health check — the default 2 s makes every ``ray.train.report`` block ~2 s).
* ``ray.init()`` with no address silently *joins* the newest cluster recorded under ``/tmp/ray``;
  a local run therefore asks for ``address="local"`` explicitly, and a cluster run names its
  address (``RAY_ADDRESS`` is set by ``ray job submit``).
* Logical CPUs may exceed physical cores: Train's controller, its helper actors and the workers
  must all be schedulable at once or they starve each other.
* A Trainer asking for more than the cluster has waits forever; :func:`check_cluster_fits` turns
  that into one error message before anything is scheduled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from elf_core.errors import ElfError

log = logging.getLogger(__name__)

# The env every local shell, driver, test and CI run should have (stack-notes "Ray").
LOCAL_RAY_ENV: dict[str, str] = {
    # Keep a local Ray on 127.0.0.1 (otherwise it binds the eth0 address). A multi-node cluster
    # refuses this setting, so it is only ever applied to local runs.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Same value everywhere: a local ray.init without it writes ~/.ray/auth_token and later CLI
    # clients fail with InvalidAuthToken.
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Train V2 polls workers at this interval; each ray.train.report() blocks about one interval.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}

# What Ray workers / the Train controller must see wherever they run (local or cluster). Passed
# through ``runtime_env["env_vars"]``; the node-level settings above are not (a cluster has its own).
WORKER_ENV: dict[str, str] = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": LOCAL_RAY_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"],
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # Train V2 patches print() on workers to also forward it as a log record: every line shows twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray forwards every carriage-return refresh of a worker's tqdm bar as a log line of its own (the
    # latent cache's bar printed ~85 lines in 20 s): refresh at most every 5 s (a user's value wins).
    "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "5"),
}


class ClusterTooSmall(ElfError):
    """The Ray cluster cannot host the requested workers (raised before a Trainer would hang)."""


@dataclass(frozen=True)
class RaySession:
    """What :func:`init_ray` connected to. ``local`` is True when this process started Ray."""

    address: str
    local: bool
    reused: bool  # Ray was already initialised in this process (e.g. by a test fixture)
    temp_dir: str | None
    resources: dict[str, float] = field(default_factory=dict)


def apply_local_ray_env(environ: os._Environ[str] | dict[str, str] | None = None) -> dict[str, str]:
    """Set :data:`LOCAL_RAY_ENV` in ``environ`` (default ``os.environ``) where the user has not.

    Returns the values now in effect for those keys. A user's own value wins (e.g. RAY_AUTH_MODE=token
    on a machine that uses tokens everywhere).
    """
    env = os.environ if environ is None else environ
    for key, value in LOCAL_RAY_ENV.items():
        env.setdefault(key, value)
    return {k: env[k] for k in LOCAL_RAY_ENV}


def default_temp_dir() -> Path:
    """Where a local Ray keeps its sessions: ``$RAY_TMPDIR`` or ``<tmp>/elf-ray`` (not ``/tmp/ray``,
    whose ``ray_current_cluster`` file other Ray users on the machine share)."""
    configured = os.environ.get("RAY_TMPDIR")
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "elf-ray"


def worker_runtime_env(extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``runtime_env`` for ``ray.init``: :data:`WORKER_ENV` plus ``extra_env``.

    Inside ``ray job submit`` the job's own runtime_env is merged with this one by Ray, which
    refuses the same env var in both; keys the submitter already set are left to the submitter.
    """
    env_vars = {**WORKER_ENV, **{k: str(v) for k, v in (extra_env or {}).items()}}
    job_cfg = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_cfg:
        try:
            submitted = (json.loads(job_cfg).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            submitted = {}
        for key in submitted:
            env_vars.pop(key, None)
    return {"env_vars": env_vars} if env_vars else {}


def default_num_cpus() -> int:
    """Logical CPUs for a local instance: at least 4 so controller + 2 workers + a trial fit on 2
    physical cores (Ray does not pin logical CPUs to cores)."""
    return max(os.cpu_count() or 1, 4)


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_mb: int = 512,
    *,
    extra_env: Mapping[str, str] | None = None,
    temp_dir: str | Path | None = None,
    logging_level: int = logging.WARNING,
    dashboard: bool = True,
) -> RaySession:
    """Connect to a Ray cluster or start a contained local instance.

    ``address`` (else ``$RAY_ADDRESS``, which ``ray job submit`` sets) selects a running cluster:
    ``"auto"`` joins the newest cluster started on this machine, ``"ray://…"`` a Ray Client server,
    ``"host:6379"``/``"http://host:8265"`` a head node. With neither, or ``address="local"``, a fresh
    local instance is started with ``num_cpus`` logical CPUs (default :func:`default_num_cpus`),
    ``object_store_mb`` of object store, the dashboard (``dashboard=True``) and its files under ``temp_dir``
    (default :func:`default_temp_dir`). If Ray is already initialised in this process the running
    instance is reused (``RaySession.reused``), whatever the arguments.
    """
    import ray

    if ray.is_initialized():
        return _session(ray, local=False, reused=True)
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    runtime_env = worker_runtime_env(extra_env) or None
    if target != "local":
        log.info("connecting to the Ray cluster at %s", target)
        ray.init(address=target, runtime_env=runtime_env, logging_level=logging_level)
        return _session(ray, local=False)
    cpus = default_num_cpus() if num_cpus is None else int(num_cpus)
    if cpus < 1:
        raise ValueError(f"init_ray: num_cpus must be >= 1, got {num_cpus}")
    apply_local_ray_env()
    _sync_loopback_flag(ray)
    # Keep it short: Ray's unix sockets live under it and AF_UNIX paths stop at 107 bytes
    # (Ray raises "validate_socket_filename failed" beyond ~45 characters of temp dir).
    tmp = (Path(temp_dir) if temp_dir is not None else default_temp_dir()).resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    # The dashboard serves the state API that Train V2's placement-group cleaner polls; without it
    # the driver prints "Failed to query Ray Train Controller actor state" every second.
    ray.init(address="local", num_cpus=cpus, object_store_memory=int(object_store_mb) * 1024 * 1024,
             include_dashboard=dashboard, runtime_env=runtime_env, logging_level=logging_level, _temp_dir=str(tmp))
    return _session(ray, local=True, temp_dir=str(tmp))


def _session(ray: Any, *, local: bool, reused: bool = False, temp_dir: str | None = None) -> RaySession:
    return RaySession(address=_current_address(ray), local=local, reused=reused, temp_dir=temp_dir,
                      resources=dict(ray.cluster_resources()))


def _sync_loopback_flag(ray: Any) -> None:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when ``ray`` is first imported, into
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``; ``services.get_node_ip_address`` consults
    that attribute at call time. When a driver imported ray before :func:`apply_local_ray_env`
    ran, align the attribute with the env so the local instance still binds 127.0.0.1 (measured:
    otherwise GCS and raylet use the eth0 address). ``_node_ip_address=`` does not achieve this."""
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    wanted = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "").strip().lower()
    if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER") and wanted in ("0", "false"):
        constants.ENABLE_RAY_CLUSTER = False


def _current_address(ray: Any) -> str:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # pragma: no cover - only informative
        return "unknown"


# ------------------------------------------------------------------------------------------------
# Resource check


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _plural(n: float, word: str) -> str:
    return f"{_fmt(n)} {word}" + ("" if n == 1 else "s")


def workers_that_fit(
    nodes: list[Mapping[str, float]], cpus_per_worker: float, gpus_per_worker: float
) -> int:
    """How many workers of (cpus, gpus) can be placed on ``nodes`` (each a resource dict); a worker
    never spans nodes, so this is a per-node count, not ``total // per_worker``."""
    total = 0
    for res in nodes:
        per_node = math.inf
        if cpus_per_worker > 0:
            per_node = min(per_node, math.floor(res.get("CPU", 0.0) / cpus_per_worker + 1e-9))
        if gpus_per_worker > 0:
            per_node = min(per_node, math.floor(res.get("GPU", 0.0) / gpus_per_worker + 1e-9))
        if per_node == math.inf:  # a worker that asks for nothing fits anywhere
            return 2**31 - 1
        total += int(per_node)
    return total


def check_cluster_fits(
    num_workers: int,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    *,
    hint: str = "lower the number of workers or the resources per worker, or add nodes",
) -> dict[str, float]:
    """Raise :class:`ClusterTooSmall` if the connected cluster can never host these workers.

    Compares with the cluster's *total* resources (``ray.cluster_resources()`` and per node
    ``ray.nodes()``): resources busy with other jobs only delay a run, missing ones hang it.
    Train V2's controller actor asks for 0 CPUs, so only workers count. Returns the totals.
    ``hint`` ends the message — drivers pass the config keys to change.
    """
    import ray

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if cpus_per_worker < 0 or gpus_per_worker < 0:
        raise ValueError(
            f"resources per worker must be >= 0, got cpus={cpus_per_worker}, gpus={gpus_per_worker}"
        )
    totals = dict(ray.cluster_resources())
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", False)]
    fit = workers_that_fit(nodes, cpus_per_worker, gpus_per_worker)
    if fit >= num_workers:
        return totals

    asked = [_plural(cpus_per_worker, "CPU")]
    if gpus_per_worker:
        asked.append(_plural(gpus_per_worker, "GPU"))
    per_node = "; ".join(
        f"{_plural(r.get('CPU', 0.0), 'CPU')}, {_plural(r.get('GPU', 0.0), 'GPU')}" for r in nodes
    )
    raise ClusterTooSmall(
        f"asked for {_plural(num_workers, 'worker')} × {' + '.join(asked)} "
        f"({_plural(num_workers * cpus_per_worker, 'CPU')}"
        + (f", {_plural(num_workers * gpus_per_worker, 'GPU')}" if gpus_per_worker else "")
        + f" in all) but the Ray cluster has {_plural(totals.get('GPU', 0.0), 'GPU')} / "
        f"{_plural(totals.get('CPU', 0.0), 'CPU')} ({_plural(len(nodes), 'node')}: {per_node}); "
        f"at most {_plural(fit, 'such worker')} fit. The job would wait forever for resources: "
        f"{hint}."
    )
