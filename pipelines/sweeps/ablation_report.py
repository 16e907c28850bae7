"""The scaling ablation's comparison: one table row per rung (total and non-embedding parameters,
steps, wall times, the best operating point, a collapse flag) as CSV and markdown, every rung's
frontier on one plot, and ``<rung>.*`` metrics — on disk and on the ablation's parent MLflow run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pipelines.sweeps.plot import FrontierSeries, plot_frontier
from pipelines.sweeps.results import write_rows_csv
from pipelines.sweeps.settings import SweepConfig
from pipelines.tracking.metrics import log_metrics

TABLE_COLS = ("rung", "status", "model", "params", "non_embedding_params", "steps", "tokens", "train_wall_s",
              "sweep_wall_s", "best", "best_gen_ppl", "best_entropy", "flag", "model_uri", "sweep_run_id")


def _r(x: Any, nd: int = 1) -> Any:
    return round(float(x), nd) if isinstance(x, (int, float)) else x


def fmt_count(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else (f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k")


def table_row(rung: str, cell: dict[str, Any]) -> dict[str, Any]:
    tr, sw = cell.get("train") or {}, cell.get("sweep") or {}
    best = sw.get("best") or {}
    model = tr.get("model") or {}
    return {"rung": rung, "status": "done" if sw.get("finished") else ("trained" if tr else "not trained"),
            "model": " ".join(f"{k}={v}" for k, v in model.items()), "params": tr.get("params"),
            "non_embedding_params": tr.get("non_embedding_params"), "steps": tr.get("steps"),
            "tokens": tr.get("tokens"), "train_wall_s": _r(tr.get("wall_s")), "sweep_wall_s": _r(sw.get("wall_s")),
            "best": best.get("label", "none meets the constraint" if sw.get("finished") else ""),
            "best_gen_ppl": _r(best.get("gen_ppl"), 3), "best_entropy": _r(best.get("entropy"), 3),
            "flag": sw.get("collapsed") or "", "model_uri": tr.get("model_uri"), "sweep_run_id": sw.get("run_id")}


def markdown(rows: list[dict[str, Any]], cols: tuple[str, ...] = TABLE_COLS) -> str:
    md = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    md += ["| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(md) + "\n"


def publish(client: Any, parent: str, out_dir: Path, ledger: dict[str, Any], cfg: Any, sweep_cfg: SweepConfig) -> None:
    """Table, combined frontier plot and metrics, on disk and on the parent run."""
    names = [r.name for r in cfg.rungs]
    rows = [table_row(n, ledger["cells"].get(n, {})) for n in names]
    series = []
    for n in names:
        cell = ledger["cells"].get(n, {})
        tr, sw = cell.get("train") or {}, cell.get("sweep") or {}
        if sw.get("rows"):
            label = f"{n} ({fmt_count(tr.get('non_embedding_params'))} non-emb / {fmt_count(tr.get('params'))} total)"
            series.append(FrontierSeries(label, sw["rows"], sw.get("collapsed")))
    threshold: Optional[float] = next((c["sweep"].get("threshold") for c in ledger["cells"].values() if c.get("sweep")),
                                      None)
    refs = [{"label": p["label"], "metrics": {"gen_ppl": p["gen_ppl"], "entropy": p["entropy"]}}
            for n, p in (cfg.paper or {}).items() if n in names]
    files = {"table.csv": write_rows_csv(rows, out_dir / "table.csv", TABLE_COLS), "table.md": out_dir / "table.md"}
    files["table.md"].write_text(markdown(rows))
    files["frontiers.png"] = plot_frontier(series, out_dir / "frontiers.png", sweep_cfg.objectives, reference=refs,
                                           threshold=threshold, annotate=len(series) <= 2,
                                           title=f"Frontiers by model size: ladder {cfg.ladder}, space {sweep_cfg.name}")
    for f in files.values():
        client.log_artifact(parent, str(f), "scaling")
    metrics = {f"{r['rung']}.{k}": r[k] for r in rows for k in ("params", "non_embedding_params", "train_wall_s",
                                                                "sweep_wall_s", "best_gen_ppl", "best_entropy")
               if isinstance(r[k], (int, float))}
    if metrics:
        log_metrics(client, parent, metrics, step=0)
    print("[scaling] " + markdown(rows).replace("\n", "\n[scaling] "), flush=True)


__all__ = ["publish", "table_row", "markdown", "TABLE_COLS", "fmt_count"]
