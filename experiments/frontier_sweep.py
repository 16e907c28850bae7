"""Trace a checkpoint's quality/diversity frontier with Ray Tune, tracked in MLflow.

    python experiments/frontier_sweep.py --checkpoint models:/elf-local-default/latest \\
        --space experiments/sweeps/cpu_tiny.yaml --evaluator smollm2
    python experiments/frontier_sweep.py --checkpoint models:/elf-owt-b@best              # paper space, grid
    python experiments/frontier_sweep.py --checkpoint outputs/ray/x/checkpoint_... --search optuna --num-samples 40
    python experiments/frontier_sweep.py --checkpoint ... --resume        # continue an interrupted sweep
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- python experiments/frontier_sweep.py ...

One Tune trial per sampler setting (:func:`pipelines.frontier.frontier_trial`); a parent MLflow run
per sweep (named after the sweep) with one child run per trial; on the parent: ``frontier/results.csv``,
``frontier/pareto.csv``, ``frontier/frontier.png`` and ``frontier/best.json``. The "best" operating
point — the lowest Gen PPL among Pareto points with entropy >= ``--min-entropy`` — is also set as
``frontier.*`` tags on the registered model version when the checkpoint is a ``models:/`` URI.
Local state lives in ``<out>/<name>/``: ``sweep.json`` (the parent run id; what ``--resume`` reads),
``tune/`` (Tune's experiment, restored with ``Tuner.restore``) and the CSV/PNG files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # `python experiments/frontier_sweep.py` from a checkout
    sys.path.insert(0, str(PROJECT_ROOT))

from pipelines.frontier import (  # noqa: E402
    SETTING_KEYS, SweepError, SweepSpace, TrialContext, auto_min_entropy, best_point,
    child_runs, close_orphan_children, constraint_tag_key, frontier_trial, load_space, make_sweep_callback,
    pareto_mask, read_checkpoint_config, rule_text, set_trial_budget, settings_label,
    tag_model_version, tune_param_space,
)
from pipelines.frontier_plot import FrontierSeries, plot_frontier, write_rows_csv  # noqa: E402
from pipelines.train import runs_root  # noqa: E402  (checkout, $ELF_LAB_ROOT, or ~/elf-lab under `ray job submit`)

SWEEPS_DIR = PROJECT_ROOT / "experiments" / "sweeps"
DEFAULT_SPACES = {"unconditional": SWEEPS_DIR / "uncond_paper.yaml", "conditional": SWEEPS_DIR / "cond_paper.yaml"}
DEFAULT_OUT = Path("outputs") / "sweeps"  # relative: under pipelines.train.runs_root()
LEDGER = "sweep.json"
RESULT_COLS = ("trial_id", "status", "label", *SETTING_KEYS)


@dataclass
class SweepOutcome:
    """What a sweep produced (also returned to the scaling ablation)."""

    name: str
    parent_run_id: str
    experiment_id: str
    out_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    threshold: float | None
    status: str  # FINISHED | KILLED (interrupted, resumable)
    wall_s: float
    trial_eval_s: float  # sum of sample + score seconds of the trials run by this invocation
    space: SweepSpace | None = None
    files: dict[str, Path] = field(default_factory=dict)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "sweep"


def default_name(checkpoint: str, space: SweepSpace, search: str) -> str:
    return _slug(f"{series_label(checkpoint)}--{space.name}" + ("" if search == "grid" else f"-{search}"))


def series_label(checkpoint: str) -> str:
    """A short legend name: ``elf-x/3`` for ``models:/elf-x/3``; ``run/checkpoint_…`` for a directory."""
    if checkpoint.startswith(("models:/", "runs:/")):
        return checkpoint.split(":/", 1)[1].strip("/")
    p = Path(checkpoint).expanduser().resolve()
    return f"{p.parent.name}/{p.name}" if p.name.startswith("checkpoint") else p.name


def _threshold(min_entropy: str | float | None, space: SweepSpace, seq_len: int | None) -> float | None:
    """The constraint on the second objective: CLI value, else the space's, else none; ``auto`` is
    :func:`pipelines.frontier.auto_min_entropy` of the checkpoint's sequence length."""
    value = min_entropy if min_entropy is not None else space.constraint.get("threshold")
    if value is None or str(value).lower() == "none":
        return None
    if str(value).lower() == "auto":
        if space.objectives[1].metric != "entropy":
            raise SweepError(f"{space.path}: threshold 'auto' only applies to an entropy objective")
        return auto_min_entropy(seq_len)
    try:
        return float(value)
    except ValueError:
        raise SweepError(f"--min-entropy / constraint.threshold must be a number, 'auto' or 'none', got {value!r}") from None


