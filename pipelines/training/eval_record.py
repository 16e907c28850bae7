"""What the evaluator beside training records for one checkpoint, in the training run itself.

* metrics at the checkpoint's step: ``eval/gen_ppl``, ``eval/entropy`` (unconditional) or
  ``eval/bleu``, ``eval/rouge1/2/L`` (conditional) for the first sampling point, ``eval/<point>/…``
  for any further points of ``eval.sampling``, and ``eval/evaluated`` = 1 (what a resumed run reads
  to never repeat an evaluation);
* the samples as ``eval/samples/step_<step>.jsonl``;
* the *frontier over training* plot, ``eval/frontier_over_training.png``, redrawn as checkpoints land;
* the ``@best`` alias: the documented rule — unconditional: the lowest Gen PPL among evaluated
  checkpoints whose entropy is at least 5.0·ln(L)/ln(1024) nats for sequence length L (3.0 at
  L = 64; the frontier sweeps' "auto" threshold); translation: the highest BLEU; summarisation: the
  highest ROUGE-L. A new best is registered as a model version of the run's model and aliased
  ``best``, so ``models:/elf-<name>@best`` starts ``evaluate.py`` or a frontier sweep from it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

from elf_core.config import ExperimentConfig, SampleConfig
from pipelines.evaluation.inputs import load_sampling_configs, run_name
from pipelines.sweeps.pareto import auto_min_entropy
from pipelines.sweeps.plot import plot_over_training
from pipelines.tracking import registry, runs
from pipelines.tracking.metrics import log_metrics

BEST_METRIC = {"unconditional": ("gen_ppl", "min"), "translation": ("bleu", "max"), "summarization": ("rougeL", "max")}
EVALUATED = "eval/evaluated"


def sampling_points(cfg: ExperimentConfig) -> list[SampleConfig]:
    """``eval.sampling``'s list, else the run's ``sample`` section; ``eval.num_samples`` when set."""
    base = cfg.sample
    points = load_sampling_configs(cfg.eval.sampling, base) if cfg.eval.sampling else [base]
    return [SampleConfig(**{**p.__dict__, "num_samples": cfg.eval.num_samples or p.num_samples}) for p in points]


def best_threshold(cfg: ExperimentConfig, task: str) -> Optional[float]:
    return auto_min_entropy(cfg.data.max_length) if task == "unconditional" else None


def is_better(task: str, new: dict[str, float], old: Optional[dict[str, float]], threshold: Optional[float]) -> bool:
    """Whether ``new`` (one checkpoint's primary metrics) beats the best so far under the rule."""
    metric, mode = BEST_METRIC[task]
    if task == "unconditional" and threshold is not None and new.get("entropy", 0.0) < threshold:
        return False
    if old is None:
        return True
    return new[metric] < old[metric] if mode == "min" else new[metric] > old[metric]


def log_evaluation(client: Any, run_id: str, step: int, results: list[tuple[SampleConfig, Any]], task: str,
                   extra: dict[str, float]) -> dict[str, float]:
    """Metrics (primary point unprefixed) and the primary point's samples; returns its metrics."""
    metrics: dict[str, float] = {EVALUATED: 1.0, **{f"eval/{k}": v for k, v in extra.items()}}
    for i, (sc, result) in enumerate(results):
        prefix = "eval/" if i == 0 else f"eval/{run_name(sc, task != 'unconditional')}/"
        metrics.update({prefix + k: float(v) for k, v in result.metrics.items()})
        metrics[prefix + "sample_seconds"] = result.sample_seconds
    log_metrics(client, run_id, metrics, step=step)
    runs.log_jsonl(client, run_id, results[0][1].samples, f"eval/samples/step_{step:08d}.jsonl")
    return {k: float(v) for k, v in results[0][1].metrics.items()}


def log_plot(client: Any, run_id: str, history: dict[int, dict[str, float]], task: str, name: str,
             threshold: Optional[float]) -> None:
    points = [{"step": s, **m} for s, m in history.items()]
    metric = BEST_METRIC[task][0]
    x, y = ("entropy", "gen_ppl") if task == "unconditional" else ("step", metric)
    with tempfile.TemporaryDirectory() as d:
        out = plot_over_training(points, Path(d) / "frontier_over_training.png", x=x, y=y, threshold=threshold,
                                 title=f"{name}: {y} vs {x} of each evaluated checkpoint (colour: step)")
        client.log_artifact(run_id, str(out), "eval")


def register_best(client: Any, run_id: str, cfg: ExperimentConfig, local_dir: Path, step: int,
                  metrics: dict[str, float], task: str) -> str:
    """Register the checkpoint in ``local_dir`` as a version of the run's model, aliased ``best``."""
    metric = BEST_METRIC[task][0]
    files = [f for f in registry.REGISTERED_FILES if (local_dir / f).is_file()]
    version = registry.register_checkpoint(client, run_id, local_dir, registry.model_name_for(cfg), alias="best",
                                           files=files, artifact_path=f"checkpoints/step_{step:08d}",
                                           tags={"elf.step": step, f"elf.eval.{metric}": metrics[metric]})
    return f"models:/{registry.model_name_for(cfg)}/{version}"


__all__ = ["sampling_points", "best_threshold", "is_better", "log_evaluation", "log_plot", "register_best",
           "EVALUATED", "BEST_METRIC"]
