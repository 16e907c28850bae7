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

Checkpoints are always written unsharded (:func:`gather_full_state`: a collective under FSDP2 that
leaves the full state on rank 0 only, in CPU memory),
so a checkpoint written by an FSDP2 run loads in a DDP run, on one process or in evaluation, and the
other way round; :func:`load_full_model_state` / :func:`shard_optimizer_state` put full tensors back
into whatever form the live model has.

Invariant FSDP2 adds: every rank must run the same number of forward passes per step (each pass
all-gathers), which :mod:`elf_core.flow` keeps by running a pass even on zero rows.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

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
@dataclass
class FullState:
    """A rank-0 copy of the whole training state in the unsharded form checkpoints are written in.
    ``optimizer`` is ``optimizer.state_dict()``'s id-keyed form; ``ema`` holds the EMA shadows."""

    model: dict[str, torch.Tensor]
    optimizer: Optional[dict[str, Any]] = None
    ema: Optional[dict[str, torch.Tensor]] = None


_FULL_ON_RANK0 = None  # StateDictOptions(full_state_dict=True, cpu_offload=True), built on first use


def _full_options():
    global _FULL_ON_RANK0
    if _FULL_ON_RANK0 is None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # full_state_dict + cpu_offload: shards are gathered to rank 0 only, straight into CPU memory;
        # every other rank gets an empty dict (torch.distributed.checkpoint.state_dict docs).
        _FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return _FULL_ON_RANK0


def _id_keyed(fqn_state: Mapping[str, Any], optimizer: torch.optim.Optimizer, net: nn.Module) -> dict[str, Any]:
    """DCP's parameter-name-keyed optimizer state in ``optimizer.state_dict()``'s form: parameters
    numbered in param-group order, as ``torch.optim.Optimizer.state_dict`` numbers them."""
    names = {id(p): n for n, p in net.named_parameters()}
    index = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    return {"state": {index[k]: dict(v) for k, v in fqn_state["state"].items()},
            "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in fqn_state["param_groups"]]}


def gather_full_state(net: nn.Module, *, rank: int, optimizer: Optional[torch.optim.Optimizer] = None,
                      ema: Any = None) -> Optional[FullState]:
    """The full model state (plus, when given, the optimizer state and the EMA shadows) on rank 0;
    None on every other rank.

    FSDP2 (sharded ``net``): a collective every rank must call. Shards are gathered to rank 0 only,
    offloaded to CPU as they arrive (``get_model_state_dict`` / ``get_optimizer_state_dict`` with
    ``full_state_dict=True, cpu_offload=True``), so no rank but 0 ever holds a full tensor. The EMA is
    gathered by swapping it into the sharded parameters for the gather. Unsharded (DDP or one
    process): every replica is identical, so rank 0 returns its live state (no copies) and the other
    ranks nothing, without communication.
    """
    if not is_sharded(net):
        if rank != 0:
            return None
        return FullState(dict(net.state_dict()), optimizer.state_dict() if optimizer is not None else None,
                         ema.state_dict() if ema is not None else None)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _full_options()
    model = get_model_state_dict(net, options=opts)
    optim = get_optimizer_state_dict(net, optimizer, options=opts) if optimizer is not None else None
    shadows = None
    if ema is not None:
        with ema.swapped_in(net):
            swapped = get_model_state_dict(net, options=opts)
        shadows = {k: swapped[k].to(torch.float32) for k in ema.state_dict()} if rank == 0 else None
    if rank != 0:
        return None
    return FullState(model, _id_keyed(optim, optimizer, net) if optim is not None else None, shadows)


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
           "FullState", "gather_full_state", "shard_like", "load_full_model_state", "shard_optimizer_state"]
