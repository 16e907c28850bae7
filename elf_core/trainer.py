"""One rank's training state and step: network (+ DDP/FSDP2/compile wrapper), optimizer, warmup, EMA, RNG.

``ELFTrainer.step(batch)`` runs one optimizer step — gradient accumulation over micro-batches, the
ELF loss (:mod:`elf_core.flow`), clipping, Muon/Adam, warmup, EMA — and returns plain-float metrics,
all-reduced over ranks when ``torch.distributed`` is initialised. Distribution, tracking and
checkpoint reporting are the caller's business (``pipelines/``); this module is pure torch.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from elf_core.config import ExperimentConfig, learning_rate
from elf_core.ema import EMA
from elf_core.flops import ModelFlops, step_flops
from elf_core.flow import StepNoise, encode_for_step, flow_loss
from elf_core.network import ELFNetwork
from elf_core.optim import build_optimizer
from elf_core.parallel import set_gradient_sync, to_scalar
from elf_core.schedule import build_lr_scheduler, resolve_warmup_steps

# Token-weighted metrics: (name, weight key); summed as value·weight and divided after all-reduce.
_WEIGHTED = (("ce", "decode_tokens"), ("decode_acc", "decode_tokens"), ("l2", "denoise_tokens"))


def noise_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """A distinct 63-bit seed per (run seed, rank, optimizer step, micro-batch): a counter-based RNG."""
    h = seed
    for part in (rank, step, micro):
        h = (h * 0x9E3779B97F4A7C15 + part + 1) % (1 << 63)
    return h


class ELFTrainer:
    """Holds everything a rank needs to take training steps and to be checkpointed/resumed."""

    def __init__(self, cfg: ExperimentConfig, net: ELFNetwork, encoder: nn.Module, *, device: torch.device,
                 steps_per_epoch: int, rank: int = 0, world_size: int = 1,
                 wrap: Optional[Callable[[nn.Module], nn.Module]] = None,
                 model_flops: Optional[ModelFlops] = None):
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
        # The flow's noise: an explicit generator, re-seeded from (seed, rank, step, micro-batch) before
        # every micro-batch (see noise_seed) — resuming needs no RNG state and is exact on every rank.
        self.noise_gen = torch.Generator(device=device)
        self.rank = rank
        self.step_count = 0
        self.world_size = world_size
        self.model_flops = model_flops  # when given, each step reports the FLOPs it executed

    # ------------------------------------------------------------------------------------------
    def generators(self) -> dict[str, torch.Generator]:
        """Named RNG streams whose state checkpoints must carry: none — every draw of a step is a pure
        function of (seed, rank, step), so a resumed run (on any rank) draws what the original would."""
        return {}

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on this rank's share of the global batch."""
        t0 = time.perf_counter()
        self.model.train()
        accum = self.cfg.train.grad_accum_steps
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        rows = batch["input_ids"].shape[0]
        if rows % accum:
            raise ValueError(f"local batch of {rows} rows is not divisible by train.grad_accum_steps={accum}")
        size = rows // accum
        sums: dict[str, torch.Tensor] = {}
        self._executed_flops = 0.0
        for i in range(accum):
            micro = {k: v[i * size:(i + 1) * size] for k, v in batch.items()}
            self.noise_gen.manual_seed(noise_seed(self.cfg.train.seed, self.rank, self.step_count, i))
            with set_gradient_sync(self.model, sync=i == accum - 1):  # reduce grads on the last only
                out = self._micro_step(micro)
                (out.loss / accum).backward()
            weights = dict(_WEIGHTED)
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0) + (v * out.metrics[weights[k]] if k in weights else v)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.net)
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        metrics = self._reduce(sums, accum)
        metrics["grad_norm"] = to_scalar(grad_norm)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["step_time_s"] = time.perf_counter() - t0
        if self.model_flops is not None:
            metrics["flops"] = self._executed_flops  # this rank's share
        return metrics

    def _micro_step(self, batch: dict[str, torch.Tensor]):
        ids = batch["input_ids"]
        shape = (ids.shape[0], ids.shape[1], self.net.latent_dim)
        noise = StepNoise.draw(shape, self.cfg.flow, self.noise_gen, self.device)
        if self.model_flops is not None:  # rows each pass runs on (see flow_loss)
            dec = noise.decode
            self._executed_flops += step_flops(self.model_flops, shape[0], int((~dec).sum()),
                                               int((~dec & noise.sc).sum()), int(dec.sum()))
        x0 = encode_for_step(self.encoder, batch, noise)
        return flow_loss(self.model, x0, ids, batch["cond_mask"], batch["loss_mask"], noise, self.cfg.flow,
                         bf16=self.cfg.train.bf16)

    def _reduce(self, sums: dict[str, torch.Tensor], accum: int) -> dict[str, float]:
        """Loss: mean over micro-batches and ranks; branch metrics: token-weighted over everything."""
        names = sorted(sums)
        vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in names])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vec)
            n = dist.get_world_size()
        else:
            n = 1
        total = dict(zip(names, vec.tolist()))
        out = {"loss": total["loss"] / (accum * n)}
        for k, wkey in _WEIGHTED:
            out[k] = total[k] / max(total[wkey], 1.0)
        out["decode_tokens"] = total["decode_tokens"]
        out["denoise_tokens"] = total["denoise_tokens"]
        return out
