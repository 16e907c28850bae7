"""The Ray Train worker loop for ELF (runs on every rank; importable by workers, not a test module).

Each rank builds the frozen encoder and the network (same init seed everywhere), wraps it in DDP
— or shards it with FSDP2 (``ray.strategy=fsdp2``) — restores the checkpoint Ray hands over (a
retry inside this attempt) or the one the driver names (a resubmission), and takes steps on its
shard of the global batch in the resumable order of :mod:`elf_core.batching`. Rank 0 logs metrics
to MLflow and prints progress with an ETA; every rank calls ``ray.train.report`` the same number of
times (it is a barrier), rank 0 attaching checkpoints and then rotating the run's checkpoints.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import torch
import torch.distributed as dist

import ray.train
import ray.train.torch

from elf_core.batching import DataPosition
from elf_core.config import ExperimentConfig, from_yaml_text
from elf_core.ema import ema_is_warm
from elf_core.flops import peak_flops
from elf_core.network import count_parameters
from elf_core.probe import QualityProbe
from elf_core.schedule import total_steps
from pipelines import checkpoints
from pipelines.infra.filesystems import redact
from pipelines.infra.host_memory import keeps_freed_memory
from pipelines.infra.progress import Progress
from pipelines.tracking import names
from pipelines.tracking.metrics import MetricsLogger
from pipelines.training.evaluator import hand_over
from pipelines.training import worker_state as ws


def _device(cfg: ExperimentConfig) -> torch.device:
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, cfg.ray.cpus_per_worker))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def _resume(state: ws.WorkerState, loop_cfg: dict[str, Any], device: torch.device) -> tuple[DataPosition, str]:
    """The data position to continue from, and where the weights came from ("" for a fresh start)."""
    ray_ckpt = ray.train.get_checkpoint()
    if ray_ckpt is not None:  # Ray retrying this attempt after a worker failure
        with ray_ckpt.as_directory() as d:
            return ws.restore(state.trainer, d, device), "Ray checkpoint"
    if loop_cfg.get("resume_from"):  # a resubmission: the newest checkpoint of an earlier attempt
        with checkpoints.resolve(loop_cfg["resume_from"]) as r:  # URIs are downloaded, then deleted
            return ws.restore(state.trainer, str(r.path), device), redact(loop_cfg["resume_from"])
    return DataPosition(), ""


def _step_metrics(metrics: dict[str, float], cfg: ExperimentConfig, state: ws.WorkerState, pos: DataPosition,
                  first_row: int, peak: float | None) -> dict[str, float]:
    tokens = cfg.train.global_batch_size * cfg.data.max_length
    metrics["tokens_per_s"] = tokens / metrics["step_time_s"]  # step_time_s: mean over the interval
    metrics["tflops_per_s_per_worker"] = metrics["flops"] / metrics["step_time_s"] / 1e12
    if peak is not None:  # MFU with the FLOPs this step executed (elf_core.flops)
        metrics["mfu"] = metrics["flops"] / metrics["step_time_s"] / peak
    metrics["epoch"] = pos.epoch + pos.step_in_epoch / state.order.steps_per_epoch
    metrics["data_first_row"] = float(first_row)  # rank 0's first row: the data order, checkable
    return metrics


def _train(state: ws.WorkerState, cfg: ExperimentConfig, loop_cfg: dict[str, Any], position: DataPosition,
           n_steps: int, rank: int, logger: MetricsLogger | None, progress: Progress | None) -> dict[str, Any]:
    """Steps until ``n_steps``; checkpoints every ``train.checkpoint_every`` and at the end.
    Returns the last metrics, the training seconds and the evaluator handoff times (rank 0)."""
    t0 = time.perf_counter()
    trainer, device = state.trainer, state.trainer.device
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    batches, metrics, handoffs = state.order.iterate(position), {}, []
    run = {"name": cfg.name, "mlflow_run_id": loop_cfg["run_id"], "attempt": loop_cfg["attempt"]}
    while trainer.step_count < n_steps:
        pos, local_rows = next(batches)
        ws.inject_failure(loop_cfg.get("inject_failure"), trainer.step_count, rank, loop_cfg["marker_dir"])
        step = trainer.step_count + 1
        due_log = step % cfg.train.log_every == 0 or step in (1, n_steps)
        due_ckpt = step % cfg.train.checkpoint_every == 0 or step == n_steps
        # No host sync inside the step; metrics only for the steps that are read (the argmax of the
        # decode accuracy is a full pass over the logits).
        step_metrics = trainer.step(state.batch(local_rows), sync=False, metrics=due_log or due_ckpt)
        position = state.order.advance(pos)
        if not (due_log or due_ckpt):
            continue
        # The one sync (and all-reduce) of the interval: every rank reaches it at the same steps.
        metrics = _step_metrics(step_metrics.materialize(), cfg, state, pos, local_rows[0], peak)
        if rank == 0 and due_log:
            logger.log(names.step_metrics(metrics), step=step)
            progress.update(step, metrics)
        if due_ckpt:
            ckpt_dir = ws.save(trainer, cfg, position, run, rank)
            if rank == 0:
                logger.flush()
            ws.report({"step": step, "loss": metrics["loss"]}, ckpt_dir)
            if ckpt_dir is not None:
                shutil.rmtree(ckpt_dir.parent, ignore_errors=True)
                ws.rotate(loop_cfg, _hand_over(loop_cfg, step, handoffs))
    return {"metrics": metrics, "train_seconds": time.perf_counter() - t0, "handoff_s": handoffs}


def _hand_over(loop_cfg: dict[str, Any], step: int, handoffs: list[float]) -> tuple[str, ...]:
    """Rank 0: a due checkpoint goes to the evaluator beside training (by reference, not waited
    for); returns the checkpoints rotation must spare while they are scored."""
    if not loop_cfg.get("evaluator"):
        return ()
    t0 = time.perf_counter()
    spared = hand_over(loop_cfg["evaluator"], loop_cfg["run_root"], step, due=step % loop_cfg["eval_every"] == 0)
    handoffs.append(time.perf_counter() - t0)
    return spared


def _probe_and_sample(state: ws.WorkerState, probe: QualityProbe | None, cfg: ExperimentConfig, rank: int,
                      logger: MetricsLogger | None, *, end: bool) -> dict[str, Any]:
    """The probe (raw weights) at the current step, and samples: raw weights at the start, EMA
    weights at the end once the EMA is warm. Every rank calls this (FSDP2 gathers collectively)."""
    trainer, out = state.trainer, {}
    use_ema = end and ema_is_warm(trainer.step_count, cfg.optim.ema_decay)
    key = "samples" if end else "samples_start"
    with ws.probe_weights(trainer, rank, ema=False) as net:
        if rank == 0:
            out["probe"] = probe.measure(net)
            logger.log(names.probe_metrics(out["probe"]), step=trainer.step_count)
            logger.flush()
            if not use_ema:
                out[key] = probe.samples(net, cfg.tracking.log_samples)
    if use_ema:
        with ws.probe_weights(trainer, rank, ema=True) as net:
            if rank == 0:
                out[key] = probe.samples(net, cfg.tracking.log_samples)
    out["samples_weights"] = "ema" if use_ema else "raw"
    return out


def train_loop(loop_cfg: dict[str, Any]) -> dict[str, Any]:
    """``train_loop_per_worker`` for :class:`ray.train.torch.TorchTrainer`; rank 0 returns the summary."""
    cfg = from_yaml_text(loop_cfg["config_yaml"], origin="train config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(cfg)
    state = ws.build(cfg, device, rank, world)
    n_steps = total_steps(cfg, state.order.steps_per_epoch)
    position, resumed_from = _resume(state, loop_cfg, device)
    trainer = state.trainer
    logger = probe = progress = None
    if rank == 0:
        logger = MetricsLogger(loop_cfg["run_id"], loop_cfg["tracking_uri"])
        probe = QualityProbe(cfg, state.encoder, state.probe_rows, state.collate, device)
        progress = Progress(total=n_steps, start=trainer.step_count, tag="[elf]", every_s=0)
        kept = " (freed host memory kept)" if keeps_freed_memory() else ""  # the driver's env on CPU
        print(f"[elf] rank 0 of {world} on {device}{kept}: "
              f"{count_parameters(trainer.net):,} params, {len(state.rows):,} rows, {state.order.steps_per_epoch} "
              f"steps/epoch, {n_steps} steps"
              + (f"; resumed at step {trainer.step_count} from {resumed_from}" if resumed_from else ""), flush=True)
    result: dict[str, Any] = {"rank": rank}
    try:
        if trainer.step_count == 0:
            result["start"] = _probe_and_sample(state, probe, cfg, rank, logger, end=False)
        result.update(_train(state, cfg, loop_cfg, position, n_steps, rank, logger, progress))
        result["end"] = _probe_and_sample(state, probe, cfg, rank, logger, end=True)
        result["steps"] = trainer.step_count
    finally:
        if logger is not None:
            logger.close()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return result
