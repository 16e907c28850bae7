"""The names an evaluation is asked for by — tasks, which weights, the evaluator's precision — in one
place for the CLIs' flags, the sweep settings, the evaluation session and the evaluator beside training."""

from __future__ import annotations

TASKS = ("unconditional", "translation", "summarization")
WEIGHTS = {"auto": None, "ema": True, "raw": False}  # --weights -> use_ema (None: EMA once it is warm)
EVALUATOR_DTYPES = ("float32", "bfloat16", "float16")

__all__ = ["TASKS", "WEIGHTS", "EVALUATOR_DTYPES"]
