"""Scaling ablation: train ELF at several sizes, sweep each one's frontier, compare them in one MLflow run.

    python experiments/scaling_ablation.py --sizes B M L --task owt                  # the paper ladder (GPUs)
    python experiments/scaling_ablation.py --sizes tiny-1 tiny-2 --evaluator smollm2  # runs here (CPU)
    python experiments/scaling_ablation.py --sizes tiny-1 tiny-2 tiny-4 --max-steps 200 --train-override ray.num_workers=1

A *cell* is one size: train it with ``pipelines/train.py`` (in-process; it reuses this process's Ray),
then run a frontier sweep (:func:`experiments.frontier_sweep.run_sweep`) on the registered model
version. Sizes: ``B``/``M``/``L`` take ``experiments/<task>_elf_<size>.yaml``; ``tiny-<depth>`` takes
``experiments/local_default.yaml`` with ``model.depth=<depth>`` and a short run (``--max-steps``).

MLflow (experiment ``--experiment``, default ``elf/scaling``): one parent run named after the
ablation; each cell's training run and sweep parent run are nested under it (trials under the
sweep). On the parent: ``scaling/frontiers.png`` (every size's frontier on one plot, the paper's
B/M/L points as stars), ``scaling/table.csv`` / ``table.md`` (params, tokens, train wall time,
sweep wall time, best operating point per size) and ``<size>.*`` metrics.

Re-running the same command skips finished cells: ``<out>/<name>/ledger.json`` records, per cell,
the trained model version and the finished sweep; an unfinished sweep is resumed, an interrupted
training run resumes from its checkpoint (``pipelines/train.py`` does that by run name).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from experiments.frontier_sweep import SWEEPS_DIR, collect_rows, run_sweep  # noqa: E402
from pipelines.frontier import SweepError, load_space  # noqa: E402
from pipelines.frontier_plot import FrontierSeries, plot_frontier, write_rows_csv  # noqa: E402
from pipelines.train import runs_root  # noqa: E402

EXPERIMENTS = PROJECT_ROOT / "experiments"
PAPER_SIZES = ("B", "M", "L")
# Spec §6: the paper's OWT operating points per size (GPT-2 Large evaluator, 1024 tokens).
PAPER_POINTS = {"B": ("ELF-B paper: SDE 32 → 24.1 / 5.15", 24.1, 5.15),
                "M": ("ELF-M paper: SDE 64 → 21.7 / 5.18", 21.7, 5.18),
                "L": ("ELF-L paper: SDE 64 → 23.3 / 5.28", 23.3, 5.28)}
TINY_DEFAULT_STEPS = 60
TABLE_COLS = ("size", "status", "params", "tokens", "train_steps", "train_wall_s", "sweep_wall_s",
              "sweep_trials_sample_score_s", "best", "best_gen_ppl", "best_entropy", "model", "sweep_run_id")


class CellError(RuntimeError):
    """One cell (size) could not be trained or swept; the message names the size and the cause."""


@dataclass
class TrainedModel:
    """What the ablation needs from a training run."""

    model_uri: str  # models:/<name>/<version>
    train_run_id: str | None
    params: int | None
    tokens: int | None
    steps: int | None
    wall_s: float | None


def cell_config(size: str, task: str, max_steps: int | None, extra: list[str]) -> tuple[Path, list[str]]:
    """(experiment YAML, overrides) that train ``size``."""
    if size in PAPER_SIZES:
        path = EXPERIMENTS / f"{task}_elf_{size.lower()}.yaml"
        if not path.is_file():
            have = sorted(p.name for p in EXPERIMENTS.glob(f"*_elf_{size.lower()}.yaml"))
            raise SweepError(f"--sizes {size} --task {task}: {path} does not exist (have: {have})")
        over = [f"train.max_steps={max_steps}"] if max_steps else []
        return path, over + extra
    m = re.fullmatch(r"tiny-(\d+)", size)
    if not m or int(m.group(1)) < 1:
        raise SweepError(f"--sizes: unknown size {size!r}; use B, M, L or tiny-<depth> (e.g. tiny-1 tiny-2)")
    steps = max_steps or TINY_DEFAULT_STEPS
    return EXPERIMENTS / "local_default.yaml", ["model.preset=tiny", f"model.depth={int(m.group(1))}",
                                                f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
                                                "tracking.log_samples=4", *extra]


def describe_model(client: Any, registered: str, alias: str = "last", wall_s: float | None = None) -> TrainedModel:
    """The model version behind ``registered@alias``: params and step from its ``meta.json``, tokens
    = step × global batch × sequence length (the training run's params), wall time from the run."""
    import mlflow.artifacts

    mv = client.get_model_version_by_alias(registered, alias)
    meta: dict[str, Any] = {}
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source.rstrip('/')}/meta.json",
                                                    tracking_uri=client.tracking_uri)
        meta = json.loads(Path(local).read_text())
    except Exception as e:  # noqa: BLE001 - shown, not fatal: the table then lacks params/tokens
        print(f"[scaling] warning: {registered}/{mv.version} has no readable meta.json ({e})", file=sys.stderr)
    tokens = steps = None
    run = client.get_run(mv.run_id) if mv.run_id else None
    if run is not None and "step" in meta:
        steps = int(meta["step"])
        p = run.data.params
        if "train.global_batch_size" in p and "data.max_length" in p:
            tokens = steps * int(p["train.global_batch_size"]) * int(p["data.max_length"])
        if wall_s is None and run.info.end_time:
            wall_s = (run.info.end_time - run.info.start_time) / 1000.0
    return TrainedModel(model_uri=f"models:/{registered}/{mv.version}", train_run_id=mv.run_id,
                        params=meta.get("param_count"), tokens=tokens, steps=steps, wall_s=wall_s)


