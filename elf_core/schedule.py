"""Learning-rate schedule: linear warmup from 0, then constant (the paper's; no decay, no ``min_lr``).

The multiplier applied to the peak lr before optimizer step s (s = 0, 1, ...; ``LambdaLR``'s
``last_epoch``) is ``s / W`` for s < W and 1 afterwards, so **the very first update runs at lr 0**
(it only fills the moments). This is the official behaviour in both ports:
pt:utils/train_utils.py:102-103 (``learning_rate * step / max(1, num_warmup_steps)``, evaluated by
``LambdaLR`` at step 0 before the first ``optimizer.step()``, pt:train_step.py:272-274) and
main:utils/train_utils.py:81-83 (``optax.linear_schedule(0.0, lr, W)`` at count 0).
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from elf_core.config import OptimConfig


class LinearWarmup:
    """``step -> min(step / warmup_steps, 1)`` (1 throughout when ``warmup_steps == 0``).

    A callable object rather than a closure: picklable, and ``LambdaLR.state_dict()`` records its
    ``warmup_steps`` so a resumed scheduler can be checked against the config.
    """

    def __init__(self, warmup_steps: int):
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        return 1.0

    def __repr__(self) -> str:
        return f"LinearWarmup(warmup_steps={self.warmup_steps})"


def warmup_lr_lambda(warmup_steps: int) -> LinearWarmup:
    """The ``lr_lambda`` for ``LambdaLR``: multiplier on the peak lr at optimizer step ``step``."""
    return LinearWarmup(warmup_steps)


def build_lr_scheduler(optimizer: Optimizer, warmup_steps: int) -> LambdaLR:
    """``LambdaLR`` over every param group; call ``.step()`` once after each ``optimizer.step()``.

    Construction sets every group's lr to 0 (the step-0 value), so build it right after the
    optimizer and before the first step.
    """
    return LambdaLR(optimizer, lr_lambda=warmup_lr_lambda(warmup_steps))


def resolve_warmup_steps(cfg: OptimConfig, steps_per_epoch: int) -> int:
    """Warmup length in optimizer steps: ``int(warmup_epochs · steps_per_epoch)`` if ``warmup_epochs``
    is set (it overrides ``warmup_steps``, see config.OptimConfig), else ``warmup_steps``.

    ``int()`` truncates, as pt:train.py:195 does (OWT: int(0.5 · 19,017) = 9,508). ``steps_per_epoch``
    counts optimizer steps (the official port counts micro-batches and divides the result by
    ``grad_accum_steps`` afterwards, pt:train.py:202; identical without accumulation).
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if cfg.warmup_epochs is not None:
        if cfg.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
        return int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0 when optim.warmup_epochs is null, got {cfg.warmup_steps}")
    return int(cfg.warmup_steps)


def total_steps(cfg, steps_per_epoch: int) -> int:
    """Run length in optimizer steps of an :class:`~elf_core.config.ExperimentConfig`:
    ``train.max_steps`` if set, else ``train.epochs × steps_per_epoch`` (at least 1)."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, int(round(cfg.train.epochs * steps_per_epoch)))
