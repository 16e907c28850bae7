"""Value rules declared next to config fields, checked in one place.

A field's valid range (or its choices) lives in the dataclass, in the field's metadata::

    lr: Optional[float] = ranged(None, gt=0)
    sampler: str = ranged("sde", choices=("ode", "sde"))

and :func:`check_values` checks every rule of a dataclass tree — the experiment config, a sampling
config read from a list, a sweep's settings — raising one error that names the key, the value and
the range. ``None`` passes a rule (an unset ``Optional`` field); types are OmegaConf's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Optional

RULE = "elf_rule"


@dataclass(frozen=True)
class Rule:
    """Bounds (``ge`` ≤ v, ``gt`` < v, v ≤ ``le``, v < ``lt``) or a tuple of ``choices``."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    choices: Optional[tuple] = None

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        lo = f"[{self.ge:g}" if self.ge is not None else (f"({self.gt:g}" if self.gt is not None else "(-inf")
        hi = f"{self.le:g}]" if self.le is not None else (f"{self.lt:g})" if self.lt is not None else "inf)")
        return f"in {lo}, {hi}"

    def holds(self, v: Any) -> bool:
        if self.choices is not None:
            return v in self.choices
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            return False
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))


def ranged(default: Any = None, *, default_factory: Optional[Callable[[], Any]] = None, **rule: Any) -> Any:
    """A dataclass field with a :class:`Rule` in its metadata."""
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={RULE: Rule(**rule)})
    return field(default=default, metadata={RULE: Rule(**rule)})


def rule_of(cls: type, name: str) -> Optional[Rule]:
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get(RULE)
    return None


def violations(obj: Any, prefix: str = "") -> list[tuple[str, Any, Rule]]:
    """``(key, value, rule)`` of every field of the dataclass tree ``obj`` that breaks its rule."""
    bad = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            bad.extend(violations(value, f"{prefix}{f.name}."))
            continue
        if isinstance(value, (list, tuple)):  # a list of sections: objectives.0.mode, ...
            for i, item in enumerate(value):
                if is_dataclass(item):
                    bad.extend(violations(item, f"{prefix}{f.name}.{i}."))
        rule = f.metadata.get(RULE)
        if rule is not None and value is not None and not rule.holds(value):
            bad.append((f"{prefix}{f.name}", value, rule))
    return bad


def check_values(obj: Any, origin: str, error: type[Exception], prefix: str = "") -> None:
    """Raise ``error`` naming ``origin``, the key, the value and the valid range of the first bad value."""
    bad = violations(obj, prefix)
    if bad:
        key, value, rule = bad[0]
        raise error(f"{origin}: {key}={value!r} is not {rule.describe()}")


__all__ = ["Rule", "ranged", "rule_of", "violations", "check_values"]
