"""The one progress reporter of ELF Lab: a line with rate and ETA for long loops (training steps,
samples, scoring, sweep trials), printed at most every few seconds.

    progress = Progress(total=600, unit="step", tag="[elf]", start=resumed_at)
    progress.update(done, metrics)      # prints when `every_s` passed since the last line, and at the end
    progress.line(done, metrics)        # the text alone
"""

from __future__ import annotations

import sys
import time
from typing import Mapping, TextIO


def fmt_duration(seconds: float) -> str:
    """``3h02m05s``, ``4m07s``, ``12s``."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """``step 120/600 [20%] loss 1.23 ... | 3.10 step/s | 1m02s elapsed, ETA 3m12s``.

    The rate counts only work done in this process (``start`` is where a resumed run picked up), so
    the ETA stays right after a restart. :meth:`update` prints to ``out`` (default stderr) at most
    every ``every_s`` seconds (0: every call), always on the last unit.
    """

    KEYS = ("loss", "ce", "l2", "decode_acc", "lr", "tokens_per_s")

    def __init__(self, total: int, *, unit: str = "step", start: int = 0, tag: str = "",
                 every_s: float = 2.0, out: TextIO | None = None):
        self.total, self.start, self.unit, self.tag, self.every_s = total, start, unit, tag, every_s
        self.out = out
        self.t0 = time.perf_counter()
        self._last_print = float("-inf")

    def eta_s(self, done: int) -> float:
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 and done > self.start else 0.0
        return (self.total - done) / rate if rate > 0 else float("nan")

    def line(self, done: int, metrics: Mapping[str, float] | None = None, note: str = "") -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        parts = [self.tag] if self.tag else []
        if note:
            parts.append(note)
        parts.append(f"{self.unit} {done}/{self.total} [{100.0 * done / max(self.total, 1):.0f}%]")
        for k in self.KEYS:
            if metrics and k in metrics:
                v = metrics[k]
                parts.append(f"{k} {v:.3g}" if k != "tokens_per_s" else f"{v:,.0f} tok/s")
        eta = self.eta_s(done)
        parts.append(f"| {rate:.2f} {self.unit}/s | {fmt_duration(elapsed)} elapsed, "
                     f"ETA {fmt_duration(eta) if eta == eta else '?'}")
        return " ".join(parts)

    def update(self, done: int, metrics: Mapping[str, float] | None = None, note: str = "") -> bool:
        """Print :meth:`line` if it is due; returns whether it printed."""
        now = time.monotonic()
        if done < self.total and now - self._last_print < self.every_s:
            return False
        self._last_print = now
        print(self.line(done, metrics, note), file=self.out or sys.stderr, flush=True)
        return True

    def __call__(self, done: int, total: int | None = None) -> None:
        """As a ``progress(done, total)`` callback (elf_core's sampling and scoring loops)."""
        if total is not None:
            self.total = total
        self.update(done)
