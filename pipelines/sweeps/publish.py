"""What a finished (or interrupted) sweep leaves behind: the results and Pareto CSVs, the frontier
plot and ``best.json`` on disk and on the sweep's parent MLflow run, summary metrics, ``frontier.*``
tags naming the best point under the documented rule, and the same tags on the registered model
version when the checkpoint is a ``models:/`` reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pipelines.sweeps import pareto
from pipelines.sweeps.plot import FrontierSeries, plot_frontier
from pipelines.sweeps.results import RESULT_COLS, write_rows_csv
from pipelines.sweeps.settings import SETTING_KEYS, SweepConfig
from pipelines.tracking import registry, runs
from pipelines.tracking.metrics import log_metrics


def best_tags(cfg: SweepConfig, best: Optional[dict[str, Any]], threshold: Optional[float], parent: str,
              collapsed: Optional[str]) -> dict[str, str]:
    o0, o1 = cfg.objectives
    rule = pareto.rule_text(cfg.objectives, threshold)
    tags = {"frontier.rule": rule, "frontier.sweep_run_id": parent, "frontier.evaluator": cfg.scoring.evaluator}
    if best is None:
        tags["frontier.best"] = f"none: no Pareto point meets the constraint ({rule})" + (f"; {collapsed}" if collapsed else "")
        return tags
    settings = {k: best[k] for k in SETTING_KEYS if k in best}
    tags.update({"frontier.best": best["label"], "frontier.best.settings": json.dumps(settings),
                 f"frontier.best.{o0.metric}": f"{float(best[o0.metric]):.4g}",
                 f"frontier.best.{o1.metric}": f"{float(best[o1.metric]):.4g}",
                 pareto.constraint_tag_key(cfg.objectives, threshold): f"{float(best[o0.metric]):.4g} ({best['label']})"})
    return tags


def write_files(out_dir: Path, cfg: SweepConfig, name: str, label: str, rows: list[dict[str, Any]],
                best: Optional[dict[str, Any]], threshold: Optional[float], summary: dict[str, Any]) -> dict[str, Path]:
    o0, o1 = cfg.objectives
    files = {"results": write_rows_csv(rows, out_dir / "results.csv", RESULT_COLS),
             "pareto": write_rows_csv([r for r in rows if r.get("pareto")], out_dir / "pareto.csv", RESULT_COLS)}
    title = (f"{name}: {o0.metric} vs {o1.metric} ({cfg.scoring.evaluator}); "
             f"{sum(r['status'] == 'FINISHED' for r in rows)} trials" + ("" if best is None else f"; best {best['label']}"))
    files["plot"] = plot_frontier([FrontierSeries(label, rows, summary.get("collapsed"))], out_dir / "frontier.png",
                                  cfg.objectives, reference=dict(cfg.reference) or None, title=title,
                                  threshold=threshold, conditional=cfg.conditional)
    files["best"] = out_dir / "best.json"
    files["best"].write_text(json.dumps(summary, indent=1, default=str))
    return files


def publish(client: Any, parent: str, cfg: SweepConfig, name: str, label: str, out_dir: Path, rows: list[dict],
            threshold: Optional[float], status: str, wall: float, since: float,
            model_version: Optional[str]) -> dict[str, Any]:
    """Files, metrics and tags of a sweep; returns its summary (best point, collapse note, ...)."""
    o0, o1 = cfg.objectives
    best = pareto.best_point(rows, cfg.objectives, threshold)
    collapsed = pareto.collapse_note(rows, cfg.objectives, threshold)
    # Trials run by this invocation: the ones that finished after fit() began (since: epoch seconds).
    mine = [r for r in rows if r["status"] == "FINISHED" and float(r.get("finished_at_s", 0)) >= since]
    eval_s = sum(float(r.get("sample_seconds", 0)) + float(r.get("score_seconds", 0)) for r in mine)
    summary = {"rule": pareto.rule_text(cfg.objectives, threshold), "threshold": threshold, "best": best,
               "collapsed": collapsed, "status": status, "wall_s": wall, "trial_eval_s": eval_s, "trials": len(rows),
               "finished": sum(r["status"] == "FINISHED" for r in rows),
               "failed": sum(r["status"] == "FAILED" for r in rows)}
    files = write_files(out_dir, cfg, name, label, rows, best, threshold, summary)
    for f in files.values():
        client.log_artifact(parent, str(f), "frontier")
    metrics = {"trials_finished": summary["finished"], "trials_failed": summary["failed"], "sweep_wall_s": wall,
               "trials_sample_score_s": eval_s, "pareto_points": sum(bool(r.get("pareto")) for r in rows)}
    if best is not None:
        metrics.update({f"best_{o0.metric}": float(best[o0.metric]), f"best_{o1.metric}": float(best[o1.metric])})
    log_metrics(client, parent, metrics, step=0)
    tags = best_tags(cfg, best, threshold, parent, collapsed)
    runs.set_tags(client, parent, {**tags, "elf.sweep.state": {"FINISHED": "complete"}.get(status, "interrupted")})
    if status == "FINISHED" and model_version:
        mv = registry.resolve_version(client, f"models:/{model_version}")
        registry.tag_version(client, mv, tags)
        print(f"[sweep] tagged model version {model_version}: frontier.best = {tags['frontier.best']}", flush=True)
    print(f"[sweep] best ({summary['rule']}): {tags['frontier.best']}; files in {out_dir}", flush=True)
    return {**summary, "files": files}


__all__ = ["publish", "best_tags", "write_files"]
