"""Exponential moving average of the model's parameters (the weights used for sampling).

``EMA(model, decay)`` keeps an fp32 shadow of every parameter, initialised from the current weights;
``update(model)`` (once per optimizer step, after ``scheduler.step()``) does
``ema ← ema + (1 − d)·(p − ema)`` = d·ema + (1 − d)·p, written as ``lerp_`` exactly like the
official ``ema_update`` (pt:utils/train_utils.py:136-142). As there, the shadow covers
``named_parameters()`` — all of them, frozen ones included (pt:utils/train_utils.py:44-46) — and no
buffers (ELFNetwork has none). The decay is constant (0.9999), no warmup of the decay.

``state_dict()`` is a flat ``{param name: fp32 tensor}`` (safetensors-ready); the decay comes from
the config. Wrapped models (DDP ``.module``, ``torch.compile`` ``._orig_mod``) are unwrapped first,
so names never carry wrapper prefixes. Under FSDP2 the shadow holds DTensor shards like the
parameters; ``state_dict()`` returns them live (gather with :func:`elf_core.parallel.gather_full_state`)
and ``load_state_dict`` takes full tensors and keeps this rank's shard.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
import torch.nn as nn

from elf_core.parallel import shard_like


_DATA_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip any nesting of ``torch.compile`` (``._orig_mod``) and DDP / DataParallel (``.module``).

    ``.module`` is only followed on the data-parallel wrappers, so a user model that merely has a
    submodule called ``module`` is not mistaken for a wrapper.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) and isinstance(model, _DATA_PARALLEL):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def ema_is_warm(step: int, decay: float) -> bool:
    """Whether an EMA started from the initial weights has averaged over enough steps to be used
    for sampling: ``step ≥ 1 / (1 − decay)`` (10,000 steps at 0.9999). Short runs sample with the
    raw weights instead (spec §3: "sampling uses EMA; short runs need raw weights")."""
    return decay < 1.0 and step >= 1.0 / (1.0 - decay)


class EMA:
    """fp32 shadow parameters with a constant decay."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32, copy=True) for name, p in unwrap_model(model).named_parameters()
        }

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(unwrap_model(model).named_parameters())
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())
            extra = sorted(params.keys() - self.shadow.keys())
            raise KeyError(f"EMA/model parameter names differ: not in model {missing[:5]}, not in EMA {extra[:5]}")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema ← d·ema + (1 − d)·p`` for every parameter."""
        weight = 1.0 - self.decay
        for name, p in self._params(model).items():
            self.shadow[name].lerp_(p.detach().to(torch.float32), weight)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the EMA weights (cast to each parameter's dtype)."""
        for name, p in self._params(model).items():
            p.copy_(self.shadow[name])

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (e.g. for sampling); restores on exit."""
        params = self._params(model)
        backup = {name: p.detach().clone() for name, p in params.items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{name: fp32 tensor}`` (the live tensors — clone or save before further updates)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy a saved shadow in place; names and shapes must match exactly."""
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys())
            extra = sorted(state.keys() - self.shadow.keys())
            raise KeyError(f"EMA state_dict: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, t in state.items():
            if t.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state_dict: '{name}' has shape {tuple(t.shape)}, "
                                 f"expected {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(shard_like(t, self.shadow[name]))  # full -> this rank's shard under FSDP2
