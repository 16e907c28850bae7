"""Progress lines with rate and ETA for long loops (training steps, samples, scoring)."""

from __future__ import annotations

import time


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """``line(done, metrics)`` -> ``step 120/600 [20%] loss 1.23 ... | 3.1 it/s | 1m02s elapsed, ETA 3m12s``.

    The rate counts only work done in this process (``start`` is where a resumed run picked up), so
    the ETA stays right after a restart.
    """

    KEYS = ("loss", "ce", "l2", "decode_acc", "lr", "tokens_per_s")

    def __init__(self, total: int, start: int = 0, unit: str = "step"):
        self.total, self.start, self.unit = total, start, unit
        self.t0 = time.perf_counter()

    def eta_s(self, done: int) -> float:
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 and done > self.start else 0.0
        return (self.total - done) / rate if rate > 0 else float("nan")

    def line(self, done: int, metrics: dict[str, float] | None = None) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.unit} {done}/{self.total} [{100.0 * done / max(self.total, 1):.0f}%]"]
        for k in self.KEYS:
            if metrics and k in metrics:
                v = metrics[k]
                parts.append(f"{k} {v:.3g}" if k != "tokens_per_s" else f"{v:,.0f} tok/s")
        eta = self.eta_s(done)
        parts.append(f"| {rate:.2f} {self.unit}/s | {fmt_duration(elapsed)} elapsed, "
                     f"ETA {fmt_duration(eta) if eta == eta else '?'}")
        return " ".join(parts)