def train_with_pipeline(name: str, config: Path, overrides: list[str], uri: str, experiment: str) -> TrainedModel:
    """Train in this process with ``pipelines.train.main`` and describe the registered result."""
    from pipelines import tracking
    from pipelines.train import main as train_main

    registered = f"elf-{tracking.registered_model_name(name)}"
    argv = ["--config", str(config), *overrides, f"name={name}", f"tracking.uri={uri}",
            f"tracking.experiment={experiment}", f"tracking.registered_model={registered}"]
    print(f"[scaling] training {name}: python pipelines/train.py {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = train_main(argv)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise CellError(f"training {name} exited with {rc} (see its output above)")
    return describe_model(tracking.make_client(uri), registered, wall_s=wall)


TrainFn = Callable[[str, Path, list[str], str, str], TrainedModel]


def run_ablation(
    sizes: list[str],
    *,
    task: str = "owt",
    name: str | None = None,
    space: str | Path | None = None,
    search: str = "grid",
    num_samples: int | None = None,
    max_steps: int | None = None,
    train_overrides: list[str] | None = None,
    evaluator: str = "gpt2-large",
    min_entropy: str | float | None = None,
    max_concurrent: int | None = None,
    sweep_overrides: dict[str, Any] | None = None,
    experiment: str = "elf/scaling",
    tracking_uri: str | None = None,
    out_root: str | Path = Path("outputs") / "scaling",
    address: str | None = None,
    train_fn: TrainFn = train_with_pipeline,
    session_factory: Callable[..., Any] | None = None,
    verbose: int = 1,
) -> dict[str, Any]:
    """Run every unfinished cell, then publish the comparison. Returns the ledger."""
    from pipelines import tracking
    from pipelines.ray_env import init_ray

    if not sizes or len(set(sizes)) != len(sizes):
        raise SweepError(f"--sizes must name distinct sizes, got {sizes}")
    tiny = all(s.startswith("tiny-") for s in sizes)
    space_path = Path(space) if space else SWEEPS_DIR / ("cpu_tiny.yaml" if tiny else "uncond_paper.yaml")
    sp = load_space(space_path)
    cells = {s: cell_config(s, task, max_steps, list(train_overrides or [])) for s in sizes}  # validate first
    name = name or re.sub(r"[^A-Za-z0-9._-]+", "-", f"scaling-{task}-{'-'.join(sizes)}")
    uri = tracking.resolve_tracking_uri(tracking_uri, runs_root())
    tracking.check_tracking_reachable(uri)
    client = tracking.make_client(uri)
    exp_id = tracking.ensure_experiment(experiment, client)
    out_root = Path(out_root).expanduser()
    out_dir = (out_root if out_root.is_absolute() else runs_root() / out_root).resolve() / name
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger_path = out_dir / "ledger.json"
    ledger: dict[str, Any] = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {"cells": {}}

    def save() -> None:
        ledger_path.write_text(json.dumps(ledger, indent=1, default=str))

    if ledger.get("parent_run_id"):
        parent = ledger["parent_run_id"]
        prev = client.get_run(parent)
        client.update_run(parent, status="RUNNING")
        client.set_tag(parent, "elf.resume_count", str(int(prev.data.tags.get("elf.resume_count", "0")) + 1))
    else:
        tags = {**tracking.provenance_tags(), "elf.kind": "scaling-ablation", "elf.sizes": " ".join(sizes)}
        parent = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        ledger.update(parent_run_id=parent, experiment_id=exp_id, tracking_uri=uri, sizes=sizes, task=task,
                      space=str(space_path))
        save()
        tracking.log_params_flat(parent, {"sizes": " ".join(sizes), "task": task, "space": str(space_path),
                                          "search": search, "evaluator": evaluator, "max_steps": max_steps,
                                          "train_overrides": " ".join(train_overrides or [])}, client)
    print(f"[scaling] {name}: parent MLflow run {parent} in '{experiment}' ({uri}); ledger {ledger_path}", flush=True)
    ray_started = False

    status, failures = "FAILED", []
    try:
        for size in sizes:
            cell = ledger["cells"].setdefault(size, {})
            cfg_path, overrides = cells[size]
            train_name = f"{name}-{size}"
            try:
                if not ray_started and not (cell.get("train") and (cell.get("sweep") or {}).get("finished")):
                    init_ray(address)  # once: training (pipelines.train) and the sweeps reuse it
                    ray_started = True
                if not cell.get("train"):
                    trained = train_fn(train_name, cfg_path, overrides, uri, experiment)
                    cell["train"] = asdict(trained)
                    save()
                    if trained.train_run_id:
                        client.set_tag(trained.train_run_id, "mlflow.parentRunId", parent)
                else:
                    print(f"[scaling] {size}: trained already ({cell['train']['model_uri']}), skipping training")
                if not (cell.get("sweep") or {}).get("finished"):
                    out = run_sweep(cell["train"]["model_uri"], space=sp, search=search, num_samples=num_samples,
                                    resume="auto", name=train_name, out_root=out_dir / "sweeps", tracking_uri=uri,
                                    experiment=experiment, evaluator=evaluator, min_entropy=min_entropy,
                                    max_concurrent=max_concurrent, overrides=sweep_overrides, address=address,
                                    nest_under=parent, session_factory=session_factory, verbose=verbose)
                    cell["sweep"] = {"finished": out.status == "FINISHED", "run_id": out.parent_run_id,
                                     "wall_s": out.wall_s + float((cell.get("sweep") or {}).get("wall_s", 0.0)),
                                     "trials_sample_score_s": out.trial_eval_s, "threshold": out.threshold,
                                     "best": out.best}
                    save()
                    if out.status != "FINISHED":
                        raise CellError(f"the sweep of {size} did not finish ({out.status}); re-run to resume it")
                else:
                    print(f"[scaling] {size}: swept already (run {cell['sweep']['run_id']}), skipping the sweep")
            except (CellError, SweepError) as e:
                failures.append(f"{size}: {e}")
                print(f"[scaling] cell {size} failed: {e}", file=sys.stderr, flush=True)
        publish(client, parent, exp_id, out_dir, ledger, sizes, sp)
        status = "FINISHED" if not failures else "FAILED"
        if failures:
            client.set_tag(parent, "elf.error", "; ".join(failures)[:5000])
        return ledger
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        tracking.finish_run(parent, status, client)


def publish(client: Any, parent: str, exp_id: str, out_dir: Path, ledger: dict[str, Any], sizes: list[str],
            space: Any) -> None:
    """Combined frontier plot and the table, on disk and on the parent run."""
    from pipelines import tracking

    series, table, metrics = [], [], {}
    for size in sizes:
        cell = ledger["cells"].get(size, {})
        tr, sw = cell.get("train") or {}, cell.get("sweep") or {}
        best = sw.get("best") or {}
        if sw.get("finished") and not best:
            best = {"label": f"none meets the constraint (threshold {sw.get('threshold')})"}
        row = {"size": size, "status": "done" if sw.get("finished") else ("trained" if tr else "not trained"),
               "params": tr.get("params"), "tokens": tr.get("tokens"), "train_steps": tr.get("steps"),
               "train_wall_s": _r(tr.get("wall_s")), "sweep_wall_s": _r(sw.get("wall_s")),
               "sweep_trials_sample_score_s": _r(sw.get("trials_sample_score_s")), "best": best.get("label", ""),
               "best_gen_ppl": _r(best.get("gen_ppl"), 3), "best_entropy": _r(best.get("entropy"), 3),
               "model": tr.get("model_uri"), "sweep_run_id": sw.get("run_id")}
        table.append(row)
        for k in ("params", "tokens", "train_wall_s", "sweep_wall_s", "best_gen_ppl", "best_entropy"):
            if isinstance(row[k], (int, float)):
                metrics[f"{size}.{k}"] = row[k]
        if sw.get("run_id"):
            label = f"{size} ({_fmt_count(tr.get('params'))} params)"
            series.append(FrontierSeries(label, collect_rows(client, exp_id, sw["run_id"], space)))
    refs = [{"label": PAPER_POINTS[s][0], "metrics": {"gen_ppl": PAPER_POINTS[s][1], "entropy": PAPER_POINTS[s][2]}}
            for s in sizes if s in PAPER_POINTS]
    threshold = next((c["sweep"].get("threshold") for c in ledger["cells"].values() if c.get("sweep")), None)
    files = {"table.csv": write_rows_csv(table, out_dir / "table.csv", TABLE_COLS)}
    md = ["| " + " | ".join(TABLE_COLS) + " |", "|" + " --- |" * len(TABLE_COLS)]
    md += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in TABLE_COLS) + " |" for r in table]
    files["table.md"] = out_dir / "table.md"
    files["table.md"].write_text("\n".join(md) + "\n")
    files["frontiers.png"] = plot_frontier(series, out_dir / "frontiers.png", space.objectives, reference=refs,
                                           threshold=threshold, annotate=len(series) <= 2,
                                           title=f"Frontiers by model size ({', '.join(sizes)}); space {space.name}")
    for f in files.values():
        client.log_artifact(parent, str(f), "scaling")
    if metrics:
        with tracking.MetricsLogger(parent, client) as logger:
            logger.log(metrics, step=0)
    print("[scaling] " + "\n[scaling] ".join(md), flush=True)


