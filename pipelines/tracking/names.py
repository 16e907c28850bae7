"""What training metrics are called in MLflow — chosen for what the UI shows first.

MLflow 3.17's "Model metrics" tab groups a run's charts into sections by key prefix (``a/b`` is
chart ``b`` of section ``a``), orders the sections alphabetically, charts within a section
alphabetically, and puts unprefixed keys last (measured with a real Chromium, scripts/check_ui.py).
So the loss curves live in the section ``curves`` — before ``eval`` (the evaluator beside
training) and before the unprefixed rest (lr, grad_norm, throughput, ...) — and the held-out probe
sits in the same section, one two-point series per metric (step 0 and the end) next to the
training curves.
"""

from __future__ import annotations

from typing import Mapping

CURVES = "curves"
CURVE_KEYS = ("loss", "ce", "l2", "decode_acc")  # the objective and its branches, on the training batch


def step_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A training step's metrics under their MLflow names."""
    return {(f"{CURVES}/{k}" if k in CURVE_KEYS else k): v for k, v in metrics.items()}


def probe_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The held-out probe's measurements (:class:`elf_core.probe.QualityProbe`) under their MLflow names."""
    return {f"{CURVES}/probe_{k}": v for k, v in metrics.items()}


def probe_key(name: str) -> str:
    return f"{CURVES}/probe_{name}"


__all__ = ["CURVES", "CURVE_KEYS", "step_metrics", "probe_metrics", "probe_key"]
