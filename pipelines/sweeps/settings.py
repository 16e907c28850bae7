"""Typed settings of a frontier sweep, loaded from a search-space YAML (``experiments/sweeps/``) and
overridden with the same ``section.key=value`` dot-lists as ``train.py``.

A space YAML holds ``name, description, task, fixed, params, objectives, reference, constraint`` and
may set any other section of :class:`SweepConfig` (``search``, ``scoring``, ...)::

    python experiments/frontier_sweep.py --checkpoint X --space experiments/sweeps/cpu_tiny.yaml \\
        search.kind=optuna search.trials=40 fixed.num_samples=16 constraint.threshold=auto

Every value is checked against the range declared next to its field (:mod:`elf_core.validation`);
``fixed`` and ``params`` name :class:`~elf_core.config.SampleConfig` fields, and a swept parameter is
a list of values or a ``{low, high[, log, type]}`` range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from elf_core.config import SampleConfig, load_structured
from elf_core.errors import ElfError
from elf_core.validation import check_values, ranged
from pipelines.evaluation.choices import EVALUATOR_DTYPES, TASKS, WEIGHTS

SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(SampleConfig))
SETTING_KEYS = ("sampler", "steps", "gamma", "sc_cfg", "cfg", "grid")  # what a frontier varies


class SweepError(ElfError):
    """A sweep that cannot run as asked; the message names the file / key / option at fault."""


@dataclass
class Objective:
    metric: str = "gen_ppl"
    mode: str = ranged("min", choices=("min", "max"))


@dataclass
class Constraint:
    """Picks the "best" Pareto point: the best first objective with the second meeting ``threshold``
    (a number, ``auto`` = 5.0·ln(L)/ln(1024) nats for sequence length L, or ``none``)."""

    metric: Optional[str] = None
    threshold: Optional[str] = None


@dataclass
class Search:
    kind: str = ranged("grid", choices=("grid", "random", "optuna"))  # grid: every point once
    trials: Optional[int] = ranged(None, ge=1)  # draws for random / optuna (default 20)
    seed: int = ranged(0, ge=0)  # of the random / optuna search
    max_concurrent: Optional[int] = ranged(None, ge=1)  # default: one per GPU, else CPUs / cpus_per_trial
    cpus_per_trial: float = ranged(1.0, gt=0)
    max_trials: Optional[int] = ranged(None, ge=1)  # stop this invocation after N trials ended (resumable)
    retry_failed: bool = False  # on resume: run failed trials again


@dataclass
class Scoring:
    evaluator: str = "auto"
    evaluator_dtype: str = ranged("float32", choices=EVALUATOR_DTYPES)
    weights: str = ranged("auto", choices=tuple(WEIGHTS))
    task: Optional[str] = ranged(None, choices=TASKS)  # default: the checkpoint's
    references: Optional[str] = None
    device: Optional[str] = None  # default: a GPU when the trial has one
    log_samples: int = ranged(8, ge=0)  # samples kept per trial run


@dataclass
class SweepConfig:
    name: str = ""  # the space's name (default: the file's stem)
    description: str = ""
    task: str = ranged("unconditional", choices=("unconditional", "conditional"))
    fixed: dict[str, Any] = field(default_factory=dict)  # SampleConfig fields held constant
    params: dict[str, Any] = field(default_factory=dict)  # SampleConfig fields swept
    objectives: list[Objective] = field(default_factory=lambda: [Objective("gen_ppl", "min"),
                                                                 Objective("entropy", "max")])
    reference: dict[str, Any] = field(default_factory=dict)  # the published operating point to mark
    constraint: Constraint = field(default_factory=Constraint)
    search: Search = field(default_factory=Search)
    scoring: Scoring = field(default_factory=Scoring)
    experiment: str = "elf/frontier"  # for checkpoints without a training run in the store
    out: str = "outputs/sweeps"  # sweep state and files (relative: under the ELF Lab root)
    path: str = ""  # the space file it was read from (set by load_sweep_config)

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.params.values() if isinstance(v, list))

    def expected_trials(self) -> int:
        return self.grid_size() if self.search.kind == "grid" else (self.search.trials or 20)

    @property
    def conditional(self) -> bool:
        return self.task == "conditional"


def _check_params(cfg: SweepConfig, origin: str) -> None:
    for where, keys in (("fixed", cfg.fixed), ("params", cfg.params)):
        for k in keys:
            if k not in SAMPLE_FIELDS:
                raise SweepError(f"{origin}: {where}.{k} is not a SampleConfig field ({', '.join(SAMPLE_FIELDS)})")
    if both := sorted(set(cfg.fixed) & set(cfg.params)):
        raise SweepError(f"{origin}: {both} are both fixed and swept")
    if not cfg.params:
        raise SweepError(f"{origin}: params is empty: nothing to sweep")
    for k, v in cfg.params.items():
        ok = (isinstance(v, list) and v) or (isinstance(v, dict) and {"low", "high"} <= set(v)
                                              and not set(v) - {"low", "high", "log", "type"})
        if not ok:
            raise SweepError(f"{origin}: params.{k} must be a non-empty list of values or a {{low, high[, log, type]}} "
                             f"range, got {v!r}")
        if isinstance(v, dict) and cfg.search.kind == "grid":
            raise SweepError(f"{origin}: params.{k} is a range; search.kind=grid needs a list of values "
                             "(use search.kind=random or optuna)")
        if isinstance(v, dict):
            low, high = v["low"], v["high"]
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (low, high)) or low > high:
                raise SweepError(f"{origin}: params.{k}: a range needs numbers low <= high, got low={low!r}, high={high!r}")
            if v.get("log") and low <= 0:
                raise SweepError(f"{origin}: params.{k}: a log range needs low > 0, got low={low!r}")
    # Every listed value and both ends of every range must be valid sampler settings.
    points = [{k: x} for k, v in cfg.params.items() for x in (v if isinstance(v, list) else (v["low"], v["high"]))]
    for i, value in enumerate([cfg.fixed] + points):
        sc = dataclasses.replace(SampleConfig(), **value)
        check_values(sc, origin if i == 0 else f"{origin} (params)", SweepError, prefix="sample.")


def _check(cfg: SweepConfig, origin: str) -> SweepConfig:
    check_values(cfg, origin, SweepError)
    _check_params(cfg, origin)
    if len(cfg.objectives) != 2 or any(not o.metric for o in cfg.objectives):
        raise SweepError(f"{origin}: objectives must be two {{metric, mode: min|max}} entries")
    if cfg.constraint.metric not in (None, cfg.objectives[1].metric):
        raise SweepError(f"{origin}: constraint.metric must be the second objective ({cfg.objectives[1].metric})")
    if cfg.search.kind == "grid" and cfg.search.trials not in (None, 1):
        raise SweepError(f"{origin}: search.trials: a grid runs every point once (samples are seeded); "
                         "use search.kind=random or optuna to draw N trials")
    return cfg


def load_sweep_config(path: str | Path, overrides: list[str] = ()) -> SweepConfig:
    """Defaults <- the space YAML <- dot-list overrides, checked; errors name the file and the key."""
    if not Path(path).is_file():
        raise SweepError(f"search space file not found: {path}")
    obj: SweepConfig = load_structured(SweepConfig, path, list(overrides), SweepError)
    obj.name, obj.path = obj.name or Path(path).stem, str(path)
    return _check(obj, str(path) + (f" + overrides [{' '.join(overrides)}]" if overrides else ""))


__all__ = ["SweepConfig", "Objective", "Constraint", "Search", "Scoring", "SweepError", "load_sweep_config",
           "SAMPLE_FIELDS", "SETTING_KEYS"]
