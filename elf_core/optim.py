"""Muon for 2-D weights + Nesterov-Adam for the rest, as one self-contained ``torch.optim.Optimizer``.

This is the optimiser of the paper (``optax.contrib.muon`` defaults; reference §2.6), written out so
that every formula is visible and testable — no third-party ``muon`` package, no monkey-patching.

Partition: every trainable parameter with ``p.ndim == 2`` goes to Muon, everything else (biases,
norm gains, the (1, 4, H) learned token tensors) to Nesterov-Adam. Per parameter, with k = 1 on the
first step (k = ``state["step"]`` after the increment):

Muon (β = 0.95, 5 Newton–Schulz steps)::

    m ← β·m + (1−β)·g
    u = β·m/(1−β^{k+1}) + (1−β)·g/(1−β^k)          # Nesterov with bias correction
    o = NS5(u) · √max(1, fan_out/fan_in)              # NS5 in fp32, see newton_schulz5
    p ← p − lr·o

Nesterov-Adam (β1 = 0.9, β2 = 0.999, eps = 1e-8)::

    m ← β1·m + (1−β1)·g ;  v ← β2·v + (1−β2)·g²
    m̂ = β1·m/(1−β1^{k+1}) + (1−β1)·g/(1−β1^k) ;  v̂ = v/(1−β2^k)
    p ← p − lr·m̂/(√v̂ + eps)

No weight decay in either branch (the paper uses none; ``optim.weight_decay != 0`` is an error).

**Fan orientation.** ``nn.Linear.weight`` is stored (out, in), so fan_out/fan_in = rows/cols. The
two bare kernels of :class:`~elf_core.network.ELFNetwork`, ``proj_kernel`` (H×D) and
``unembed_kernel`` (D×V), are stored (in, out) as in the JAX original, so fan_out/fan_in = cols/rows
(the unembedding gets √(32100/512) ≈ 7.92). The orientation is decided once, at build time, by
:func:`partition_parameters`: Linear weights are ``out_in``; names listed in ``in_out_names``
(default :data:`IN_OUT_KERNELS`) are ``in_out``; any other 2-D parameter is an error that names it
(the official port silently assumes (in, out) for those). Each Muon param group carries its
``layout``, so the choice is saved in ``state_dict()`` and visible in logs.

**Missing gradients** (``p.grad is None``) are treated as zeros, as the official port does
(pt:utils/muon_utils.py:116-118): the moments still decay and the step counter still advances, so
such a parameter still moves. ``p.grad`` itself is left untouched.

**Distributed** (``distributed=True`` with an initialised process group; grads must already be
identical on all ranks, e.g. after DDP's all-reduce): every rank updates every momentum buffer
(cheap, elementwise) so the optimizer state is complete on every rank and rank 0's checkpoint is
whole — the official port keeps each Muon buffer only on its owner rank (pt:utils/muon_utils.py:126-129)
yet saves rank 0's state alone (pt:utils/checkpoint_utils.py:51-65), so a resumed DDP run restarts
(world−1)/world of the Muon moments. Muon parameter i is orthogonalised and updated only on rank
``i % world`` (the official ``params[rank::world]`` split) and the owner broadcasts the new values.
Results are bit-identical to the single-process path (same device type and thread count).

**FSDP2** (parameters are DTensor shards, :mod:`elf_core.parallel`): detected from the parameters;
momentum and Adam run on the local shards, and each Muon matrix's Nesterov blend is all-gathered,
orthogonalised by one rank (round-robin, ``world`` matrices at a time) and broadcast, every rank
keeping its slice. Assumes the 1-D mesh over all ranks that ``wrap_for_training`` builds.

Checked once against the official port's own update code (its ``muon`` dependency stubbed): six
steps on a tiny ELFNetwork gave bit-identical parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from elf_core.config import OptimConfig
from elf_core.ema import unwrap_model
from elf_core.parallel import is_dtensor, shard_like

MUON, ADAM = "muon", "adam"
OUT_IN, IN_OUT = "out_in", "in_out"  # storage orientation of a 2-D weight

# ELFNetwork's bare (in, out) kernels (decode head: y @ proj_kernel, h @ unembed_kernel).
IN_OUT_KERNELS: tuple[str, ...] = ("proj_kernel", "unembed_kernel")

# Newton–Schulz quintic coefficients (a, b, c) shared by optax.contrib.muon and Keller Jordan's Muon.
NS_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-8


# ----------------------------------------------------------------------------------------------
# Partition


@dataclass(frozen=True)
class ParamSpec:
    """One trainable parameter, the algorithm that updates it, and (Muon only) its orientation."""

    name: str
    param: nn.Parameter
    algo: str  # MUON | ADAM
    layout: Optional[str]  # OUT_IN | IN_OUT for Muon, None for Adam


def partition_parameters(model: nn.Module, in_out_names: Sequence[str] = IN_OUT_KERNELS,
                         adam_names: Sequence[str] = ()) -> list[ParamSpec]:
    """Assign each trainable parameter (in ``named_parameters`` order) to Muon or Adam.

    ``model`` may be wrapped in DDP / ``torch.compile``; names are those of the unwrapped module.
    Works on ``meta``-device models (nothing is read from the tensors but their shapes).
    ``adam_names`` forces named 2-D parameters onto Adam (not the paper's setting; see
    ``OptimConfig.adam_params``).
    """
    inner = unwrap_model(model)
    linear_weights = {id(m.weight) for m in inner.modules() if isinstance(m, nn.Linear)}
    in_out = set(in_out_names)
    named = dict(inner.named_parameters())
    for name in in_out:
        if name not in named:
            raise ValueError(f"in_out_names: model {type(inner).__name__} has no parameter '{name}'")
        if named[name].ndim != 2:
            raise ValueError(f"in_out_names: parameter '{name}' has shape {tuple(named[name].shape)}, not 2-D")
        if id(named[name]) in linear_weights:
            raise ValueError(f"in_out_names: '{name}' is an nn.Linear weight, which is stored (out, in)")
    unknown = sorted(set(adam_names) - named.keys())
    if unknown:
        raise ValueError(f"optim.adam_params: model {type(inner).__name__} has no parameter(s) {unknown}")
    specs = []
    for name, p in named.items():
        if not p.requires_grad:
            continue
        if p.ndim != 2 or name in adam_names:
            specs.append(ParamSpec(name, p, ADAM, None))
        elif id(p) in linear_weights:
            specs.append(ParamSpec(name, p, MUON, OUT_IN))
        elif name in in_out:
            specs.append(ParamSpec(name, p, MUON, IN_OUT))
        else:
            raise ValueError(
                f"parameter '{name}' {tuple(p.shape)} is 2-D but neither an nn.Linear weight (out, in) nor "
                f"listed in in_out_names {sorted(in_out)}; Muon needs its orientation for the fan scale"
            )
    return specs


# ----------------------------------------------------------------------------------------------
# The Muon pieces


def newton_schulz5(g: torch.Tensor, steps: int = 5, eps: float = NS_EPS) -> torch.Tensor:
    """Approximate the orthogonal polar factor U·Vᵀ of a 2-D ``g`` (returns fp32, same shape).

    Runs on the wide orientation (rows ≤ cols, transposing a tall input and back) so that
    ``A = X Xᵀ`` is the small Gram matrix; X is first scaled to ‖X‖_F ≤ 1 so every singular value is
    in the basin of the iteration ``X ← a X + (b A + c A²) X``. With these coefficients the singular
    values do not converge to 1 but land in roughly [0.68, 1.14] (measured in tests/core/test_optim.py).
    Matches pt:utils/muon_utils.py:35-47 and optax.contrib.muon's ``orthogonalize_via_newton_schulz``.
    The matmuls follow the global fp32 matmul precision: with TF32 enabled
    (``torch.set_float32_matmul_precision("high")``, as pt:train.py:127-131 does) they run in TF32.

    A 3-D ``g`` (k, m, n) is k matrices orthogonalised at once with batched matmuls (each matrix's
    Frobenius norm is taken on its own, exactly as for a 2-D input). On CPU (MKL) that equals k
    separate calls bit for bit for the shapes an ELF network has (tests/core/test_optim.py); for tiny
    matrices (m·m·n < 400 multiply-adds) torch's batched matmul takes a different kernel and the
    last bits differ.
    """
    if g.ndim not in (2, 3):
        raise ValueError(f"newton_schulz5 expects a 2-D tensor (or a 3-D stack), got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFS
    x = g.to(torch.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    if x.ndim == 2:
        norm = torch.linalg.matrix_norm(x)  # Frobenius norm
    else:
        norm = torch.stack([torch.linalg.matrix_norm(m) for m in x]).view(-1, 1, 1)
    x = x / (norm + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def muon_shape_scale(shape: Sequence[int], layout: str) -> float:
    """√max(1, fan_out/fan_in): (out, in) storage -> rows/cols, (in, out) storage -> cols/rows."""
    rows, cols = shape[-2], shape[-1]
    if layout == OUT_IN:
        return math.sqrt(max(1.0, rows / cols))
    if layout == IN_OUT:
        return math.sqrt(max(1.0, cols / rows))
    raise ValueError(f"unknown Muon layout '{layout}' (expected '{OUT_IN}' or '{IN_OUT}')")


# ----------------------------------------------------------------------------------------------
# The optimizer


def _check_group(i: int, group: dict) -> None:
    algo = group.get("algo")
    where = f"MuonAdam param group {i} (algo={algo!r})"
    if "weight_decay" in group:
        raise ValueError(f"{where}: weight_decay is not supported (the paper uses none)")
    required = {MUON: ("lr", "layout", "momentum", "ns_steps"), ADAM: ("lr", "betas", "eps")}.get(algo, ())
    missing = [k for k in required if k not in group]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    if not 0.0 <= group["lr"]:
        raise ValueError(f"{where}: lr must be >= 0, got {group['lr']}")
    if algo == MUON:
        if group.get("layout") not in (OUT_IN, IN_OUT):
            raise ValueError(f"{where}: layout must be '{OUT_IN}' or '{IN_OUT}', got {group.get('layout')!r}")
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"{where}: momentum must be in [0, 1), got {group['momentum']}")
        if int(group["ns_steps"]) < 1:
            raise ValueError(f"{where}: ns_steps must be >= 1, got {group['ns_steps']}")
        for p in group["params"]:
            if p.ndim != 2:
                raise ValueError(f"{where}: Muon only updates 2-D parameters, got shape {tuple(p.shape)}")
    elif algo == ADAM:
        b1, b2 = group["betas"]
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"{where}: betas must be in [0, 1), got {group['betas']}")
        if not group["eps"] > 0.0:
            raise ValueError(f"{where}: eps must be > 0, got {group['eps']}")
    else:
        raise ValueError(f"{where}: 'algo' must be '{MUON}' or '{ADAM}'")


def _nesterov(g: torch.Tensor, m: torch.Tensor, k: int, beta: float) -> torch.Tensor:
    """The bias-corrected Nesterov blend Muon orthogonalises: β m̂_{k+1} + (1 − β) ĝ_k."""
    return beta * (m / (1.0 - beta ** (k + 1))) + (1.0 - beta) * (g / (1.0 - beta ** k))


def _foreach_nesterov(gs: list[torch.Tensor], ms: list[torch.Tensor], k: int, beta: float) -> list[torch.Tensor]:
    """:func:`_nesterov` over lists (same ops in the same order, so the same bits on CPU)."""
    out = torch._foreach_div(ms, 1.0 - beta ** (k + 1))
    torch._foreach_mul_(out, beta)
    g_part = torch._foreach_div(gs, 1.0 - beta ** k)
    torch._foreach_mul_(g_part, 1.0 - beta)
    torch._foreach_add_(out, g_part)
    return out


# Largest stack of same-shape matrices orthogonalised in one batched call (elements, fp32: 512 MiB).
NS_BATCH_ELEMENTS = 1 << 27

# Adam's update is a chain of ~10 elementwise passes over g, m, v, p and three temporaries. Over a
# large tensor (the CPU default puts the 384 × 30,522 unembedding, 45 MB an array, in Adam) every
# pass streams from main memory; run on one slice of this many elements at a time (7 arrays of 512
# KiB), the whole chain stays in the L3 cache. `python benchmarks/step_profile.py`, 2-core AMD EPYC:
# the step's optimizer part 0.086 s sliced against 0.147 s unsliced under glibc's default malloc;
# the same either way once the worker keeps freed memory (pipelines/infra/host_memory.py).
# Elementwise ops give the same bits however the tensor is sliced (pinned by
# tests/core/test_optim.py::test_sliced_adam_is_bit_identical_to_the_per_parameter_loop). CPU
# tensors only: on CUDA each slice would be a kernel launch, and the passes run at HBM speed.
ADAM_SLICE_ELEMENTS = 1 << 17


def _adam_slices(ps: list[torch.Tensor], gs: list[torch.Tensor], ms: list[torch.Tensor], vs: list[torch.Tensor],
                 size: int) -> Iterable[tuple[list[torch.Tensor], ...]]:
    """(ps, gs, ms, vs) work lists: every tensor of at most ``size`` elements in one list, and each
    larger one (contiguous, on the CPU, not sharded) as flat slices of ``size``, one at a time.
    Slices are views: in-place updates of p, m and v land in the parameters and the state."""
    small, large = [], []
    for i, p in enumerate(ps):
        sliceable = p.device.type == "cpu" and not is_dtensor(p) and all(
            t.is_contiguous() for t in (p, gs[i], ms[i], vs[i]))
        (large if p.numel() > size and sliceable else small).append(i)
    if small:
        yield tuple([ts[i] for i in small] for ts in (ps, gs, ms, vs))
    for i in large:
        flat = [t.view(-1) for t in (ps[i], gs[i], ms[i], vs[i])]
        for start in range(0, flat[0].numel(), size):
            yield tuple([t[start:start + size]] for t in flat)


class MuonAdam(torch.optim.Optimizer):
    """Muon (groups with ``algo='muon'``) and Nesterov-Adam (``algo='adam'``) behind one ``step()``.

    Group keys — Muon: ``params, lr, algo, layout, momentum, ns_steps``; Adam: ``params, lr, algo,
    betas, eps``. Use :func:`build_optimizer` rather than building groups by hand. State per param:
    Muon ``{"step": int, "momentum_buffer"}``, Adam ``{"step": int, "exp_avg", "exp_avg_sq"}``; the
    step counters are plain ints, so ``state_dict()`` round-trips exactly and loads with
    ``torch.load(weights_only=True)``.

    Speed: the elementwise parts (momenta, Nesterov blend, all of Adam) run as ``torch._foreach_*``
    ops over all parameters at once — the same ops per tensor as a loop, so the same bits on CPU
    (on CUDA they are multi-tensor kernels); Adam runs its chain on cache-sized slices of large
    tensors (:data:`ADAM_SLICE_ELEMENTS`). ``batch_newton_schulz`` orthogonalises same-shape Muon
    matrices as one (k, m, n) stack with batched matmuls (:func:`newton_schulz5`); default (None):
    on for CUDA parameters, off on CPU, where it measured no faster for the tiny model and is not
    bit-identical for tiny matrices.
    """

    def __init__(self, param_groups: Iterable[dict], *, distributed: bool = False,
                 batch_newton_schulz: Optional[bool] = None):
        groups = [dict(g) for g in param_groups]
        for i, g in enumerate(groups):
            g["params"] = list(g["params"])
            _check_group(i, g)
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("MuonAdam(distributed=True) needs an initialised torch.distributed process group")
        self.distributed = distributed
        self.batch_newton_schulz = batch_newton_schulz
        super().__init__(groups, defaults={})

    # -- per-parameter pieces ----------------------------------------------------------------
    @staticmethod
    def _grad(p: torch.Tensor) -> torch.Tensor:
        return p.grad if p.grad is not None else torch.zeros_like(p)

    def _state(self, p: torch.Tensor, *buffers: str) -> dict:
        """``self.state[p]`` with its step counter advanced (and zero buffers on the first step)."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            for name in buffers:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        return state

    def _muon_momentum(self, p: torch.Tensor, group: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Advance m and the step counter; return (g, m, k)."""
        state = self._state(p, "momentum_buffer")
        g, m = self._grad(p), state["momentum_buffer"]
        m.lerp_(g, 1.0 - group["momentum"])  # m ← β m + (1−β) g
        return g, m, state["step"]

    def _muon_blends(self, muon: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
        """Advance every Muon momentum and return each parameter's Nesterov blend u (foreach)."""
        ks = [self._state(p, "momentum_buffer")["step"] for p, _ in muon]
        gs = [self._grad(p) for p, _ in muon]
        ms = [self.state[p]["momentum_buffer"] for p, _ in muon]
        us: list[Optional[torch.Tensor]] = [None] * len(muon)
        for (beta, k), idx in _bucket(muon, lambda i: (muon[i][1]["momentum"], ks[i])).items():
            sub_m, sub_g = [ms[i] for i in idx], [gs[i] for i in idx]
            torch._foreach_lerp_(sub_m, sub_g, 1.0 - beta)  # m ← β m + (1−β) g
            for i, u in zip(idx, _foreach_nesterov(sub_g, sub_m, k, beta)):
                us[i] = u
        return us  # type: ignore[return-value]

    def _orthogonalise_and_apply(self, items: list[tuple[torch.Tensor, dict, torch.Tensor]]) -> None:
        """``p ← p − lr · NS5(u) · scale`` for each (p, group, u); same-shape stacks batched if enabled."""
        def key(i: int):
            p, group, u = items[i]
            batch = self.batch_newton_schulz if self.batch_newton_schulz is not None else p.device.type == "cuda"
            return (tuple(u.shape), u.dtype, u.device, group["layout"], int(group["ns_steps"]), group["lr"],
                    i if not batch else -1)
        for (shape, _, _, layout, steps, lr, _), idx in _bucket(items, key).items():
            per_stack = max(1, NS_BATCH_ELEMENTS // math.prod(shape))
            for start in range(0, len(idx), per_stack):
                chunk = idx[start:start + per_stack]
                u = items[chunk[0]][2] if len(chunk) == 1 else torch.stack([items[i][2] for i in chunk])
                o = newton_schulz5(u, steps=steps)
                o.mul_(muon_shape_scale(shape, layout))
                outs = [o] if len(chunk) == 1 else list(o.unbind(0))
                for i, o_i in zip(chunk, outs):
                    p = items[i][0]
                    p.add_(o_i.to(p.dtype), alpha=-lr)

    def _adam_group(self, group: dict) -> None:
        """Nesterov-Adam over one group's parameters (foreach, per step count k)."""
        params = group["params"]
        if not params:
            return
        (b1, b2), eps, lr = group["betas"], group["eps"], group["lr"]
        ks = [self._state(p, "exp_avg", "exp_avg_sq")["step"] for p in params]
        for k, idx in _bucket(params, lambda i: ks[i]).items():
            every = [params[i] for i in idx]
            grads = [self._grad(p) for p in every]
            exp_avgs = [self.state[p]["exp_avg"] for p in every]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in every]
            for ps, gs, ms, vs in _adam_slices(every, grads, exp_avgs, exp_avg_sqs, ADAM_SLICE_ELEMENTS):
                torch._foreach_lerp_(ms, gs, 1.0 - b1)
                torch._foreach_lerp_(vs, torch._foreach_mul(gs, gs), 1.0 - b2)  # g² (square is g·g)
                m_hat = _foreach_nesterov(gs, ms, k, b1)
                v_hat = torch._foreach_div(vs, 1.0 - b2 ** k)
                torch._foreach_sqrt_(v_hat)
                torch._foreach_add_(v_hat, eps)
                torch._foreach_div_(m_hat, v_hat)
                torch._foreach_add_(ps, m_hat, alpha=-lr)

    # -- step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon = [(p, g) for g in self.param_groups if g["algo"] == MUON for p in g["params"]]
        if muon and is_dtensor(muon[0][0]):  # FSDP2: parameters and state are dim-0 shards
            self._muon_sharded(muon)
        elif self.distributed:
            self._muon_distributed(muon)
        elif muon:
            us = self._muon_blends(muon)
            self._orthogonalise_and_apply([(p, g, u) for (p, g), u in zip(muon, us)])
        for group in self.param_groups:
            if group["algo"] == ADAM:
                self._adam_group(group)
        return loss

    def _muon_distributed(self, muon: list[tuple[torch.Tensor, dict]]) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        if not muon:
            return
        us = self._muon_blends(muon)  # every rank: state stays complete everywhere
        # Muon parameter i is orthogonalised by rank i % world; the owner never touches p again this step.
        self._orthogonalise_and_apply([(p, g, u) for i, ((p, g), u) in enumerate(zip(muon, us)) if i % world == rank])
        pending = [dist.broadcast(p.data, src=i % world, async_op=True) for i, (p, _) in enumerate(muon)]
        for work in pending:  # issued in the same order on every rank
            work.wait()

    def _muon_sharded(self, muon: list[tuple[torch.Tensor, dict]]) -> None:
        """Muon on FSDP2 DTensor parameters. Momentum is elementwise, so it stays on the local
        shards; Newton-Schulz needs the whole matrix: the Nesterov blend ``u`` is all-gathered, one
        rank per matrix (round-robin) orthogonalises it and broadcasts the result, and every rank
        applies its own slice. Same update as one process (the all-gather copies exactly)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        for start in range(0, len(muon), world):  # `world` matrices at a time bounds the full copies held
            chunk, pending = muon[start:start + world], []
            for j, (p, group) in enumerate(chunk):
                g, m, k = self._muon_momentum(p, group)
                u = _nesterov(g, m, k, group["momentum"]).full_tensor()  # all-gather
                if j == rank:
                    o = newton_schulz5(u, steps=int(group["ns_steps"]))
                    o.mul_(muon_shape_scale(p.shape, group["layout"]))
                else:
                    o = torch.empty_like(u)
                pending.append((p, group, o, dist.broadcast(o, src=j, async_op=True)))
            for p, group, o, work in pending:
                work.wait()
                p.add_(shard_like(o, p), alpha=-group["lr"])


def _bucket(items: Sequence, key: Callable[[int], object]) -> dict[object, list[int]]:
    """Indices of ``items`` grouped by ``key(i)``, groups and members in first-seen order."""
    out: dict[object, list[int]] = {}
    for i in range(len(items)):
        out.setdefault(key(i), []).append(i)
    return out


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    lr: float,
    *,
    distributed: bool = False,
    in_out_names: Sequence[str] = IN_OUT_KERNELS,
) -> MuonAdam:
    """The paper's optimizer for ``model``: groups [Muon (out,in), Muon (in,out), Adam], all at ``lr``.

    ``lr`` is the peak (post-warmup) rate; attach :func:`elf_core.schedule.build_lr_scheduler` for the
    warmup. Empty groups are left out. ``cfg.weight_decay`` must be 0.
    """
    if cfg.weight_decay != 0.0:
        raise ValueError(f"optim.weight_decay={cfg.weight_decay}: weight decay is not supported (the paper uses 0)")
    if not lr > 0.0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    specs = partition_parameters(model, in_out_names, cfg.adam_params)
    muon_group = dict(lr=lr, algo=MUON, momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps)
    adam_group = dict(lr=lr, algo=ADAM, betas=(cfg.adam_b1, cfg.adam_b2), eps=cfg.adam_eps)
    groups = [
        dict(muon_group, layout=OUT_IN, params=[s.param for s in specs if s.algo == MUON and s.layout == OUT_IN]),
        dict(muon_group, layout=IN_OUT, params=[s.param for s in specs if s.algo == MUON and s.layout == IN_OUT]),
        dict(adam_group, params=[s.param for s in specs if s.algo == ADAM]),
    ]
    return MuonAdam([g for g in groups if g["params"]], distributed=distributed)
