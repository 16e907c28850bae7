"""One rank's training state and step: network (+ DDP/FSDP2/compile wrapper), optimizer, warmup, EMA, RNG.

``ELFTrainer.step(batch)`` runs one optimizer step — gradient accumulation over micro-batches, the
ELF loss (:mod:`elf_core.flow`), clipping, Muon/Adam, warmup, EMA — and returns plain-float metrics,
all-reduced over ranks when ``torch.distributed`` is initialised. Distribution, tracking and
checkpoint reporting are the caller's business (``pipelines/``); this module is pure torch.

**Metrics without a host sync per step.** ``step(batch, sync=False)`` returns a
:class:`StepMetrics` whose values are still device tensors: the step itself makes no
host↔device synchronisation (the branch coins are drawn on the host, FLOPs are counted from
them, the metrics stay on the device). ``StepMetrics.materialize()`` is the one sync — and, when
``torch.distributed`` is initialised, an all-reduce that **every rank must call at the same
steps** (e.g. every ``train.log_every`` steps). ``step(batch)`` (``sync=True``) is
``step(batch, sync=False).materialize()``. A caller that will not read a step's metrics passes
``metrics=False``, which skips the decode-accuracy argmax (the only costly metric); such a step
cannot be materialised.

**Cached latents.** A batch may carry ``"latents"`` (B, S, D), the frozen encoder's outputs from
:mod:`elf_core.latent_cache`; the encoder then runs only on label-dropped rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, overload

import torch
import torch.distributed as dist
import torch.nn as nn

from elf_core.config import ExperimentConfig, learning_rate
from elf_core.ema import EMA
from elf_core.flops import ModelFlops, official_step_flops, step_flops
from elf_core.flow import StepNoise, encode_for_step, flow_loss
from elf_core.network import ELFNetwork
from elf_core.optim import build_optimizer
from elf_core.parallel import is_dtensor, set_gradient_sync
from elf_core.schedule import build_lr_scheduler, resolve_warmup_steps

# Token-weighted metrics: (name, weight key); summed as value·weight and divided after all-reduce.
_WEIGHTED = (("ce", "decode_tokens"), ("decode_acc", "decode_tokens"), ("l2", "denoise_tokens"))


def noise_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """A distinct 63-bit seed per (run seed, rank, optimizer step, micro-batch): a counter-based RNG."""
    h = seed
    for part in (rank, step, micro):
        h = (h * 0x9E3779B97F4A7C15 + part + 1) % (1 << 63)
    return h


@dataclass
class _Interval:
    """Wall time since the last materialised step: ``step_time_s`` is its mean per step."""

    start: Optional[float] = None
    steps: int = 0

    def begin(self, t0: float) -> None:
        if self.start is None:
            self.start = t0
        self.steps += 1

    def close(self) -> float:
        per_step = (time.perf_counter() - self.start) / max(self.steps, 1) if self.start is not None else 0.0
        self.start, self.steps = None, 0
        return per_step


@dataclass
class StepMetrics:
    """One step's metrics, still on the device (nothing has been read back yet)."""

    sums: dict[str, torch.Tensor]  # this rank's sums over micro-batches (branch means token-weighted)
    accum: int
    grad_norm: torch.Tensor
    lr: float
    flops: Optional[float]  # this rank's executed FLOPs (host-counted), None without model_flops
    _interval: _Interval = field(repr=False)
    complete: bool = True  # False: taken with step(metrics=False), decode_acc was not computed
    _values: Optional[dict[str, float]] = field(default=None, repr=False)

    def materialize(self) -> dict[str, float]:
        """Plain floats: loss (mean over micro-batches and ranks), ce / l2 / decode_acc (token-weighted
        over everything), token counts, grad_norm, lr, step_time_s (mean wall time per step since the
        previous materialised step — this step alone when every step is materialised), flops.

        One device→host copy; with ``torch.distributed`` initialised also one all-reduce, so every
        rank must call it at the same steps. Calling it again returns the same dict.
        """
        if self._values is not None:
            return self._values
        if not self.complete:
            raise ValueError("this step was taken with ELFTrainer.step(metrics=False): its metrics were not computed")
        names = sorted(self.sums)
        vec = torch.stack([self.sums[k].to(torch.float64) for k in names])
        n = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vec)
            n = dist.get_world_size()
        grad_norm = self.grad_norm.full_tensor() if is_dtensor(self.grad_norm) else self.grad_norm
        values = torch.cat([vec, grad_norm.detach().to(torch.float64).view(1)]).tolist()  # the one sync
        total = dict(zip(names, values[:-1]))
        out = {"loss": total["loss"] / (self.accum * n)}
        for k, wkey in _WEIGHTED:
            out[k] = total[k] / max(total[wkey], 1.0)
        out["decode_tokens"] = total["decode_tokens"]
        out["denoise_tokens"] = total["denoise_tokens"]
        out["grad_norm"] = values[-1]
        out["lr"] = self.lr
        out["step_time_s"] = self._interval.close()
        if self.flops is not None:
            out["flops"] = self.flops
        self._values = out
        return out


