"""One frontier sweep: Ray Tune over sampler settings of one checkpoint, tracked in MLflow.

A parent MLflow run per sweep — a child of the training run that produced the checkpoint, so the
training run's page leads to its frontier (a sweep of an official or foreign checkpoint gets its
own parent in ``elf/frontier``) — with one child run per trial. On the parent:
``frontier/results.csv``, ``frontier/pareto.csv``, ``frontier/frontier.png`` and
``frontier/best.json``; the "best" point is also tagged on the registered model version when the
checkpoint is a ``models:/`` reference. Local state lives in ``<out>/<name>/``: ``sweep.json`` (the
parent run id; what ``--resume`` reads), ``tune/`` (Tune's experiment, ``Tuner.restore``) and the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ray import tune

from pipelines import checkpoints
from pipelines.infra.filesystems import basename
from pipelines.infra.paths import under_root
from pipelines.infra.ray_env import check_cluster_fits, init_ray
from pipelines.sweeps import pareto
from pipelines.sweeps.publish import publish
from pipelines.sweeps.results import rows_from_grid
from pipelines.sweeps.settings import SweepConfig, SweepError
from pipelines.sweeps.space import tune_param_space
from pipelines.sweeps.trial import SweepCallback, TrialContext, close_orphan_children, frontier_trial
from pipelines.tracking import runs
from pipelines.tracking.store import check_tracking_reachable, make_client, resolve_tracking_uri

LEDGER = "sweep.json"


@dataclass
class SweepOutcome:
    """What a sweep produced (the scaling ablation reads it)."""

    name: str
    parent_run_id: str
    experiment_id: str
    out_dir: Path
    rows: list[dict[str, Any]]
    best: Optional[dict[str, Any]]
    threshold: Optional[float]
    status: str  # FINISHED | KILLED (interrupted, resumable)
    wall_s: float
    trial_eval_s: float  # sum of sample + score seconds of the trials run by this invocation
    collapsed: Optional[str] = None  # "collapsed: entropy 0.41" when no trial meets the constraint
    files: dict[str, Path] = field(default_factory=dict)


def series_label(checkpoint: str) -> str:
    """A short legend name: ``elf-x/3`` for ``models:/elf-x/3``; ``run/checkpoint_…`` for a directory."""
    if checkpoint.startswith(("models:/", "runs:/")):
        return checkpoint.split(":/", 1)[1].strip("/")
    parent = basename(str(Path(checkpoint).parent)) if "://" not in checkpoint else ""
    name = basename(checkpoint.rstrip("/"))
    return f"{parent}/{name}" if name.startswith("checkpoint") and parent else name


def default_name(checkpoint: str, cfg: SweepConfig) -> str:
    kind = "" if cfg.search.kind == "grid" else f"-{cfg.search.kind}"
    return runs.slug(f"{series_label(checkpoint)}--{cfg.name}{kind}", "sweep")


def _ledger(out_dir: Path, name: str, resume: str, now: dict[str, str]) -> Optional[dict[str, Any]]:
    """The sweep's ledger when it continues (``resume``: "yes" | "no" | "auto"), else None."""
    path = out_dir / LEDGER
    if resume == "yes" and not path.is_file():
        raise SweepError(f"--resume: no sweep named {name!r} at {out_dir} (no {LEDGER}); run without --resume")
    if resume == "no" and path.is_file():
        raise SweepError(f"a sweep named {name!r} already exists at {out_dir}: pass --resume to continue it, "
                         "or --name to start another")
    if not path.is_file():
        return None
    try:
        ledger = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SweepError(f"{path}: not valid JSON ({e}); move it away and run without --resume") from None
    for key, value in now.items():
        if key in ledger and ledger[key] != value:  # a key older ledgers lack is not compared
            raise SweepError(f"--resume {name!r}: {key} was {ledger.get(key)!r}, now {value!r}; resume with the same "
                             "settings or pass --name for a new sweep")
    return ledger