def _num(x: Any) -> Any:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return x
    return int(f) if f.is_integer() and not isinstance(x, float) and "." not in str(x) else f


def collect_rows(client: Any, experiment_id: str, parent_run_id: str, space: SweepSpace) -> list[dict[str, Any]]:
    """One row per trial from its child run (the newest per trial id): settings, metrics, status,
    run id, error; ``pareto`` marks the non-dominated FINISHED rows."""
    newest: dict[str, Any] = {}
    for run in child_runs(client, experiment_id, parent_run_id):
        tid = run.data.tags.get("elf.trial_id", run.info.run_id)
        if tid not in newest or run.info.start_time > newest[tid].info.start_time:
            newest[tid] = run
    rows = []
    for tid in sorted(newest):
        run = newest[tid]
        p = run.data.params
        row: dict[str, Any] = {"trial_id": tid, "status": run.info.status}
        for k in SETTING_KEYS + ("num_samples", "seed"):
            if k in p:
                row[k] = _num(p[k])
        row["label"] = settings_label(row, space.task == "conditional")
        row.update(run.data.metrics)
        row["mlflow_run_id"] = run.info.run_id
        if "elf.error" in run.data.tags:
            row["error"] = run.data.tags["elf.error"].splitlines()[0][:300]
        rows.append(row)
    o0, o1 = space.objectives
    pts = [(r.get(o0.metric), r.get(o1.metric)) if r["status"] == "FINISHED" else (None, None) for r in rows]
    for r, on in zip(rows, pareto_mask(pts, (o0.mode, o1.mode))):
        r["pareto"] = bool(on)
    return rows


def expected_trials(space: SweepSpace, search: str, num_samples: int) -> int:
    return space.grid_size() * num_samples if search == "grid" else num_samples


