"""A sweep's rows, read from the ``ResultGrid`` that ``Tuner.fit()`` returns: one row per ended trial
with its settings, metrics, status, MLflow child run and error; the Pareto flags; and the files
(results / Pareto CSVs) written from them.

A restored sweep's ``ResultGrid`` holds the trials of earlier invocations too, so MLflow is never
read back here (trials that finished in MLflow but not in Tune report their stored metrics again,
:func:`pipelines.sweeps.trial.frontier_trial`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import posixpath
from pathlib import Path
from typing import Any, Mapping, Sequence

from elf_core.config import SampleConfig
from pipelines.sweeps.pareto import mark_pareto
from pipelines.sweeps.settings import SETTING_KEYS, SweepConfig
from pipelines.sweeps.space import settings_label

RESULT_COLS = ("trial_id", "status", "label", *SETTING_KEYS)
# Tune's own bookkeeping keys in a reported result: not metrics of the trial.
_TUNE_KEYS = {"config", "trial_id", "date", "timestamp", "time_this_iter_s", "time_total_s", "pid", "hostname",
              "node_ip", "time_since_restore", "iterations_since_restore", "training_iteration", "done",
              "experiment_tag", "checkpoint_dir_name", "should_checkpoint"}


def _trial_config(result: Any) -> dict[str, Any]:
    """A trial's sampler settings: from its last report, else (a trial that failed before reporting)
    from the ``params.json`` Tune writes into its directory."""
    if result.metrics and result.metrics.get("config"):
        return dict(result.metrics["config"])
    try:
        with result.filesystem.open_input_stream(posixpath.join(result.path, "params.json")) as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError):
        return {}


def rows_from_grid(grid: Any, cfg: SweepConfig) -> list[dict[str, Any]]:
    """One row per trial that ended (FINISHED or FAILED), sorted by trial id, Pareto flags set."""
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        if result.error is None and "mlflow_run_id" not in metrics:
            continue  # never ran (a sweep stopped early): nothing to show yet
        settings = {**dataclasses.asdict(SampleConfig()), **cfg.fixed, **_trial_config(result)}  # what the trial ran
        row: dict[str, Any] = {"trial_id": metrics.get("trial_id") or posixpath.basename(result.path),
                               "status": "FAILED" if result.error is not None else "FINISHED"}
        row.update({k: settings[k] for k in (*SETTING_KEYS, "num_samples", "seed") if k in settings})
        row["label"] = settings_label(row, cfg.conditional)
        row.update({k: v for k, v in metrics.items() if k not in _TUNE_KEYS})
        if result.error is not None:
            row["error"] = str(result.error).strip().splitlines()[-1][:300] if str(result.error).strip() else \
                type(result.error).__name__
        rows.append(row)
    return mark_pareto(sorted(rows, key=lambda r: r["trial_id"]), cfg.objectives)


def write_rows_csv(rows: Sequence[Mapping[str, Any]], path: str | Path, first: Sequence[str] = ()) -> Path:
    """CSV with the ``first`` columns leading, then every other key in order of appearance."""
    cols: list[str] = list(first)
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    return path


__all__ = ["rows_from_grid", "write_rows_csv", "RESULT_COLS"]
