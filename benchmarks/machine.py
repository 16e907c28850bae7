"""What machine a benchmark ran on (figures are only comparable on the same one), and the Zen 1
stand-in: instruction-set limits that make a faster x86 machine do its matrix maths at about the
speed of the 2-core AMD EPYC (Zen 1) that issue 13 measured on.

Why SSE4.2 for MKL: Zen 1 has AVX2, but its two FMA pipes are 128 bits wide, so its fp32 matmul
peak per clock is half an AVX2 Intel core's. MKL's SSE4.2 kernels on an Intel core land close to
it. Checked part by part against issue 13's own Zen 1 profile (16 rows, 1 thread, encoder live;
``python benchmarks/step_profile.py`` under these limits on a 2-core Intel Xeon, lscpu model 167,
AVX-512, 2026-12-04): encoder 0.679 s (Zen 1: 0.76) — the same code; loss forward 0.463 s (0.50)
and backward 0.679 s (0.63) — today's step against the old one. Calibrated on Intel only: on
other vendors MKL's instruction limits were not checked. Elementwise kernels keep AVX2 (``ATEN_CPU_CAPABILITY=avx2``), which
Zen 1 has. Clock, caches and memory stay this machine's, so the stand-in is an estimate, not Zen 1.
"""

from __future__ import annotations

import os
import platform
from typing import Mapping

# Read by MKL (GEMMs), oneDNN and ATen's kernel dispatch when they first run: set them in the
# environment of a fresh process (benchmarks/embedded_default.py --zen1-proxy does this per run).
ZEN1_PROXY_ENV: dict[str, str] = {
    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "ATEN_CPU_CAPABILITY": "avx2",
}


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def isa_limits(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The instruction-set limits (keys of :data:`ZEN1_PROXY_ENV`) set in ``environ`` (default:
    this process's), to be recorded next to any figure measured under them."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in ZEN1_PROXY_ENV if k in env}