def _resources(cfg: SweepConfig, address: Optional[str]) -> tuple[dict[str, float], int]:
    """Each trial's resources and how many trials fit at once."""
    session = init_ray(address)
    gpus = session.resources.get("GPU", 0.0)
    if gpus >= 1 and cfg.scoring.device in (None, "cuda"):
        resources, fits = {"cpu": 1, "gpu": 1}, int(gpus)
    else:
        cpus = float(cfg.search.cpus_per_trial)
        resources, fits = {"cpu": cpus}, int(session.resources.get("CPU", 1) // cpus)
        if session.local or session.reused:
            fits = min(fits, max(1, int((os.cpu_count() or 1) // cpus)))
    check_cluster_fits(1, resources["cpu"], resources.get("gpu", 0.0), hint="lower search.cpus_per_trial or add nodes")
    return resources, max(1, min(int(cfg.search.max_concurrent or fits), cfg.expected_trials()))


def _tune_config(cfg: SweepConfig, concurrency: int) -> tune.TuneConfig:
    from pipelines.sweeps.space import settings_label

    def trial_name(trial: Any) -> str:
        return f"{trial.trial_id} {settings_label({**cfg.fixed, **trial.config}, cfg.conditional)}"

    # reuse_actors: a worker process keeps its EvalSession (model + evaluator) across trials.
    common = dict(num_samples=1 if cfg.search.kind == "grid" else cfg.expected_trials(), reuse_actors=True,
                  trial_name_creator=trial_name, trial_dirname_creator=lambda t: t.trial_id)
    if cfg.search.kind == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        o0, o1 = cfg.objectives
        alg = OptunaSearch(metric=[o0.metric, o1.metric], mode=[o0.mode, o1.mode],
                           sampler=optuna.samplers.NSGAIISampler(seed=cfg.search.seed))
        return tune.TuneConfig(search_alg=alg, max_concurrent_trials=concurrency, **common)
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores max_concurrent_trials for a BasicVariantGenerator instance: it limits itself.
    return tune.TuneConfig(search_alg=BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=concurrency),
                           **common)


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


def _fit(cfg: SweepConfig, ctx: TrialContext, out_dir: Path, resources: dict, concurrency: int, resuming: bool,
         verbose: int) -> Any:
    trainable = tune.with_resources(tune.with_parameters(frontier_trial, ctx=ctx), resources)
    tune_dir = out_dir / "tune"
    callback = SweepCallback(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, cfg.search.max_trials)
    if resuming and tune.Tuner.can_restore(str(tune_dir)):
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=cfg.search.retry_failed)
    else:
        tuner = tune.Tuner(trainable, param_space=tune_param_space(cfg), tune_config=_tune_config(cfg, concurrency),
                           run_config=tune.RunConfig(name="tune", storage_path=str(out_dir), verbose=verbose,
                                                     callbacks=[callback],
                                                     failure_config=tune.FailureConfig(max_failures=0)))
    with _sigterm_as_tune_interrupt():
        return tuner.fit()


def _checkpoint(spec: str, cfg: SweepConfig, uri: str) -> checkpoints.ResolvedCheckpoint:
    """The checkpoint's light files (config, step, run) and a check that it fits the space's task."""
    with checkpoints.resolve(spec, tracking_uri=uri, files=checkpoints.LIGHT_FILES) as ck:
        pass
    trained = ck.config.data.task if ck.config is not None else "unconditional"
    kind = "unconditional" if (cfg.scoring.task or trained) == "unconditional" else "conditional"
    if cfg.task != kind:
        raise SweepError(f"{cfg.path} is a {cfg.task} space but checkpoint {spec!r} is {kind}")
    return ck


def run_sweep(checkpoint: str, cfg: SweepConfig, *, name: Optional[str] = None, resume: str = "no",
              tracking_uri: Optional[str] = None, ray_address: Optional[str] = None,
              nest_under: Optional[tuple[str, str]] = None, session_factory: Optional[Callable[..., Any]] = None,
              verbose: int = 1) -> SweepOutcome:
    """Run (``resume="yes"``: continue; ``"auto"``: whichever applies) one frontier sweep of
    ``checkpoint``. ``nest_under=(experiment id, run id)`` makes the sweep's parent run a child of
    that run (the scaling ablation)."""
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_reachable(uri)
    client = make_client(uri)
    ck = _checkpoint(checkpoint, cfg, uri)
    threshold = pareto.threshold_for(cfg, ck.config.data.max_length if ck.config is not None else None)
    name = name or default_name(checkpoint, cfg)
    out_dir = under_root(cfg.out).resolve() / name
    identity = {"checkpoint": ck.pinned, "space": str(Path(cfg.path).resolve()), "search": cfg.search.kind,
                "tracking_uri": uri, "settings": settings_digest(cfg)}
    ledger = _ledger(out_dir, name, resume, identity)
    # Under the ablation (nest_under), else under the checkpoint's training run, else cfg.experiment.
    exp_id, parent_of = (ledger["experiment_id"], None) if ledger else \
        nest_under or runs.home_of(client, ck.training_run_id, cfg.experiment)
    tags = {"elf.checkpoint": ck.pinned, "elf.sweep.space": cfg.name, "elf.sweep.search": cfg.search.kind,
            "elf.evaluator": cfg.scoring.evaluator}
    with runs.tracked_run(client, exp_id, name, kind="frontier-sweep", reattach=ledger and ledger["parent_run_id"],
                          parent_run_id=parent_of, tags=tags) as run:
        if ledger is None:
            _record_new(client, run.run_id, exp_id, cfg, ck, out_dir, threshold, identity)
        print(f"[sweep] {name}: parent MLflow run {run.run_id} ({uri})" + (" — resuming" if ledger else ""), flush=True)
        outcome = _sweep(cfg, ck, client, uri, exp_id, run.run_id, name, out_dir, threshold, ledger is not None,
                         ray_address, session_factory, verbose)
        run.end_status = outcome.status
    return outcome


def settings_digest(cfg: SweepConfig) -> str:
    """A short hash of the resolved settings that decide a trial's numbers (from the space file and the
    overrides alike): a ``--resume`` with another ``fixed.num_samples`` or evaluator would mix two
    sweeps in one frontier. How a run is paced (``search.max_trials`` / ``max_concurrent`` /
    ``cpus_per_trial`` / ``retry_failed``, ``scoring.device`` / ``log_samples``) may change on resume."""
    s, sc = cfg.search, cfg.scoring
    decisive = {"task": cfg.task, "fixed": cfg.fixed, "params": cfg.params, "objectives": cfg.objectives,
                "constraint": cfg.constraint, "search": [s.kind, s.trials, s.seed],
                "scoring": [sc.evaluator, sc.evaluator_dtype, sc.weights, sc.task, sc.references]}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def _record_new(client: Any, parent: str, exp_id: str, cfg: SweepConfig, ck: Any, out_dir: Path,
                threshold: Optional[float], identity: dict[str, str]) -> None:
    runs.log_params(client, parent, {"checkpoint": ck.pinned, "space": cfg.path, "search": cfg.search.kind,
                                     "trials": cfg.expected_trials(), "evaluator": cfg.scoring.evaluator,
                                     "evaluator_dtype": cfg.scoring.evaluator_dtype, "min_entropy": threshold,
                                     **{f"fixed.{k}": v for k, v in cfg.fixed.items()},
                                     **{f"space.{k}": v for k, v in cfg.params.items()}})
    client.log_text(parent, Path(cfg.path).read_text(), f"frontier/space-{Path(cfg.path).name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LEDGER).write_text(json.dumps({
        "parent_run_id": parent, "experiment_id": exp_id, **identity,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))


def _sweep(cfg: SweepConfig, ck: Any, client: Any, uri: str, exp_id: str, parent: str, name: str, out_dir: Path,
           threshold: Optional[float], resuming: bool, ray_address: Optional[str],
           session_factory: Optional[Callable[..., Any]], verbose: int) -> SweepOutcome:
    resources, concurrency = _resources(cfg, ray_address)
    ctx = TrialContext(checkpoint=ck.pinned, tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent,
                       sweep_name=name, fixed=dict(cfg.fixed), scoring=cfg.scoring, conditional=cfg.conditional,
                       threads=None if "gpu" in resources else max(1, int(resources["cpu"])),
                       session_factory=session_factory)
    total = cfg.expected_trials()
    print(f"[sweep] {total} trials, {concurrency} at a time, {resources} each", flush=True)
    t0, since = time.perf_counter(), time.time()
    try:
        grid = _fit(cfg, ctx, out_dir, resources, concurrency, resuming, verbose)
    finally:
        close_orphan_children(client, exp_id, parent)
    wall = time.perf_counter() - t0
    rows = rows_from_grid(grid, cfg)
    status = "FINISHED" if len(rows) >= total else "KILLED"
    summary = publish(client, parent, cfg, name, series_label(ck.pinned), out_dir, rows, threshold, status, wall,
                      since, ck.model_version)
    print(f"[sweep] {len(rows)}/{total} trials ended ({summary['failed']} failed) in {wall:.1f} s wall; trials' "
          f"sample+score time {summary['trial_eval_s']:.1f} s", flush=True)
    if status == "KILLED":
        print(f"[sweep] interrupted: continue with --resume --name {name}", flush=True)
    return SweepOutcome(name=name, parent_run_id=parent, experiment_id=exp_id, out_dir=out_dir, rows=rows,
                        best=summary["best"], threshold=threshold, status=status, wall_s=wall,
                        trial_eval_s=summary["trial_eval_s"], collapsed=summary["collapsed"], files=summary["files"])


__all__ = ["run_sweep", "SweepOutcome", "default_name", "series_label", "LEDGER"]
