"""Pareto sets of a sweep's two objectives and the documented rule that picks its "best" point.

Unconditional frontiers minimise Gen PPL and maximise entropy. Low entropy hides degenerate text
(a collapsed model repeats a few tokens at a low perplexity), so the best point is the lowest Gen PPL
among Pareto points whose entropy meets a threshold, and a frontier whose best entropy stays below
it is reported as collapsed rather than silently compared.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from pipelines.sweeps.settings import Objective, SweepConfig, SweepError

PAPER_ENTROPY = 5.0  # "non-degenerate" entropy at the paper's 1024 tokens (ELF-B: 5.15)
PAPER_SEQ_LEN = 1024
TAG_PREFIX = "frontier."


def finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def pareto_mask(points: Sequence[Sequence[Any]], modes: Sequence[str]) -> list[bool]:
    """True for each point no other point dominates. Objectives are turned into minimisation
    (``max`` negated); j dominates i when j is no worse in every objective and better in one.
    Duplicates and ties do not dominate each other, so all copies of a Pareto point are kept.
    Points with a missing / NaN / infinite value (failed trials) are never on the front. O(n²)."""
    if any(m not in ("min", "max") for m in modes):
        raise ValueError(f"modes must be 'min' or 'max', got {list(modes)}")
    sign = [1.0 if m == "min" else -1.0 for m in modes]
    keys = [tuple(s * float(v) for s, v in zip(sign, p)) if all(finite(v) for v in p) else None for p in points]
    mask = []
    for i, a in enumerate(keys):
        dominated = a is None or any(b is not None and j != i and all(y <= x for x, y in zip(a, b)) and b != a
                                     for j, b in enumerate(keys))
        mask.append(not dominated)
    return mask


def mark_pareto(rows: list[dict[str, Any]], objectives: Sequence[Objective]) -> list[dict[str, Any]]:
    """Set ``row["pareto"]`` on every row (only FINISHED rows can be on the front)."""
    o0, o1 = objectives
    pts = [(r.get(o0.metric), r.get(o1.metric)) if r.get("status") == "FINISHED" else (None, None) for r in rows]
    for r, on in zip(rows, pareto_mask(pts, (o0.mode, o1.mode))):
        r["pareto"] = bool(on)
    return rows


def auto_min_entropy(seq_len: Optional[int]) -> float:
    """The paper's 5.0 nats scaled to the sample length: unigram entropy of n tokens is at most
    ln n, so the threshold is 5.0 · ln(min(L, 1024)) / ln 1024 (L = 64 → 3.0; L ≥ 1024 → 5.0)."""
    if not seq_len:
        return PAPER_ENTROPY
    return PAPER_ENTROPY * math.log(min(int(seq_len), PAPER_SEQ_LEN)) / math.log(PAPER_SEQ_LEN)


def threshold_for(cfg: SweepConfig, seq_len: Optional[int]) -> Optional[float]:
    """The constraint's threshold as a number (``auto``: :func:`auto_min_entropy`; ``none``: None)."""
    value = cfg.constraint.threshold
    if value is None or str(value).lower() == "none":
        return None
    if str(value).lower() == "auto":
        if cfg.objectives[1].metric != "entropy":
            raise SweepError(f"{cfg.path}: constraint.threshold=auto only applies to an entropy objective")
        return auto_min_entropy(seq_len)
    try:
        return float(value)
    except ValueError:
        raise SweepError(f"{cfg.path}: constraint.threshold must be a number, 'auto' or 'none', got {value!r}") from None


def meets(row: Mapping[str, Any], objective: Objective, threshold: Optional[float]) -> bool:
    if threshold is None:
        return True
    v = float(row[objective.metric])
    return v >= threshold if objective.mode == "max" else v <= threshold


def best_point(rows: Sequence[Mapping[str, Any]], objectives: Sequence[Objective],
               threshold: Optional[float]) -> Optional[dict[str, Any]]:
    """Among Pareto rows whose second objective meets ``threshold``, the one with the best first
    objective (lowest Gen PPL). None when no Pareto row qualifies."""
    o0, o1 = objectives
    cands = [r for r in rows if r.get("pareto") and meets(r, o1, threshold)]
    if not cands:
        return None
    sign = 1.0 if o0.mode == "min" else -1.0
    return dict(min(cands, key=lambda r: sign * float(r[o0.metric])))


def collapse_note(rows: Sequence[Mapping[str, Any]], objectives: Sequence[Objective],
                  threshold: Optional[float]) -> Optional[str]:
    """``"collapsed: entropy 0.41"`` when finished trials exist but none meets the constraint on the
    second objective (their best value is shown), else None."""
    o1 = objectives[1]
    done = [float(r[o1.metric]) for r in rows if r.get("status") == "FINISHED" and finite(r.get(o1.metric))]
    if threshold is None or not done or any(meets({o1.metric: v}, o1, threshold) for v in done):
        return None
    best = max(done) if o1.mode == "max" else min(done)
    return f"collapsed: {o1.metric} {best:.2f}"


def rule_text(objectives: Sequence[Objective], threshold: Optional[float]) -> str:
    o0, o1 = objectives
    best = "lowest" if o0.mode == "min" else "highest"
    cond = "" if threshold is None else f" with {o1.metric} {'>=' if o1.mode == 'max' else '<='} {threshold:.3g}"
    return f"{best} {o0.metric} among Pareto points{cond}"


def constraint_tag_key(objectives: Sequence[Objective], threshold: Optional[float]) -> str:
    """``frontier.best_gen_ppl_at_entropy_ge_3.00`` (MLflow tag keys allow no '>' or '=')."""
    o0, o1 = objectives
    if threshold is None:
        return f"{TAG_PREFIX}best_{o0.metric}"
    return f"{TAG_PREFIX}best_{o0.metric}_at_{o1.metric}_{'ge' if o1.mode == 'max' else 'le'}_{threshold:.2f}"


__all__ = ["pareto_mask", "mark_pareto", "auto_min_entropy", "threshold_for", "best_point", "collapse_note",
           "rule_text", "constraint_tag_key", "finite", "meets"]
