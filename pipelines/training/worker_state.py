"""What a Ray Train worker builds, restores and saves: the encoder, data, batch order and trainer of
one rank; checkpoints in and out (always unsharded, gathered to rank 0 only under FSDP2); the
network the probe measures; and keep-K rotation over every attempt of the run after each save.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

import ray.train

from elf_core.batching import DataPosition, ShardedBatchOrder
from elf_core.checkpoint import load_checkpoint, save_checkpoint
from elf_core.collate import Collator
from elf_core.config import ExperimentConfig
from elf_core.data import training_rows
from elf_core.encoder import FrozenEncoder
from elf_core.flops import model_flops
from elf_core.latent_cache import LatentCache, latent_cache_for
from elf_core.network import ELFNetwork
from elf_core.parallel import gather_full_state, is_sharded, wrap_for_training
from elf_core.trainer import ELFTrainer
from pipelines import checkpoints


@dataclass
class WorkerState:
    """Everything one rank trains with."""

    encoder: FrozenEncoder
    rows: Any  # datasets.Dataset of tokenised training rows
    probe_rows: Any
    collate: Collator
    order: ShardedBatchOrder
    trainer: ELFTrainer
    latents: Optional[LatentCache] = None  # data.cache_latents: the encoder's outputs, computed once

    def batch(self, indices: list[int]) -> dict[str, Any]:
        """The collated rows (and their cached latents, when there is a cache)."""
        batch = self.collate([self.rows[i] for i in indices])
        if self.latents is not None:
            batch["latents"] = self.latents.rows(indices)
        return batch


def latent_cache(cfg: ExperimentConfig, rows: Any, collate: Collator, encoder: FrozenEncoder) -> Optional[LatentCache]:
    """``data.cache_latents``: the first worker on each machine builds the cache (with a progress
    bar) while the others wait at a barrier, then every worker memory-maps the same file."""
    if not cfg.data.cache_latents:
        return None
    builder = ray.train.get_context().get_local_rank() == 0
    cache = latent_cache_for(cfg.data, rows, collate, encoder, progress=True) if builder else None
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return cache or latent_cache_for(cfg.data, rows, collate, encoder, progress=False)


def build(cfg: ExperimentConfig, device: torch.device, rank: int, world: int) -> WorkerState:
    """Encoder, data, batch order, and a trainer whose network is identically initialised on every rank."""
    encoder = FrozenEncoder.from_config(cfg.encoder, device)
    rows, probe_rows = training_rows(cfg, encoder.tokenizer)
    collate = Collator.from_config(cfg.data, encoder.eos_id, encoder.pad_id)
    order = ShardedBatchOrder(len(rows), cfg.train.global_batch_size, cfg.train.seed, rank, world)
    torch.manual_seed(cfg.train.seed)
    net = ELFNetwork(cfg.model, encoder.dim, encoder.vocab_size)

    def wrap(m: torch.nn.Module) -> torch.nn.Module:  # DDP or FSDP2 (ray.strategy), optionally compiled
        return wrap_for_training(m, strategy=cfg.ray.strategy, world_size=world, device=device,
                                 compile=cfg.train.compile)

    hf = encoder.model.config
    mf = model_flops(cfg.model, encoder.dim, encoder.vocab_size, cfg.data.max_length,
                     encoder_layers=getattr(hf, "num_layers", getattr(hf, "num_hidden_layers", 0)),
                     encoder_dim=encoder.dim, encoder_ff=getattr(hf, "d_ff", getattr(hf, "intermediate_size", 0)))
    trainer = ELFTrainer(cfg, net, encoder, device=device, steps_per_epoch=order.steps_per_epoch,
                         rank=rank, world_size=world, wrap=wrap, model_flops=mf)
    return WorkerState(encoder, rows, probe_rows, collate, order, trainer, latent_cache(cfg, rows, collate, encoder))


def restore(trainer: ELFTrainer, directory: str, device: torch.device) -> DataPosition:
    """Load weights, EMA, optimizer, warmup and the data position; return the position."""
    loaded = load_checkpoint(directory, model=trainer.net, optimizer=trainer.optimizer,
                             scheduler=trainer.scheduler, generators=trainer.generators(), map_location=device)
    if loaded.ema_state is not None:
        trainer.ema.load_state_dict(loaded.ema_state)
    trainer.step_count = loaded.step
    return DataPosition(**loaded.data_position) if loaded.data_position else DataPosition()


def save(trainer: ELFTrainer, cfg: ExperimentConfig, position: DataPosition, run: dict[str, str],
         rank: int) -> Optional[Path]:
    """Rank 0 writes the checkpoint (always unsharded) to a temp dir and returns it; every rank must
    call this (under FSDP2 the gather is a collective), the others get None."""
    full = gather_full_state(trainer.net, rank=rank, optimizer=trainer.optimizer, ema=trainer.ema)
    if full is None:
        return None
    step = trainer.step_count
    d = Path(tempfile.mkdtemp(prefix="elf-ckpt-")) / f"checkpoint_{step:08d}"
    save_checkpoint(d, model=trainer.net, config=cfg, ema_state=full.ema, optimizer=trainer.optimizer,
                    scheduler=trainer.scheduler, step=step, epoch=position.epoch, data_position=position.as_dict(),
                    generators=trainer.generators(), extra={"mlflow_run_id": run["mlflow_run_id"]}, run=run,
                    model_state=full.model, optimizer_state=full.optimizer)
    return d


def report(metrics: dict[str, Any], ckpt_dir: Optional[Path]) -> None:
    """``ray.train.report``: a barrier on every rank; rank 0 attaches the checkpoint directory."""
    if ckpt_dir is not None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)))
    else:
        ray.train.report(metrics)


def rotate(loop_cfg: dict[str, Any], protect: tuple[str, ...] = ()) -> list[str]:
    """Rank 0, after a checkpoint was reported: keep ``train.keep_checkpoints`` over every attempt,
    sparing ``protect`` (checkpoints the evaluator beside training is scoring or about to)."""
    return checkpoints.rotate_checkpoints(loop_cfg["run_root"], loop_cfg["keep_checkpoints"], protect=protect)


@contextlib.contextmanager
def probe_weights(trainer: ELFTrainer, rank: int, ema: bool) -> Iterator[Optional[torch.nn.Module]]:
    """The network rank 0 probes and samples with (raw or EMA weights); None on other ranks.
    Unsharded: the live network (EMA swapped in for the block). FSDP2: the full weights are gathered
    to rank 0 only (a collective) into a plain copy there, so rank 0 can run alone."""
    if not is_sharded(trainer.net):
        if rank != 0:
            yield None
            return
        with trainer.ema.swapped_in(trainer.net) if ema else contextlib.nullcontext():
            yield trainer.net
        return
    full = gather_full_state(trainer.net, rank=rank, ema=trainer.ema if ema else None)
    if full is None:
        yield None
        return
    with torch.device("meta"):  # no init work, no global-RNG draws: the weights come from `full`
        net = ELFNetwork(trainer.cfg.model, trainer.net.latent_dim, trainer.net.vocab_size)
    net.load_state_dict({**full.model, **(full.ema or {})}, assign=True)
    yield net.to(trainer.device)


def inject_failure(spec: Optional[str], step: int, rank: int, marker_dir: str) -> None:
    """Test hook: ``"exception@K"`` or ``"exit@K"`` makes rank 1 (or 0 alone) fail once at step K;
    a marker file makes the retry pass."""
    if not spec:
        return
    mode, at = spec.split("@")
    world = ray.train.get_context().get_world_size()
    if step != int(at) or rank != min(1, world - 1):
        return
    marker = Path(marker_dir) / f"failed-{mode}-{at}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(time.time()))
    if mode == "exit":
        os._exit(1)
    raise RuntimeError(f"injected failure at step {step} (test hook)")


__all__ = ["WorkerState", "build", "restore", "save", "report", "rotate", "probe_weights", "inject_failure"]
