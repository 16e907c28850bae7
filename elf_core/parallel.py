"""Data-parallel training wrappers for an ELFNetwork — DDP or FSDP2 — and moving state between the
sharded form a rank trains with and the full form checkpoints are written in.

* ``ddp`` (default): a full replica per rank; gradients are all-reduced after backward. Simplest and
  fastest while the replica, its gradients and the optimizer state (Muon momentum, Adam moments:
  ~16 bytes per parameter in all) fit on one GPU — ELF-B (105M) easily.
* ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` with one unit per transformer block plus the root
  (embeddings, heads). Parameters, gradients and optimizer state are DTensors sharded along dim 0
  over the ranks; each block is all-gathered just before it runs and freed after, and gradients are
  reduce-scattered (averaged, as DDP does). For ELF-M/L on many GPUs, where per-rank memory matters.
  Parameters stay fp32 (bf16 comes from autocast, as in the official port), so an FSDP2 step computes
  the same update as a DDP step up to float summation order.

Checkpoints are always written unsharded (:func:`full_tensors`, a collective every rank must call),
so a checkpoint written by an FSDP2 run loads in a DDP run, on one process or in evaluation, and the
other way round; :func:`load_full_model_state` / :func:`shard_optimizer_state` put full tensors back
into whatever form the live model has.

Invariant FSDP2 adds: every rank must run the same number of forward passes per step (each pass
all-gathers), which :mod:`elf_core.flow` keeps by running a pass even on zero rows.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Mapping

import torch
import torch.nn as nn

STRATEGIES = ("ddp", "fsdp2")


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: Any) -> bool:
    return isinstance(t, _dtensor_type())


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 DTensors."""
    return any(is_dtensor(p) for p in model.parameters())


def wrap_for_training(net: nn.Module, *, strategy: str, world_size: int, device: torch.device,
                      compile: bool = False) -> nn.Module:
    """The module the training forward goes through.

    ``ddp``: ``DDP(torch.compile(net))`` (each layer optional). ``fsdp2``: ``net`` itself, sharded in
    place (its parameters become DTensors), blocks compiled in place first when ``compile``.
    One rank, either strategy: the plain (optionally compiled) network.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"ray.strategy={strategy!r}: choose one of {STRATEGIES}")
    if strategy == "fsdp2" and world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # nn.Linear on 3-D input returns a view, which FSDP2 warns about on every forward in case the
        # caller edits it in place; ELF's callers (flow, probe) never do, so the warning is noise.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(device.type, (world_size,))
        for block in net.blocks:  # one FSDP unit per block: gathered just in time, freed after
            if compile:
                block.compile()  # in place: parameter names stay those of the checkpoint
            fully_shard(block, mesh=mesh)
        fully_shard(net, mesh=mesh)  # the root unit: embeddings, prefix tokens, both heads
        return net
    model = torch.compile(net) if compile else net
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    return model


def set_gradient_sync(model: nn.Module, sync: bool):
    """A context for one micro-batch's backward: skip (``sync=False``) or do the gradient
    all-reduce / reduce-scatter. DDP: ``no_sync()``; FSDP2: ``set_requires_gradient_sync``."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: a flag its backward hooks read
        model.set_requires_gradient_sync(sync)
    elif not sync and hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def to_scalar(t: torch.Tensor | float) -> float:
    """A float from a plain tensor or a replicated DTensor (e.g. the FSDP2 grad norm)."""
    if is_dtensor(t):
        t = t.full_tensor()
    return float(t)


# ----------------------------------------------------------------------------------------------
# Full <-> sharded state
def full_tensors(state: Mapping[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """``state`` with every DTensor all-gathered into a plain tensor on ``device`` (other values as
    they are). A collective when anything is sharded: every rank calls it with the same keys."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if is_dtensor(v):
            v = v.full_tensor()
        out[k] = v.detach().to(device) if isinstance(v, torch.Tensor) else v
    return out


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` in the form of ``like``: this rank's shard as a DTensor with ``like``'s mesh and
    placements (sliced locally, no communication), or ``full`` itself on ``like``'s device/dtype."""
    full = full.to(device=like.device, dtype=like.dtype)
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def _check_shapes(full: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor], origin: str) -> None:
    missing, unexpected = sorted(live.keys() - full.keys()), sorted(full.keys() - live.keys())
    if missing or unexpected:
        raise KeyError(f"{origin}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in full.items():
        if tuple(t.shape) != tuple(live[k].shape):  # a DTensor's .shape is the global shape
            raise ValueError(f"{origin}: '{k}' has shape {tuple(t.shape)}, the model has {tuple(live[k].shape)}")


@torch.no_grad()
def load_full_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str = "state") -> None:
    """Copy full (unsharded) parameters into ``model``, sharded or not; names and shapes must match."""
    params = dict(model.named_parameters())
    _check_shapes(state, params, origin)
    for name, p in params.items():
        p.copy_(shard_like(state[name], p))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with sharded state all-gathered (collective when sharded)."""
    sd = optimizer.state_dict()
    return {"state": {i: full_tensors(s) for i, s in sd["state"].items()}, "param_groups": sd["param_groups"]}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, full: Mapping[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict reshaped for ``optimizer``'s (possibly sharded) parameters: every
    tensor shaped like its parameter becomes that parameter's shard; scalars stay. Load the result
    with ``optimizer.load_state_dict``."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in full["state"].items():
        p = params[int(i)]
        state[i] = {k: shard_like(v, p) if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape) else v
                    for k, v in s.items()}
    return {"state": state, "param_groups": full["param_groups"]}


__all__ = ["STRATEGIES", "wrap_for_training", "set_gradient_sync", "is_sharded", "is_dtensor", "to_scalar",
           "full_tensors", "shard_like", "load_full_model_state", "full_optimizer_state", "shard_optimizer_state"]
