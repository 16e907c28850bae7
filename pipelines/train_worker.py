"""The Ray Train worker loop for ELF (runs on every rank; importable by workers, not a test module).

Each rank builds the frozen encoder and the network (same init seed everywhere), wraps it in DDP
— or shards it with FSDP2 (``ray.strategy=fsdp2``, :mod:`elf_core.parallel`) — when there are
several ranks, restores the latest checkpoint if Ray hands one over (or the driver
names one), and takes steps on its shard of the global batch in the resumable order of
:mod:`elf_core.batching`. Rank 0 logs metrics to MLflow and prints progress with an ETA; every rank
calls ``ray.train.report`` the same number of times (it is a barrier), rank 0 attaching checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

import ray.train
import ray.train.torch

from elf_core.batching import DataPosition, ShardedBatchOrder
from elf_core.checkpoint import load_checkpoint, save_checkpoint
from elf_core.config import ExperimentConfig, from_yaml_text
from elf_core.ema import ema_is_warm
from elf_core.collate import Collator
from elf_core.data import build_dataset
from elf_core.encoder import FrozenEncoder
from elf_core.flops import model_flops, peak_flops
from elf_core.network import ELFNetwork, count_parameters
from elf_core.parallel import full_optimizer_state, full_tensors, is_sharded, wrap_for_training
from elf_core.trainer import ELFTrainer
from pipelines.probe import QualityProbe
from pipelines.progress import Progress


def total_steps(cfg: ExperimentConfig, steps_per_epoch: int) -> int:
    """Run length in optimizer steps: ``train.max_steps`` if set, else ``epochs × steps/epoch``."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, int(round(cfg.train.epochs * steps_per_epoch)))


PROBE_ROWS = 32


def training_rows(cfg: ExperimentConfig, tokenizer, progress: bool = False):
    """``(train rows, probe rows)``: the tokenised dataset (cached on disk after the first build) and
    a fixed held-out slice for the quality probe — from ``data.eval_source`` when set, else the last
    rows of the training set, which are then excluded from training."""
    train = build_dataset(cfg.data, tokenizer, progress=progress)
    if cfg.data.eval_source:
        held = build_dataset(cfg.data, tokenizer, source=cfg.data.eval_source, split=cfg.data.eval_split,
                             progress=progress)
        return train, held.select(range(min(PROBE_ROWS, len(held))))
    n_probe = min(PROBE_ROWS, len(train) // 20)
    return train.select(range(len(train) - n_probe)), train.select(range(len(train) - n_probe, len(train)))


def _inject_failure(spec: Optional[str], step: int, rank: int, marker_dir: str) -> None:
    """Test hook: ``"exception@K"`` or ``"exit@K"`` makes rank 1 (or 0 alone) fail once at step K."""
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


def _report(metrics: dict[str, Any], ckpt_dir: Optional[Path]) -> None:
    """A barrier on every rank; rank 0 attaches the checkpoint directory."""
    if ckpt_dir is not None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)))
    else:
        ray.train.report(metrics)


def _build(cfg: ExperimentConfig, device: torch.device, rank: int, world: int):
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
    return encoder, rows, probe_rows, collate, order, trainer


def _restore(trainer: ELFTrainer, directory: str, device: torch.device) -> DataPosition:
    """Load weights, EMA, optimizer, warmup, RNG streams and the data position; return the position."""
    loaded = load_checkpoint(directory, model=trainer.net, optimizer=trainer.optimizer,
                             scheduler=trainer.scheduler, generators=trainer.generators(), map_location=device)
    if loaded.ema_state is not None:
        trainer.ema.load_state_dict(loaded.ema_state)
    trainer.step_count = loaded.step
    return DataPosition(**loaded.data_position) if loaded.data_position else DataPosition()


def _save(trainer: ELFTrainer, cfg: ExperimentConfig, step: int, position: DataPosition, run_id: str,
          rank: int) -> Optional[Path]:
    """Rank 0 writes the checkpoint (always unsharded) to a temp dir and returns it; under FSDP2
    every rank must call this, as gathering the shards is a collective."""
    ema, gathered = trainer.ema.state_dict(), {}
    if is_sharded(trainer.net):
        ema = full_tensors(ema)
        gathered = dict(model_state=full_tensors(trainer.net.state_dict()),
                        optimizer_state=full_optimizer_state(trainer.optimizer))
    if rank != 0:
        return None
    d = Path(tempfile.mkdtemp(prefix="elf-ckpt-")) / f"checkpoint_{step:08d}"
    save_checkpoint(d, model=trainer.net, config=cfg, ema_state=ema, optimizer=trainer.optimizer,
                    scheduler=trainer.scheduler, step=step, epoch=position.epoch, data_position=position.as_dict(),
                    generators=trainer.generators(), extra={"mlflow_run_id": run_id}, **gathered)
    return d


@contextlib.contextmanager
def _probe_weights(trainer: ELFTrainer, rank: int, ema: bool) -> Iterator[Optional[torch.nn.Module]]:
    """The network rank 0 probes and samples with (raw or EMA weights); None on other ranks.
    Unsharded: the live network (EMA swapped in for the block). FSDP2: the full weights are gathered
    on every rank (a collective) into a plain copy on rank 0, so rank 0 can run alone."""
    if not is_sharded(trainer.net):
        if rank != 0:
            yield None
        else:
            with trainer.ema.swapped_in(trainer.net) if ema else contextlib.nullcontext():
                yield trainer.net
        return
    state = full_tensors(trainer.ema.state_dict() if ema else trainer.net.state_dict())
    if rank != 0:
        yield None
        return
    with torch.device("meta"):  # no init work, no global-RNG draws: the weights come from `state`
        net = ELFNetwork(trainer.cfg.model, trainer.net.latent_dim, trainer.net.vocab_size)
    net.load_state_dict(state, assign=True)
    yield net.to(trainer.device)