class ELFTrainer:
    """Holds everything a rank needs to take training steps and to be checkpointed/resumed.

    ``all_rows=True`` runs the official port's compute pattern (every pass on every row; for
    benchmarks). With ``cfg.train.compile`` the flow marks its row dimensions dynamic
    (:func:`elf_core.flow.flow_loss` ``dynamic_rows``) so the compiled network is not recompiled
    for every new row count.
    """

    def __init__(self, cfg: ExperimentConfig, net: ELFNetwork, encoder: nn.Module, *, device: torch.device,
                 steps_per_epoch: int, rank: int = 0, world_size: int = 1,
                 wrap: Optional[Callable[[nn.Module], nn.Module]] = None,
                 model_flops: Optional[ModelFlops] = None, all_rows: bool = False):
        self.cfg = cfg
        self.device = device
        self.net = net.to(device)
        self.encoder = encoder
        self.model = wrap(self.net) if wrap is not None else self.net  # what the forward goes through
        self.lr = learning_rate(cfg)
        self.optimizer = build_optimizer(self.net, cfg.optim, self.lr, distributed=world_size > 1)
        self.warmup_steps = resolve_warmup_steps(cfg.optim, steps_per_epoch)
        self.scheduler = build_lr_scheduler(self.optimizer, self.warmup_steps)
        self.ema = EMA(self.net, cfg.optim.ema_decay)
        # The flow's noise: explicit generators, re-seeded from (seed, rank, step, micro-batch) before
        # every micro-batch (see noise_seed) — resuming needs no RNG state and is exact on every rank.
        # The branch coins come from a CPU generator (on CPU: the same one, so one stream as always),
        # so that which rows each pass runs on is known on the host.
        self.noise_gen = torch.Generator(device=device)
        self.coin_gen = self.noise_gen if device.type == "cpu" else torch.Generator()
        self.rank = rank
        self.step_count = 0
        self.world_size = world_size
        self.model_flops = model_flops  # when given, each step reports the FLOPs it executed
        self.all_rows = all_rows
        self._interval = _Interval()

    # ------------------------------------------------------------------------------------------
    def generators(self) -> dict[str, torch.Generator]:
        """Named RNG streams whose state checkpoints must carry: none — every draw of a step is a pure
        function of (seed, rank, step), so a resumed run (on any rank) draws what the original would."""
        return {}

    @overload
    def step(self, batch: dict[str, torch.Tensor], *, sync: Literal[True] = ..., metrics: bool = ...
             ) -> dict[str, float]: ...

    @overload
    def step(self, batch: dict[str, torch.Tensor], *, sync: Literal[False], metrics: bool = ...) -> StepMetrics: ...

    def step(self, batch: dict[str, torch.Tensor], *, sync: bool = True,
             metrics: bool = True) -> dict[str, float] | StepMetrics:
        """One optimizer step on this rank's share of the global batch (module docstring: ``sync``,
        ``metrics``).

        ``batch``: the collated tensors (``input_ids``, ``encoder_mask``, ``cond_mask``,
        ``loss_mask``, optionally ``latents``); other entries (raw strings) are ignored.
        """
        if sync and not metrics:
            raise ValueError("ELFTrainer.step(sync=True, metrics=False): a synced step returns its metrics")
        t0 = time.perf_counter()
        self._interval.begin(t0)
        self.model.train()
        accum = self.cfg.train.grad_accum_steps
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        rows = batch["input_ids"].shape[0]
        if rows % accum:
            raise ValueError(f"local batch of {rows} rows is not divisible by train.grad_accum_steps={accum}")
        size = rows // accum
        sums: dict[str, torch.Tensor] = {}
        flops = 0.0
        for i in range(accum):
            micro = {k: v[i * size:(i + 1) * size] for k, v in batch.items()}
            seed = noise_seed(self.cfg.train.seed, self.rank, self.step_count, i)
            self.noise_gen.manual_seed(seed)
            if self.coin_gen is not self.noise_gen:
                self.coin_gen.manual_seed(seed)
            with set_gradient_sync(self.model, sync=i == accum - 1):  # reduce grads on the last only
                out, micro_flops = self._micro_step(micro, accuracy=metrics)
                (out.loss / accum).backward()
            flops += micro_flops
            weights = dict(_WEIGHTED)
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0) + (v * out.metrics[weights[k]] if k in weights else v)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.net)
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        result = StepMetrics(sums, accum, grad_norm, self.optimizer.param_groups[0]["lr"],
                             flops if self.model_flops is not None else None, self._interval, complete=metrics)
        return result.materialize() if sync else result

    def _micro_step(self, batch: dict[str, torch.Tensor], accuracy: bool = True):
        """(flow output, FLOPs executed) for one micro-batch; FLOPs come from the host-side coins."""
        ids = batch["input_ids"]
        shape = (ids.shape[0], ids.shape[1], self.net.latent_dim)
        noise = StepNoise.draw(shape, self.cfg.flow, self.noise_gen, self.device, coin_gen=self.coin_gen)
        flops = 0.0
        if self.model_flops is not None:  # rows each pass runs on (see flow_loss)
            if self.all_rows:
                flops = official_step_flops(self.model_flops, shape[0])
            else:
                _, dec, sc = noise.host_coins()
                flops = step_flops(self.model_flops, shape[0], int((~dec).sum()), int((~dec & sc).sum()),
                                   int(dec.sum()))
            if "latents" in batch:  # the encoder runs on label-dropped rows only
                drop, _, _ = noise.host_coins()
                flops -= (shape[0] - int(drop.sum())) * self.model_flops.encoder_forward
        x0 = encode_for_step(self.encoder, batch, noise)
        out = flow_loss(self.model, x0, ids, batch["cond_mask"], batch["loss_mask"], noise, self.cfg.flow,
                        bf16=self.cfg.train.bf16, all_rows=self.all_rows, dynamic_rows=self.cfg.train.compile,
                        accuracy=accuracy)
        return out, flops
