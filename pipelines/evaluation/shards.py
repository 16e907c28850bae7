"""Shard one evaluation's sample generation over Ray workers (``pipelines/evaluate.py --workers N``).

    pool = ShardPool(checkpoint, workers=2, task=session.task, ...)   # N actors, each loads the model once
    result = session.evaluate(sample_cfg, num_samples=1000, sampler=pool)   # driver scores once
    pool.close()

* **Workers**: one Ray actor (:class:`ShardWorker`) per worker holds a sampling-only
  :class:`pipelines.evaluation.session.EvalSession` (``evaluator=None``: network + encoder, no
  Gen-PPL model) for all sampling configs of the run. It asks for one GPU when the
  cluster has GPUs (``gpus_per_worker``), else ``cpus_per_worker`` CPUs (default 1) and then runs
  torch with that many threads.
* **Shards**: the run's sampling batches (``sample.batch_size`` samples each) are split into N
  contiguous shares (:func:`split_batches`); worker i generates its share one batch per actor call,
  so the driver can report shards / samples done with an ETA as the calls come back.
* **Determinism**: batch k draws from a generator seeded by (seed, k) (:mod:`elf_core.sampling`), so
  the concatenated shards are the samples one process would make — same texts, ids and order — as
  long as the arithmetic is the same (same device type; on CPU the same torch thread count, since
  a BLAS reduction may split differently with more threads).
* **Pinning**: workers load the checkpoint the driver resolved — its ``pinned`` reference
  (:mod:`pipelines.checkpoints`: ``models:/x/latest`` becomes the version the driver got, a storage
  directory its checkpoint directory) with the same weights choice — and each worker's (step,
  weights, task) is checked against the driver's.
* **Failures**: an exception in a worker, or a worker that dies, becomes one :class:`ShardError`
  naming the shard (its batches and sample ids) and the worker's own error message — not a Ray
  traceback. Scoring stays on the driver (:meth:`EvalSession.evaluate`).
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from elf_core.config import SampleConfig
from elf_core.sampling import batch_bounds, num_batches
from pipelines.evaluation.inputs import EvalError
from pipelines.infra.progress import Progress

WAIT_NOTE_S = 60.0  # how often wait_loaded() says it is still waiting
FIT_HINT = ("lower --workers (or --worker-cpus / --worker-gpus), or connect to a larger Ray cluster "
            "(--ray-address / RAY_ADDRESS)")


class ShardError(EvalError):
    """A sharded evaluation could not start or a shard failed; the message names the shard."""


def split_batches(n_batches: int, shards: int) -> list[range]:
    """``shards`` contiguous ranges covering ``range(n_batches)``, sizes differing by at most one
    (the first ``n_batches % shards`` get the extra batch); trailing ranges are empty when there are
    fewer batches than shards."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    base, extra = divmod(n_batches, shards)
    out, start = [], 0
    for i in range(shards):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


# ----------------------------------------------------------------------------------------------
# Worker side
class ShardWorker:
    """Actor body: a sampling-only EvalSession, loaded once by :meth:`load`, then :meth:`sample` calls.

    Loading happens in a method, not ``__init__``, so a failure comes back as that call's exception
    (with the original error) instead of a dead actor."""

    def __init__(self, threads: Optional[int] = None):
        import os

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # models:/ downloads: no bars
        if threads is not None:
            import torch

            torch.set_num_threads(int(threads))
        self.session: Any = None

    def load(self, checkpoint: str, task: str, references: Optional[str], use_ema: bool,
             tracking_uri: Optional[str], device: str) -> dict[str, Any]:
        import os

        import torch

        from pipelines.evaluation.session import EvalSession

        self.session = s = EvalSession(checkpoint, evaluator=None, task=task, references=references, device=device,
                                       use_ema=use_ema, tracking_uri=tracking_uri)
        return {"step": s.ckpt.step, "weights": s.ckpt.weights, "task": s.task, "device": str(s.device),
                "bf16": s.bf16, "threads": torch.get_num_threads(), "host": socket.gethostname(), "pid": os.getpid()}

    def sample(self, sample_cfg: SampleConfig, n: int, seed: int, batches: list[int]) -> list[dict]:
        return self.session.generate_samples(sample_cfg, n, seed, batches=batches)


