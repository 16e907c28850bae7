"""What machine a benchmark ran on (figures are only comparable on the same one)."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"