def _r(x: Any, nd: int = 1) -> Any:
    return round(float(x), nd) if isinstance(x, (int, float)) else x


def _fmt_count(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="experiments/scaling_ablation.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--sizes", nargs="+", required=True, help="B M L and/or tiny-<depth> (e.g. tiny-1 tiny-2)")
    p.add_argument("--task", default="owt", help="experiments/<task>_elf_<size>.yaml for B/M/L (default owt)")
    p.add_argument("--name", default=None, help="ablation name (default scaling-<task>-<sizes>); re-use to resume")
    p.add_argument("--space", default=None, help="sweep space (default: sweeps/cpu_tiny.yaml for tiny ladders, "
                   "else sweeps/uncond_paper.yaml)")
    p.add_argument("--search", choices=("grid", "random", "optuna"), default="grid")
    p.add_argument("--num-samples", type=int, default=None, help="trials per sweep for random/optuna")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"training steps per size (tiny default {TINY_DEFAULT_STEPS}; B/M/L default: the YAML's)")
    p.add_argument("--train-override", action="append", default=[], metavar="key=value",
                   help="config override for every training run (repeatable), e.g. ray.num_workers=1")
    p.add_argument("--samples-per-trial", type=int, default=None, help="texts generated per sweep trial")
    p.add_argument("--evaluator", default="gpt2-large", help="Gen PPL model (offline here: smollm2)")
    p.add_argument("--min-entropy", default=None, help="see frontier_sweep.py --min-entropy")
    p.add_argument("--max-concurrent", type=int, default=None, help="sweep trials at a time")
    p.add_argument("--experiment", default="elf/scaling")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--out", type=Path, default=Path("outputs") / "scaling")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipelines import tracking

    try:
        ledger = run_ablation(args.sizes, task=args.task, name=args.name, space=args.space, search=args.search,
                              num_samples=args.num_samples, max_steps=args.max_steps, train_overrides=args.train_override,
                              evaluator=args.evaluator, min_entropy=args.min_entropy, max_concurrent=args.max_concurrent,
                              sweep_overrides={"num_samples": args.samples_per_trial} if args.samples_per_trial else None,
                              experiment=args.experiment, tracking_uri=args.tracking_uri, out_root=args.out,
                              address=args.address)
    except (SweepError, tracking.TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uri = tracking.resolve_tracking_uri(args.tracking_uri, runs_root())
    print(f"[scaling] see it in MLflow:\n{tracking.ui_command(uri, ledger['experiment_id'], ledger['parent_run_id'])}")
    done = all((c.get("sweep") or {}).get("finished") for c in ledger["cells"].values())
    return 0 if done else 3


if __name__ == "__main__":
    sys.exit(main())
