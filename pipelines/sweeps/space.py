"""A sweep's search space for Ray Tune, and the short label of one sampler setting."""

from __future__ import annotations

from typing import Any, Mapping

from pipelines.sweeps.settings import SweepConfig


def tune_param_space(cfg: SweepConfig) -> dict[str, Any]:
    """Tune's ``param_space``: ``grid_search`` over every list for ``grid``; ``choice`` / ``uniform``
    / ``loguniform`` / ``randint`` for ``random`` and ``optuna``."""
    from ray import tune

    out: dict[str, Any] = {}
    for k, v in cfg.params.items():
        if isinstance(v, list):
            out[k] = tune.grid_search(v) if cfg.search.kind == "grid" else tune.choice(v)
        elif v.get("type") == "int":
            out[k] = (tune.lograndint if v.get("log") else tune.randint)(v["low"], v["high"] + 1)
        else:
            out[k] = (tune.loguniform if v.get("log") else tune.uniform)(v["low"], v["high"])
    return out


def settings_label(cfg: Mapping[str, Any], conditional: bool = False) -> str:
    """``SDE 32 γ1.5 w3 ln`` (γ = 0 is the ODE; ``c`` only for conditional sweeps)."""
    gamma = float(cfg.get("gamma", 0.0))
    ode = cfg.get("sampler") == "ode" or gamma == 0.0
    parts = [f"{'ODE' if ode else 'SDE'} {cfg.get('steps', '?')}"]
    if not ode:
        parts.append(f"γ{gamma:g}")
    parts.append(f"w{float(cfg.get('sc_cfg', 0)):g}")
    if conditional:
        parts.append(f"c{float(cfg.get('cfg', 1.0)):g}")
    parts.append({"logit_normal": "ln", "uniform": "uni"}.get(str(cfg.get("grid", "")), str(cfg.get("grid", ""))))
    return " ".join(parts)


__all__ = ["tune_param_space", "settings_label"]
