"""What a run name means on resubmission: the same name is the same run.

A run is identified by its config ``name``. Everything about it lives under one storage prefix,
``<ray.storage_path>/<name>/`` (one ``attempt-*`` directory per submission, at most
``train.keep_checkpoints`` complete checkpoints over all of them), and it is bound to one MLflow run:
the one its checkpoints record in ``meta.json`` (never found by name or guesswork).

:func:`plan_run` decides what a submission does:

* **no checkpoint yet** — a new MLflow run, from step 0;
* **same name, not finished** — resume the recorded MLflow run from the newest complete
  checkpoint; the loss curve and the data order continue;
* **same name, finished** (the MLflow run is FINISHED and its newest checkpoint reached the planned
  steps) — nothing runs: one line says where it finished, where its model is and how to continue
  (raise ``train.max_steps`` / ``train.epochs``: the same MLflow run continues) or start over;
* **same name, changed config** — any change other than :data:`RESUMABLE_CHANGES` is one error
  naming the changed keys and offering ``--fresh`` or a new name;
* **--fresh** — earlier attempts are retired for good (:func:`pipelines.checkpoints.retire_run`)
  and a new MLflow run is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Optional

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from elf_core.config import ExperimentConfig, from_yaml_text, to_flat_dict
from elf_core.errors import ElfError
from pipelines import checkpoints
from pipelines.infra import filesystems as fsx

# What may differ between a run's checkpoint and its resubmission: run length, cadence, resources,
# and where the same files live (paths on another machine, the tracking store's address).
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.eval_every", "train.eval_every_epochs", "train.output_dir",
                     "data.cache_dir", "data.cache_latents", "data.latent_cache_dtype", "tracking.uri",
                     "tracking.log_samples", "eval.*", "ray.*")


class RunStateError(ElfError):
    """A submission that does not fit the run its name refers to."""


@dataclass
class RunPlan:
    action: str  # "new" | "resume" | "finished"
    root: str  # <ray.storage_path>/<name>
    checkpoint: Optional[checkpoints.StoredCheckpoint] = None
    mlflow_run_id: Optional[str] = None
    retired: Optional[str] = None  # the --fresh line
    changed: tuple[str, ...] = ()  # resumable keys that differ from the checkpoint's config

    @property
    def start_step(self) -> int:
        return self.checkpoint.step if self.checkpoint else 0


def run_root(cfg: ExperimentConfig) -> str:
    return fsx.child(cfg.ray.storage_path, cfg.name)


def changed_keys(saved: ExperimentConfig, now: ExperimentConfig) -> tuple[list[str], list[str]]:
    """``(refused, resumable)``: config keys whose values differ, split by :data:`RESUMABLE_CHANGES`."""
    a, b = to_flat_dict(saved), to_flat_dict(now)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    resumable = [k for k in diff if any(fnmatch(k, pat) for pat in RESUMABLE_CHANGES)]
    return [k for k in diff if k not in resumable], resumable


def _saved_config(ckpt: checkpoints.StoredCheckpoint) -> ExperimentConfig:
    where = fsx.child(ckpt.location, checkpoints.CONFIG_FILE)
    return from_yaml_text(fsx.read_text(where, "read the checkpoint's config"), origin=fsx.redact(where))


def _check_same_run(cfg: ExperimentConfig, ckpt: checkpoints.StoredCheckpoint, saved: ExperimentConfig) -> list[str]:
    if saved.name != cfg.name:
        raise RunStateError(f"{fsx.redact(ckpt.location)} is a checkpoint of run '{saved.name}', not '{cfg.name}'; "
                            f"it does not belong under {fsx.redact(run_root(cfg))} (move it, or pass --fresh)")
    refused, resumable = changed_keys(saved, cfg)
    if refused:
        shown = ", ".join(f"{k} ({to_flat_dict(saved)[k]!r} -> {to_flat_dict(cfg)[k]!r})" for k in refused[:8])
        raise RunStateError(
            f"run '{cfg.name}' was trained with a different config: {shown}"
            + (f" and {len(refused) - 8} more" if len(refused) > 8 else "")
            + f". Only run length, log / checkpoint / evaluation cadence, the evaluation settings (eval.*), "
            "Ray resources and where files live may change on resubmission; pass "
            f"--fresh to start '{cfg.name}' over, or set a new name=...")
    return resumable


def plan_run(cfg: ExperimentConfig, planned_steps: int, client: MlflowClient, *, fresh: bool) -> RunPlan:
    """Decide what this submission of ``cfg`` does (module docstring). Raises RunStateError."""
    root = run_root(cfg)
    fsx.check_writable(cfg.ray.storage_path, f"write to the run's storage (ray.storage_path={cfg.ray.storage_path})")
    if fresh:
        return RunPlan("new", root, retired=checkpoints.retire_run(root))
    ckpt = checkpoints.newest_checkpoint(root)
    if ckpt is None:
        return RunPlan("new", root)
    resumable = _check_same_run(cfg, ckpt, _saved_config(ckpt))
    run_id = ckpt.run_record.get("mlflow_run_id")
    try:
        status = client.get_run(run_id).info.status if run_id else None
    except MlflowException:
        status = None
    if status is None:
        raise RunStateError(
            f"the checkpoints of run '{cfg.name}' ({fsx.redact(ckpt.location)}, step {ckpt.step}) belong to MLflow run "
            f"{run_id or '(none recorded)'}, which is not in {client.tracking_uri}; point tracking.uri / "
            "MLFLOW_TRACKING_URI at the store it was logged to, or pass --fresh to start over")
    action = "finished" if status == "FINISHED" and ckpt.step >= planned_steps else "resume"
    return RunPlan(action, root, ckpt, run_id, changed=tuple(resumable))


def finished_line(cfg: ExperimentConfig, plan: RunPlan, planned_steps: int, model: Optional[str]) -> str:
    """The one line a resubmission of a finished run prints."""
    assert plan.checkpoint is not None
    length = (f"train.max_steps (now {cfg.train.max_steps})" if cfg.train.max_steps is not None
              else f"train.epochs (now {cfg.train.epochs:g})")
    return (f"[elf] run '{cfg.name}' already finished at step {plan.checkpoint.step} (MLflow run "
            f"{plan.mlflow_run_id}; model {model or 'not registered'}); nothing to do. To continue it, raise "
            f"{length}; to start over, pass --fresh (or another name=...).")


__all__ = ["RunPlan", "RunStateError", "RESUMABLE_CHANGES", "plan_run", "changed_keys", "finished_line", "run_root"]
