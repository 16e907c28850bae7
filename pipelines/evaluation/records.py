"""The record of one evaluation: its MLflow run (a child of the training run that produced the
checkpoint, so the training run's page leads to it; else in experiment ``elf/eval``), its params
(the provenance of every number), its metrics at the checkpoint's step, and the samples as a JSONL
artifact and a table; plus the same files on disk.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Optional

from mlflow import MlflowClient

from elf_core.config import SampleConfig
from pipelines.evaluation.session import EvalResult, EvalSession
from pipelines.tracking import runs
from pipelines.tracking.metrics import log_metrics

EVAL_EXPERIMENT = "elf/eval"  # evaluations of checkpoints no known training run produced
PROVENANCE_TAGS = ("evaluator", "evaluator_dtype", "checkpoint", "checkpoint_step", "seed", "num_samples", "task")


@contextlib.contextmanager
def evaluation_run(client: MlflowClient, session: EvalSession, name: str, sample_cfg: SampleConfig,
                   num_samples: Optional[int], seed: Optional[int]) -> Iterator[str]:
    """An MLflow run for one sampling config, open while it samples and scores (so Ctrl-C or a crash
    leaves it KILLED / FAILED, never RUNNING)."""
    exp_id, parent = runs.home_of(client, session.ckpt.training_run_id, EVAL_EXPERIMENT, note="[eval]")
    n = session.sample_count(sample_cfg, num_samples)
    prov = session.provenance(sample_cfg, n, int(seed if seed is not None else sample_cfg.seed))
    tags = {f"elf.eval.{k}": prov[k] for k in PROVENANCE_TAGS if k in prov}
    if parent:
        tags["elf.eval.parent_from"] = session.ckpt.training_run_source
    with runs.tracked_run(client, exp_id, name, kind="evaluation", parent_run_id=parent, tags=tags) as run:
        yield run.run_id


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(runs.jsonl(rows), encoding="utf-8")
    return path


def write_result(out_dir: Path, result: EvalResult) -> Path:
    """``samples.jsonl`` and ``metrics.json`` (with the provenance) in ``out_dir``; returns the samples path."""
    samples = write_jsonl(out_dir / "samples.jsonl", result.samples)
    (out_dir / "metrics.json").write_text(json.dumps({**result.metrics, "sample_seconds": result.sample_seconds,
                                                      "score_seconds": result.score_seconds,
                                                      "provenance": result.provenance}, indent=2))
    return samples


def log_evaluation(client: MlflowClient, run_id: str, session: EvalSession, result: EvalResult,
                   samples_path: Path, table_rows: int = 50) -> None:
    """Params (provenance), metrics at the checkpoint's step, the samples file and a samples table."""
    runs.log_params(client, run_id, {f"eval.{k}": v for k, v in result.provenance.items()})
    timing = {"sample_seconds": result.sample_seconds, "score_seconds": result.score_seconds,
              "samples_per_second": len(result.samples) / max(result.sample_seconds, 1e-9)}
    log_metrics(client, run_id, {**result.metrics, **timing}, step=max(int(session.ckpt.step), 0))
    client.log_artifact(run_id, str(samples_path), "samples")
    shown = result.samples[:table_rows]
    cols = ["id", "generated"] + [c for c in ("input", "target") if shown and c in shown[0]]
    client.log_table(run_id, data={c: [s[c] for s in shown] for c in cols}, artifact_file="samples/table.json")


__all__ = ["EVAL_EXPERIMENT", "evaluation_run", "write_jsonl", "write_result", "log_evaluation"]
