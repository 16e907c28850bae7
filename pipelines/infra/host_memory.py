"""Keep freed host memory inside a CPU training worker, so a step does not page-fault its tensors in.

Why this exists: glibc's malloc serves large allocations with a fresh ``mmap`` and hands them back
to the kernel on ``free``. The embedded default's decode head makes several (decode tokens × 30,522)
fp32 tensors a step, 30–120 MB each, so every step faulted them in again page by page. Measured with
``python benchmarks/host_memory.py --steps 20 --rounds 2`` (the default's worker step built and run
in one thread of a fresh process, as in a Ray Train worker; 2-core Intel Xeon, 2026-12-04), per step:
88,110 minor faults and 0.158 s of kernel time under glibc's defaults; 3,364 faults and 0.011 s with
freed blocks kept in malloc's heap for the next step, 0.391 s a step against 0.474 s (1.21×). The
price is a higher peak resident memory over the steps: 1.67 GB against 1.46 GB.

Three glibc settings are needed, and they must be in place when the process starts: Ray Train runs
the training function in a thread of the worker, and a thread's own malloc arena takes neither
``mallopt`` nor a heap over 64 MB (measured: 0.75 faults per page in a thread after ``mallopt``,
0.06 with the environment below). Hence :data:`KEPT_MEMORY_ENV`, given to the training workers
through Ray Train's ``worker_runtime_env`` when they train on CPU (:func:`cpu_worker_env`): one
malloc arena, no mmap (large blocks still fall back to mmap where the heap cannot grow), and up
to 1 GiB of freed memory kept. Other C libraries ignore these variables. One arena means one
malloc lock for all of a worker's threads: measured at 2 threads only. :func:`keep_freed_memory`
does the same with ``mallopt`` for the calling process's main thread (benchmarks).

torch's CPU allocator has no cache of its own to switch on, and jemalloc/tcmalloc would need a
preload the user installs, hence glibc's own knobs.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Mapping

TRIM_THRESHOLD = 1 << 30
KEPT_MEMORY_ENV: dict[str, str] = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from the main heap, which the next two govern
    "MALLOC_MMAP_MAX_": "0",  # large blocks come from the heap, not from fresh mmaps
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),  # and freed ones stay there for reuse
}

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc <malloc.h>
GLIBC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_THRESHOLD: 32 * 1024 * 1024, M_MMAP_MAX: 65536}


def cpu_worker_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The env_vars for CPU training workers: :data:`KEPT_MEMORY_ENV`, with the value the user set in
    ``environ`` (default ``os.environ``, the driver's) wherever they set one — passed on explicitly,
    so it also reaches workers on a cluster that do not inherit the driver's environment."""
    env = os.environ if environ is None else environ
    return {k: env.get(k, v) for k, v in KEPT_MEMORY_ENV.items()}


def keeps_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process started with :data:`KEPT_MEMORY_ENV` (the worker says so on its first line)."""
    env = os.environ if environ is None else environ
    return all(env.get(k) == v for k, v in KEPT_MEMORY_ENV.items())


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "mallopt", None)
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """The main thread's heap: no mmap, keep up to 1 GiB freed (process-wide, from now on).
    True when glibc took both settings."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


def return_freed_memory() -> bool:
    """Large blocks from mmap again (above 32 MiB, glibc's largest automatic threshold; trim at
    128 KiB), for benchmarks that compare both in one process. Not glibc's own start state: its
    threshold starts at 128 KiB and adapts, which no ``mallopt`` call can restore. True when glibc
    took the settings."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return all(mallopt(k, v) == 1 for k, v in GLIBC_DEFAULTS.items())