# ----------------------------------------------------------------------------------------------
# Driver side
def _cause(err: BaseException) -> str:
    """The worker's own error, one short paragraph: the original exception of a RayTaskError, else
    the first lines of Ray's message (a worker that died: OOM kill, node lost, ...)."""
    from ray.exceptions import RayTaskError

    cause = err.cause if isinstance(err, RayTaskError) and getattr(err, "cause", None) is not None else None
    if cause is not None and not isinstance(cause, RayTaskError):
        text = f"{type(cause).__name__}: {cause}"
    else:
        lines = [ln for ln in str(err).splitlines() if ln.strip() and not ln.startswith(" ")]
        text = f"{type(err).__name__}: " + " ".join(lines[:3])
    return text if len(text) <= 1500 else text[:1500] + " ..."


@dataclass
class _Shard:
    index: int
    actor: Any
    info: Optional[dict] = None  # what load() returned


class ShardPool:
    """N loaded :class:`ShardWorker` actors; call it like ``EvalSession.evaluate``'s ``sampler``.

    ``address``: the Ray cluster (:func:`pipelines.infra.ray_env.init_ray`; default ``RAY_ADDRESS`` or a
    fresh local instance, reused when Ray is already initialised in this process).
    ``gpus_per_worker=None``: 1 when the cluster has GPUs, else 0 (CPU workers). ``wait=False``
    returns once the actors are asked to load (the driver can load its evaluator meanwhile);
    :meth:`wait_loaded` (or the first call) waits for them. Raises :class:`ShardError` when the
    workers cannot fit the cluster or one cannot load the checkpoint; ``expect`` (e.g. the driver's
    ``{"step", "weights", "task"}``) must match what every worker loaded.
    """

    def __init__(self, checkpoint: str, *, workers: int, task: str, references: Optional[str] = None,
                 use_ema: bool, tracking_uri: Optional[str] = None, expect: Optional[dict[str, Any]] = None,
                 cpus_per_worker: float = 1.0, gpus_per_worker: Optional[float] = None,
                 address: Optional[str] = None, wait: bool = True,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)):
        import ray

        from pipelines.infra.ray_env import ClusterTooSmall, check_cluster_fits, init_ray

        if workers < 1:
            raise ShardError(f"--workers must be >= 1, got {workers}")
        self.workers, self.log, self.shards = int(workers), log, []
        self.checkpoint, self.expect = str(checkpoint), dict(expect or {})
        self._loading: dict[Any, _Shard] = {}
        self._t0: Optional[float] = None
        self.ray_session = init_ray(address)
        self._owns_ray = self.ray_session.local
        try:
            if gpus_per_worker is None:
                gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0.0) > 0 else 0.0
            self.cpus, self.gpus = float(cpus_per_worker), float(gpus_per_worker)
            try:
                check_cluster_fits(self.workers, self.cpus, self.gpus, hint=FIT_HINT)
            except ClusterTooSmall as e:
                raise ShardError(f"--workers {self.workers}: {e}") from None
            device = "cuda" if self.gpus > 0 else "cpu"
            threads = None if self.gpus > 0 else max(1, int(self.cpus))
            actor_cls = ray.remote(ShardWorker).options(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0)
            log(f"[eval] starting {self.workers} Ray sampling workers ({self.cpus:g} CPU"
                + (f" + {self.gpus:g} GPU" if self.gpus else "") + f" each, device {device}) on "
                + f"{self.ray_session.address}")
            self._t0 = time.perf_counter()
            self.shards = [_Shard(i, actor_cls.remote(threads)) for i in range(self.workers)]
            self._loading = {s.actor.load.remote(checkpoint, task, references, use_ema, tracking_uri, device): s
                             for s in self.shards}
            if wait:
                self.wait_loaded()
        except BaseException:
            self.close()
            raise

    def wait_loaded(self) -> None:
        """Wait until every worker has loaded the checkpoint (a no-op once they have). Says so every
        ``WAIT_NOTE_S`` seconds while some have not: the cluster has room for them (checked) but its
        resources may be busy with other jobs, and Ray then just queues the actors."""
        import ray

        try:
            while self._loading:
                ready, _ = ray.wait(list(self._loading), num_returns=len(self._loading), timeout=WAIT_NOTE_S)
                if len(ready) == len(self._loading):
                    break
                self.log(f"[eval] still waiting for {len(self._loading) - len(ready)} of {self.workers} Ray workers "
                         f"to start and load the checkpoint ({time.perf_counter() - (self._t0 or 0):.0f} s); are "
                         "the cluster's CPUs/GPUs busy with other jobs?")
            for ref, shard in list(self._loading.items()):
                try:
                    shard.info = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise ShardError(f"shard {shard.index + 1}/{self.workers}: its Ray worker could not load "
                                     f"checkpoint '{self.checkpoint}': {_cause(e)}") from None
                got = {k: shard.info[k] for k in self.expect}
                if got != self.expect:
                    raise ShardError(f"shard {shard.index + 1}/{self.workers}: its Ray worker loaded {got} from "
                                     f"'{self.checkpoint}' but the driver has {self.expect}; "
                                     "did the checkpoint change?")
                del self._loading[ref]
        except BaseException:
            self.close()
            raise
        if self._t0 is not None:
            self.log(f"[eval] {self.workers} workers loaded in {time.perf_counter() - self._t0:.1f} s")
            self._t0 = None

    # ------------------------------------------------------------------------------------------
    def __call__(self, sample_cfg: SampleConfig, n: int, seed: int, progress: bool = True) -> list[dict]:
        """Samples ``0..n-1`` of (``sample_cfg``, ``seed``), generated shard by shard, in id order."""
        import ray

        self.wait_loaded()
        if not self.shards:
            raise ShardError("this ShardPool is closed")
        n_b = num_batches(n, sample_cfg.batch_size)
        shares = split_batches(n_b, self.workers)
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (shard, batch)
        for shard, share in zip(self.shards, shares):
            for k in share:  # an actor runs its calls in submission order
                pending[shard.actor.sample.remote(sample_cfg, n, seed, [k])] = (shard.index, k)
        left = [len(share) for share in shares]
        busy = sum(1 for x in left if x)
        report = Progress(n, unit="sample", tag="[eval]")
        by_batch: dict[int, list[dict]] = {}
        done_samples = done_shards = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i, k = pending.pop(ref)
                try:
                    by_batch[k] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    share = shares[i]
                    first = batch_bounds(share[0], n, sample_cfg.batch_size)[0]
                    last = batch_bounds(share[-1], n, sample_cfg.batch_size)[1] - 1
                    raise ShardError(
                        f"shard {i + 1}/{self.workers} (batches {share[0]}-{share[-1]}, sample ids {first}-{last}; "
                        f"worker pid {self.shards[i].info['pid']} on {self.shards[i].info['host']}) failed at batch "
                        f"{k}: {_cause(e)}") from None
                done_samples += len(by_batch[k])
                left[i] -= 1
                done_shards += left[i] == 0
                if progress:
                    report.update(done_samples, note=f"shards {done_shards}/{busy} done,")
        return [s for k in range(n_b) for s in by_batch[k]]

    def provenance(self) -> dict[str, str]:
        """What decides how the samples were made on the workers (merged into the run's provenance)."""
        infos = [s.info for s in self.shards if s.info]
        devices = sorted({i["device"] for i in infos})
        threads = sorted({str(i["threads"]) for i in infos})
        return {"workers": str(self.workers), "worker_cpus": f"{self.cpus:g}", "worker_gpus": f"{self.gpus:g}",
                "device": ",".join(devices), "worker_threads": ",".join(threads),
                "bf16_sampling": str(any(i["bf16"] for i in infos)).lower()}

    def close(self) -> None:
        """Kill the actors (their resources come back at once); stop Ray if this pool started it."""
        import ray

        if ray.is_initialized():
            for shard in self.shards:
                try:
                    ray.kill(shard.actor)
                except Exception:  # already dead: nothing to release
                    pass
        self.shards, self._loading = [], {}
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> "ShardPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ShardPool", "ShardWorker", "ShardError", "split_batches"]