def run_sweep(
    checkpoint: str,
    *,
    space: SweepSpace | str | Path | None = None,
    search: str = "grid",
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    resume: bool | str = False,
    name: str | None = None,
    out_root: str | Path = DEFAULT_OUT,
    tracking_uri: str | None = None,
    experiment: str = "elf/frontier",
    evaluator: str = "gpt2-large",
    evaluator_dtype: str = "float32",
    min_entropy: str | float | None = None,
    cpus_per_trial: float | None = None,
    overrides: dict[str, Any] | None = None,
    max_trials: int | None = None,
    retry_failed: bool = False,
    task: str | None = None,
    references: str | None = None,
    use_ema: bool | None = None,
    device: str | None = None,
    address: str | None = None,
    nest_under: str | None = None,
    seed: int = 0,
    session_factory: Callable[..., Any] | None = None,
    verbose: int = 1,
) -> SweepOutcome:
    """Run (or with ``resume=True`` continue; ``"auto"``: whichever applies) one frontier sweep.
    ``overrides`` replaces fixed SampleConfig fields (e.g. ``num_samples``, ``batch_size``);
    ``nest_under`` makes the sweep's parent run a child of that run (the scaling ablation)."""
    from ray import tune

    from pipelines import tracking
    from pipelines.ray_env import check_cluster_fits, init_ray

    if search not in ("grid", "random", "optuna"):
        raise SweepError(f"--search must be grid, random or optuna, got {search!r}")
    uri = tracking.resolve_tracking_uri(tracking_uri, runs_root())
    tracking.check_tracking_reachable(uri)
    client = tracking.make_client(uri)
    ck_cfg = read_checkpoint_config(checkpoint, uri)
    # The space's task is unconditional | conditional; the evaluator's --task names the conditional one.
    trained = ck_cfg.data.task if ck_cfg is not None else "unconditional"
    ck_task = "unconditional" if (task or trained) == "unconditional" else "conditional"
    if not isinstance(space, SweepSpace):
        space = load_space(space if space is not None else DEFAULT_SPACES[ck_task])
    if space.task != ck_task:
        raise SweepError(f"{space.path} is a {space.task} space but checkpoint {checkpoint!r} is {ck_task}")
    n = int(num_samples) if num_samples is not None else (1 if search == "grid" else 20)
    if search == "grid" and n != 1:
        raise SweepError("--num-samples: a grid search runs every point once (samples are seeded); "
                         "use --search random/optuna to draw N trials")
    threshold = _threshold(min_entropy, space, ck_cfg.data.max_length if ck_cfg is not None else None)
    fixed = {**space.fixed, **(overrides or {})}
    name = name or default_name(checkpoint, space, search)
    out_root = Path(out_root).expanduser()
    out_dir = (out_root if out_root.is_absolute() else runs_root() / out_root).resolve() / name
    ledger_path, tune_dir = out_dir / LEDGER, out_dir / "tune"
    exists = ledger_path.is_file()
    if resume is True and not exists:
        raise SweepError(f"--resume: no sweep named {name!r} at {out_dir} (no {LEDGER}); run without --resume")
    if resume is False and exists:
        raise SweepError(f"a sweep named {name!r} already exists at {out_dir}: pass --resume to continue it, "
                         "or --name to start another")
    resuming = exists
    exp_id = tracking.ensure_experiment(experiment, client)

    # --- parent run: created once, re-attached on resume (its id is in the ledger) ---------------
    if resuming:
        ledger = json.loads(ledger_path.read_text())
        for key, now in (("checkpoint", checkpoint), ("space", str(Path(space.path).resolve())), ("search", search),
                         ("tracking_uri", uri)):
            if ledger.get(key) != now:
                raise SweepError(f"--resume {name!r}: {key} was {ledger.get(key)!r}, now {now!r}; "
                                 "resume with the same settings or pass --name for a new sweep")
        parent, exp_id = ledger["parent_run_id"], ledger["experiment_id"]
        prev = client.get_run(parent)
        client.update_run(parent, status="RUNNING")
        client.set_tag(parent, "elf.resume_count", str(int(prev.data.tags.get("elf.resume_count", "0")) + 1))
    else:
        tags = {**tracking.provenance_tags(), "elf.kind": "frontier-sweep", "elf.checkpoint": checkpoint,
                "elf.sweep.space": space.name, "elf.sweep.search": search, "elf.evaluator": evaluator}
        if nest_under:
            tags["mlflow.parentRunId"] = nest_under
        parent = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        tracking.log_params_flat(parent, {"checkpoint": checkpoint, "space": space.path, "search": search,
                                          "num_samples": n, "evaluator": evaluator, "evaluator_dtype": evaluator_dtype,
                                          "min_entropy": threshold, **{f"fixed.{k}": v for k, v in fixed.items()},
                                          **{f"space.{k}": v for k, v in space.params.items()}}, client)
        client.log_text(parent, Path(space.path).read_text(), f"frontier/space-{Path(space.path).name}")
        out_dir.mkdir(parents=True, exist_ok=True)
        ledger_path.write_text(json.dumps({"parent_run_id": parent, "experiment_id": exp_id, "checkpoint": checkpoint,
                                           "space": str(Path(space.path).resolve()), "search": search, "tracking_uri": uri,
                                           "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    print(f"[sweep] {name}: parent MLflow run {parent} in '{experiment}' ({uri})"
          + (" — resuming" if resuming else ""), flush=True)

    status, error = "FAILED", None
    rows: list[dict[str, Any]] = []
    try:
        session = init_ray(address)
        gpus = session.resources.get("GPU", 0.0)
        if gpus >= 1 and device in (None, "cuda"):
            resources, fits = {"cpu": 1, "gpu": 1}, int(gpus)
        else:
            cpus = float(cpus_per_trial or 1)
            resources = {"cpu": cpus}
            fits = int(session.resources.get("CPU", 1) // cpus)
            if session.local or session.reused:
                fits = min(fits, max(1, int((os.cpu_count() or 1) // cpus)))
        check_cluster_fits(1, resources["cpu"], resources.get("gpu", 0.0),
                           hint="lower --cpus-per-trial or add nodes")
        total = expected_trials(space, search, n)
        concurrency = max(1, min(int(max_concurrent or fits), total))
        ctx = TrialContext(checkpoint=checkpoint, tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent,
                           sweep_name=name, fixed=fixed, conditional=space.task == "conditional", evaluator=evaluator,
                           evaluator_dtype=evaluator_dtype, task=task, references=references, use_ema=use_ema,
                           device=device, threads=None if "gpu" in resources else max(1, int(resources["cpu"])),
                           session_factory=session_factory)
        trainable = tune.with_resources(tune.with_parameters(frontier_trial, ctx=ctx), resources)
        print(f"[sweep] {total} trials, {concurrency} at a time, {resources} each; Ray {session.resources}", flush=True)
        set_trial_budget(max_trials)
        if resuming and tune.Tuner.can_restore(str(tune_dir)):
            tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=retry_failed)
        else:
            tuner = tune.Tuner(trainable, param_space=tune_param_space(space, search),
                               tune_config=_tune_config(space, search, n, concurrency, seed, fixed),
                               run_config=tune.RunConfig(
                                   name="tune", storage_path=str(out_dir), verbose=verbose,
                                   callbacks=[make_sweep_callback(uri, exp_id, parent)],
                                   failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)))
        t_fit, t_fit_epoch = time.perf_counter(), time.time()
        with _sigterm_as_tune_interrupt():
            tuner.fit()
        wall = time.perf_counter() - t_fit
        close_orphan_children(client, exp_id, parent)
        rows = collect_rows(client, exp_id, parent, space)
        ended = [r for r in rows if r["status"] in ("FINISHED", "FAILED")]
        status = "FINISHED" if len(ended) >= total else "KILLED"
        outcome = _publish(client, parent, exp_id, name, out_dir, space, rows, threshold, checkpoint, evaluator,
                           status, wall, t_fit_epoch)
        print(f"[sweep] {len(ended)}/{total} trials ended ({sum(r['status'] == 'FAILED' for r in rows)} failed) in "
              f"{wall:.1f} s wall; trials' sample+score time {outcome.trial_eval_s:.1f} s", flush=True)
        if status == "KILLED":
            print(f"[sweep] interrupted: continue with --resume --name {name}", flush=True)
        return outcome
    except BaseException as e:
        error = e
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
        raise
    finally:
        set_trial_budget(None)
        try:
            close_orphan_children(client, exp_id, parent)
        finally:
            if error is not None:
                client.set_tag(parent, "elf.error", f"{type(error).__name__}: {error}"[:5000])
            client.set_tag(parent, "elf.sweep.state", {"FINISHED": "complete", "KILLED": "interrupted"}.get(status, "failed"))
            tracking.finish_run(parent, status, client)


@contextlib.contextmanager
def _sigterm_as_tune_interrupt() -> Iterator[None]:
    """SIGTERM (``ray job stop``, schedulers) during ``fit`` becomes Tune's own graceful interrupt
    (SIGUSR1, like Ctrl-C): the experiment state is saved and the sweep ends KILLED, resumable."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGUSR1))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tune_config(space: SweepSpace, search: str, n: int, concurrency: int, seed: int, fixed: dict[str, Any]) -> Any:
    from ray import tune

    def trial_name(trial: Any) -> str:
        return f"{trial.trial_id} {settings_label({**fixed, **trial.config}, space.task == 'conditional')}"

    # reuse_actors: a worker process keeps its EvalSession (model + evaluator) across trials.
    common = dict(num_samples=n, reuse_actors=True, trial_name_creator=trial_name,
                  trial_dirname_creator=lambda t: t.trial_id)
    if search == "optuna":
        try:
            import optuna
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise SweepError("--search optuna needs the optuna package: pip install 'optuna>=4'") from None
        o0, o1 = space.objectives
        alg = OptunaSearch(metric=[o0.metric, o1.metric], mode=[o0.mode, o1.mode],
                           sampler=optuna.samplers.NSGAIISampler(seed=seed))
        return tune.TuneConfig(search_alg=alg, max_concurrent_trials=concurrency, **common)
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores max_concurrent_trials for a BasicVariantGenerator instance: it limits itself.
    alg = BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)
    return tune.TuneConfig(search_alg=alg, **common)


def _publish(client: Any, parent: str, exp_id: str, name: str, out_dir: Path, space: SweepSpace,
             rows: list[dict[str, Any]], threshold: float | None, checkpoint: str, evaluator: str, status: str,
             wall: float, t_fit: float) -> SweepOutcome:
    """CSV files, plot, best point: written to ``out_dir`` and logged on the parent run."""
    from pipelines import tracking

    o0, o1 = space.objectives
    best = best_point(rows, space.objectives, threshold)
    files = {
        "results": write_rows_csv(rows, out_dir / "results.csv", RESULT_COLS),
        "pareto": write_rows_csv([r for r in rows if r.get("pareto")], out_dir / "pareto.csv", RESULT_COLS),
    }
    title = (f"{name}: {o0.metric} vs {o1.metric} ({evaluator}); "
             f"{sum(r['status'] == 'FINISHED' for r in rows)} trials"
             + ("" if best is None else f"; best {best['label']}"))
    ref = dict(space.reference) if space.reference else None
    files["plot"] = plot_frontier([FrontierSeries(series_label(checkpoint), rows)], out_dir / "frontier.png",
                                  space.objectives, reference=ref, title=title, threshold=threshold,
                                  conditional=space.task == "conditional")
    # Trials run by this invocation: the ones that finished after fit() began (t_fit: epoch seconds).
    mine = [r for r in rows if r["status"] == "FINISHED" and float(r.get("finished_at_s", 0)) >= t_fit]
    eval_s = sum(float(r.get("sample_seconds", 0)) + float(r.get("score_seconds", 0)) for r in mine)
    rule = rule_text(space.objectives, threshold)
    summary = {"rule": rule, "threshold": threshold, "best": best, "status": status, "wall_s": wall,
               "trials": len(rows), "finished": sum(r["status"] == "FINISHED" for r in rows),
               "failed": sum(r["status"] == "FAILED" for r in rows)}
    files["best"] = out_dir / "best.json"
    files["best"].write_text(json.dumps(summary, indent=1, default=str))
    for f in files.values():
        client.log_artifact(parent, str(f), "frontier")
    metrics = {"trials_finished": summary["finished"], "trials_failed": summary["failed"], "sweep_wall_s": wall,
               "trials_sample_score_s": eval_s, "pareto_points": sum(bool(r.get("pareto")) for r in rows)}
    if best is not None:
        metrics.update({f"best_{o0.metric}": float(best[o0.metric]), f"best_{o1.metric}": float(best[o1.metric])})
    with tracking.MetricsLogger(parent, client) as logger:
        logger.log(metrics, step=0)
    tags = {"frontier.rule": rule, "frontier.sweep_run_id": parent, "frontier.evaluator": evaluator}
    if best is None:
        tags["frontier.best"] = f"none: no Pareto point meets the constraint ({rule})"
    else:
        settings = {k: best[k] for k in SETTING_KEYS if k in best}
        tags.update({"frontier.best": best["label"], "frontier.best.settings": json.dumps(settings),
                     f"frontier.best.{o0.metric}": f"{float(best[o0.metric]):.4g}",
                     f"frontier.best.{o1.metric}": f"{float(best[o1.metric]):.4g}",
                     constraint_tag_key(space.objectives, threshold): f"{float(best[o0.metric]):.4g} ({best['label']})"})
    for k, v in tags.items():
        client.set_tag(parent, k, v)
    if status == "FINISHED":
        mv = tag_model_version(client, checkpoint, tags)
        if mv:
            print(f"[sweep] tagged model version {mv[0]}/{mv[1]}: frontier.best = {tags['frontier.best']}", flush=True)
    print(f"[sweep] best ({rule}): {tags.get('frontier.best')}; files in {out_dir}", flush=True)
    return SweepOutcome(name=name, parent_run_id=parent, experiment_id=exp_id, out_dir=out_dir, rows=rows, best=best,
                        threshold=threshold, status=status, wall_s=wall, trial_eval_s=eval_s, space=space, files=files)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="experiments/frontier_sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", required=True, help="models:/<name>/<version|latest> | models:/<name>@<alias> | "
                   "runs:/<run>/checkpoint | a checkpoint directory")
    p.add_argument("--space", type=Path, default=None, help="search-space YAML (default: experiments/sweeps/"
                   "uncond_paper.yaml or cond_paper.yaml by the checkpoint's task)")
    p.add_argument("--search", choices=("grid", "random", "optuna"), default="grid",
                   help="grid: every point once; random: --num-samples draws; optuna: NSGA-II on the two objectives")
    p.add_argument("--num-samples", type=int, default=None, help="Tune trials for random/optuna (default 20)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at a time (default: one per GPU, else CPUs / --cpus-per-trial)")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="CPU share of a CPU trial (default 1)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this --name")
    p.add_argument("--retry-failed", action="store_true", help="with --resume: run failed trials again")
    p.add_argument("--name", default=None, help="sweep name (default: <checkpoint>--<space>[-<search>])")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where sweeps keep state and files (relative: "
                   "under the checkout, $ELF_LAB_ROOT, or ~/elf-lab for `ray job submit` uploads)")
    p.add_argument("--experiment", default="elf/frontier", help="MLflow experiment (default elf/frontier)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else <root>/mlruns/mlflow.db")
    p.add_argument("--evaluator", default="gpt2-large", help="Gen PPL model (offline here: smollm2)")
    p.add_argument("--evaluator-dtype", default="float32")
    p.add_argument("--min-entropy", default=None, help="'best' = lowest Gen PPL among Pareto points with entropy "
                   ">= this; 'auto' = 5.0·ln(L)/ln(1024) for sequence length L; 'none' (default: the space's)")
    p.add_argument("--samples-per-trial", type=int, default=None, help="texts generated per trial (space's num_samples)")
    p.add_argument("--batch-size", type=int, default=None, help="sampling batch size (space's batch_size)")
    p.add_argument("--max-trials", type=int, default=None, help="stop after this many trials ended (resumable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random/optuna search")
    p.add_argument("--task", default=None, help="conditional task name (passed to the evaluator)")
    p.add_argument("--references", default=None, help="reference file for conditional scoring")
    p.add_argument("--device", default=None, help="cpu | cuda (default: a GPU when the trial has one)")
    p.add_argument("--ema", dest="use_ema", action="store_true", default=None, help="sample with EMA weights")
    p.add_argument("--no-ema", dest="use_ema", action="store_false", help="sample with raw weights")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: v for k, v in (("num_samples", args.samples_per_trial), ("batch_size", args.batch_size)) if v}
    from pipelines import tracking

    try:
        out = run_sweep(args.checkpoint, space=args.space, search=args.search, num_samples=args.num_samples,
                        max_concurrent=args.max_concurrent, resume=args.resume, name=args.name, out_root=args.out,
                        tracking_uri=args.tracking_uri, experiment=args.experiment, evaluator=args.evaluator,
                        evaluator_dtype=args.evaluator_dtype, min_entropy=args.min_entropy,
                        cpus_per_trial=args.cpus_per_trial, overrides=overrides, max_trials=args.max_trials,
                        retry_failed=args.retry_failed, task=args.task, references=args.references,
                        use_ema=args.use_ema, device=args.device, address=args.address, seed=args.seed)
    except (SweepError, tracking.TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uri = tracking.resolve_tracking_uri(args.tracking_uri, runs_root())
    print(f"[sweep] see it in MLflow:\n{tracking.ui_command(uri, out.experiment_id, out.parent_run_id)}")
    return 0 if out.status == "FINISHED" else 3


if __name__ == "__main__":
    sys.exit(main())