def train_loop(loop_cfg: dict[str, Any]) -> dict[str, Any]:
    """``train_loop_per_worker`` for :class:`ray.train.torch.TorchTrainer`."""
    cfg = from_yaml_text(loop_cfg["config_yaml"], origin="train config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, cfg.ray.cpus_per_worker))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    encoder, rows, probe_rows, collate, order, trainer = _build(cfg, device, rank, world)
    n_steps = total_steps(cfg, order.steps_per_epoch)
    position, resumed_from = DataPosition(), None
    ray_ckpt = ray.train.get_checkpoint()
    if ray_ckpt is not None:  # Ray retrying this attempt after a worker failure
        with ray_ckpt.as_directory() as d:
            position, resumed_from = _restore(trainer, d, device), "Ray checkpoint"
    elif loop_cfg.get("resume_from"):  # a new submission: the newest checkpoint of an earlier attempt
        from pipelines.remote_checkpoints import local_checkpoint, redact

        with local_checkpoint(loop_cfg["resume_from"]) as d:  # an s3:// / gs:// URI: downloaded, then deleted
            position, resumed_from = _restore(trainer, d, device), redact(loop_cfg["resume_from"])

    logger = probe = progress = None
    result: dict[str, Any] = {"rank": rank}
    if rank == 0:
        from pipelines.tracking import MetricsLogger
        logger = MetricsLogger(loop_cfg["run_id"], loop_cfg["tracking_uri"])
        probe = QualityProbe(cfg, encoder, probe_rows, collate, device)
        progress = Progress(total=n_steps, start=trainer.step_count)
        print(f"[elf] rank 0 of {world} on {device}: {count_parameters(trainer.net):,} params, {len(rows):,} rows, "
              f"{order.steps_per_epoch} steps/epoch, {n_steps} steps"
              + (f"; resumed at step {trainer.step_count} from {resumed_from}" if resumed_from else ""), flush=True)
    if trainer.step_count == 0:
        with _probe_weights(trainer, rank, ema=False) as net:
            if rank == 0:
                logger.log(probe.measure(net, tag="start"), step=0)
                result["samples_start"] = probe.samples(net, cfg.tracking.log_samples)
                logger.flush()
    try:
        tokens_per_step = cfg.train.global_batch_size * cfg.data.max_length
        batches = order.iterate(position)
        metrics: dict[str, float] = {}
        while trainer.step_count < n_steps:
            pos, local_rows = next(batches)
            _inject_failure(loop_cfg.get("inject_failure"), trainer.step_count, rank, loop_cfg.get("marker_dir", "."))
            metrics = trainer.step(collate([rows[i] for i in local_rows]))
            step, position = trainer.step_count, order.advance(pos)
            metrics["tokens_per_s"] = tokens_per_step / metrics["step_time_s"]
            metrics["tflops_per_s_per_worker"] = metrics["flops"] / metrics["step_time_s"] / 1e12
            if peak is not None:  # MFU with the FLOPs this step executed (elf_core.flops)
                metrics["mfu"] = metrics["flops"] / metrics["step_time_s"] / peak
            metrics["epoch"] = pos.epoch + pos.step_in_epoch / order.steps_per_epoch
            metrics["data_first_row"] = float(local_rows[0])  # rank 0's first row: the data order, checkable
            if rank == 0 and (step % cfg.train.log_every == 0 or step in (1, n_steps)):
                logger.log(metrics, step=step)
                print(progress.line(step, metrics), flush=True)
            if step % cfg.train.checkpoint_every == 0 or step == n_steps:
                ckpt_dir = _save(trainer, cfg, step, position, loop_cfg["run_id"], rank)
                if rank == 0:
                    logger.flush()
                _report({"step": step, "loss": metrics["loss"]}, ckpt_dir)
                if ckpt_dir is not None:
                    shutil.rmtree(ckpt_dir.parent, ignore_errors=True)
        result.update(steps=trainer.step_count, last=metrics)
        use_ema = ema_is_warm(trainer.step_count, cfg.optim.ema_decay)
        with _probe_weights(trainer, rank, ema=False) as net:  # the probe measures the raw weights
            if rank == 0:
                end = probe.measure(net, tag="end")
                logger.log(end, step=trainer.step_count)
                result.update(probe_end=end, samples_weights="ema" if use_ema else "raw")
                if not use_ema:
                    result["samples"] = probe.samples(net, cfg.tracking.log_samples)
        if use_ema:  # samples come from the EMA once it is warm
            with _probe_weights(trainer, rank, ema=True) as net:
                if rank == 0:
                    result["samples"] = probe.samples(net, cfg.tracking.log_samples)
    finally:
        if logger is not None:
            logger.close()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return result


class _nullpath:
    """``with _nullpath(p) as d`` yields ``p`` (mirrors ``Checkpoint.as_directory``)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc) -> None:
        return None
