"""The Gen-PPL-vs-entropy frontier figure that sweeps, scaling ablations and the evaluator beside
training attach to their MLflow runs (matplotlib, Agg backend). A series whose samples collapsed is
flagged in its legend entry ("collapsed: entropy 0.41") instead of sitting silently among the others."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pipelines.sweeps.pareto import best_point, finite as _finite
from pipelines.sweeps.settings import Objective
from pipelines.sweeps.space import settings_label


@dataclass
class FrontierSeries:
    """One model's points on a frontier plot (several for the scaling ablation)."""

    label: str
    rows: list[dict[str, Any]]
    note: Optional[str] = None  # e.g. "collapsed: entropy 0.41", shown in the legend


def _same_settings(row: Mapping[str, Any], settings: Mapping[str, Any]) -> bool:
    for k, v in settings.items():
        if k not in row:
            return False
        try:
            if not math.isclose(float(row[k]), float(v)):
                return False
        except (TypeError, ValueError):
            if str(row[k]) != str(v):
                return False
    return True


def _annotate(ax: Any, front: list[dict[str, Any]], xs: list[float], ys: list[float], color: str,
              conditional: bool) -> None:
    """One label per distinct Pareto point: identical results (e.g. a collapsed model) stack."""
    groups: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for x, y, r in zip(xs, ys, front):
        groups.setdefault((round(x, 6), round(y, 6)), []).append(r)
    for (x, y), rs in groups.items():
        more = f" (+{len(rs) - 1} same)" if len(rs) > 1 else ""
        ax.annotate(settings_label(rs[0], conditional) + more, (x, y), textcoords="offset points", xytext=(5, 4),
                    fontsize=7, color=color)


def _plot_series(ax: Any, s: FrontierSeries, color: str, objectives: Sequence[Objective], refs: list,
                 *, conditional: bool, annotate: bool, threshold: float | None) -> list[float]:
    """Dots, the joined Pareto front, the best point and the trials at the reference settings of
    one series; returns its first-objective values."""
    o0, o1 = objectives
    ok = [r for r in s.rows if _finite(r.get(o0.metric)) and _finite(r.get(o1.metric))]
    xs, ys = [float(r[o1.metric]) for r in ok], [float(r[o0.metric]) for r in ok]
    flag = f" — {s.note}" if s.note else ""
    ax.scatter(xs, ys, s=18, color=color, alpha=0.35, marker="x" if s.note else "o",
               label=f"{s.label}: all trials ({len(ok)}){flag}")
    front = sorted((r for r in ok if r.get("pareto")), key=lambda r: float(r[o1.metric]))
    if front:
        fx, fy = [float(r[o1.metric]) for r in front], [float(r[o0.metric]) for r in front]
        ax.plot(fx, fy, "--o" if s.note else "-o", color=color, ms=7, lw=1.5, label=f"{s.label}: Pareto ({len(front)})")
        if annotate:
            _annotate(ax, front, fx, fy, color, conditional)
        best = best_point(ok, objectives, threshold)
        if best is not None:
            ax.scatter([float(best[o1.metric])], [float(best[o0.metric])], marker="D", s=90, color=color,
                       edgecolors="black", zorder=4, label=f"{s.label}: best {settings_label(best, conditional)}")
    for ref in refs:
        at = [r for r in ok if ref.get("settings") and _same_settings(r, ref["settings"])]
        if at:
            ax.scatter([float(r[o1.metric]) for r in at], [float(r[o0.metric]) for r in at], s=160,
                       facecolors="none", edgecolors=color, linewidths=2,
                       label=f"{s.label}: at {ref.get('short', 'paper settings')}")
    return ys


def plot_frontier(series: Sequence[FrontierSeries], out: str | Path, objectives: Sequence[Objective], *,
                  reference: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                  title: str = "", conditional: bool = False, annotate: bool = True,
                  threshold: float | None = None) -> Path:
    """PNG: first objective (y; log scale for perplexities spanning > 10×) against the second (x).
    Every finished trial is a faint dot, Pareto points are joined and labelled with their settings,
    the trial run at the reference's settings is ringed, the published value is a star, the
    constraint on the second objective a dashed line and each series' best point a diamond."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o0, o1 = objectives
    refs = [r for r in ([reference] if isinstance(reference, Mapping) else list(reference or [])) if r]
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ys_all: list[float] = []
    for i, s in enumerate(series):
        ys_all += _plot_series(ax, s, colors[i % len(colors)], objectives, refs, conditional=conditional,
                               annotate=annotate, threshold=threshold)
    for ref in refs:
        m = ref.get("metrics") or {}
        if _finite(m.get(o0.metric)) and _finite(m.get(o1.metric)):
            ax.scatter([float(m[o1.metric])], [float(m[o0.metric])], marker="*", s=260, color="black", zorder=5,
                       label=ref.get("label", "paper"))
            ys_all.append(float(m[o0.metric]))
    if threshold is not None:
        ax.axvline(threshold, ls="--", color="grey", lw=1,
                   label=f"{o1.metric} {'>=' if o1.mode == 'max' else '<='} {threshold:.3g} (constraint for best)")
    if ys_all and o0.mode == "min" and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 10:
        ax.set_yscale("log")
    ax.set_xlabel(f"{o1.metric} ({'higher' if o1.mode == 'max' else 'lower'} is better)")
    ax.set_ylabel(f"{o0.metric} ({'lower' if o0.mode == 'min' else 'higher'} is better)")
    ax.set_title(title or f"{o0.metric} vs {o1.metric}", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    return _save(plt, fig, out)


def plot_over_training(points: Sequence[Mapping[str, Any]], out: str | Path, *, x: str = "entropy",
                       y: str = "gen_ppl", title: str = "", threshold: float | None = None) -> Path:
    """The frontier over training: ``y`` against ``x`` of every evaluated checkpoint (``points``:
    ``{"step", x, y}``), coloured by step, each labelled with its step and joined in step order. For
    a conditional task pass ``x="step"``: the metric against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((p for p in points if _finite(p.get(x)) and _finite(p.get(y))), key=lambda p: p["step"])
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    xs, ys, steps = [float(p[x]) for p in pts], [float(p[y]) for p in pts], [int(p["step"]) for p in pts]
    ax.plot(xs, ys, "-", color="lightgrey", lw=1, zorder=1)
    sc = ax.scatter(xs, ys, c=steps, cmap="viridis", s=60, zorder=2, edgecolors="black", linewidths=0.5)
    for xv, yv, st in zip(xs, ys, steps):
        ax.annotate(f"{st}", (xv, yv), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if pts:
        fig.colorbar(sc, ax=ax, label="training step")
    if threshold is not None and x != "step":
        ax.axvline(threshold, ls="--", color="grey", lw=1, label=f"{x} >= {threshold:.3g} (rule for @best)")
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title or f"{y} vs {x} over training ({len(pts)} checkpoints)", fontsize=10)
    ax.grid(True, alpha=0.3)
    return _save(plt, fig, out)


def _save(plt: Any, fig: Any, out: str | Path) -> Path:
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
