"""Frontier sweeps: the reusable parts behind ``experiments/frontier_sweep.py`` and
``experiments/scaling_ablation.py``.

A *frontier sweep* runs one Ray Tune trial per sampler setting (SC-CFG w, SDE noise γ, steps, time
grid, conditional CFG c), scores each with an :class:`pipelines.eval_session.EvalSession`, and
keeps the Pareto set of two objectives (unconditional: minimise Gen PPL, maximise entropy).

What lives here (all importable by Ray workers: trainables in test modules cannot be unpickled):

* :class:`SweepSpace` / :func:`load_space` — the YAML search spaces in ``experiments/sweeps/``;
* :func:`pareto_mask` — non-dominated points (ties and duplicates kept, failed trials excluded);
* :func:`frontier_trial` — the function trainable. One EvalSession per worker *process*, cached by
  checkpoint + evaluator (:func:`cached_session`), reused across trials with ``reuse_actors=True``;
  each trial is one MLflow child run (tag ``mlflow.parentRunId``) ended FINISHED / FAILED in
  ``finally``; a trial whose child run already FINISHED (the sweep died before Tune saw it) reports
  the stored metrics instead of sampling again;
* :class:`SweepCallback` — driver side: marks child runs of trials that died hard as FAILED and
  stops an invocation after a trial budget with Tune's own SIGUSR1 interrupt, so the experiment
  stays resumable with ``Tuner.restore`` (``stop_all`` would mark the search finished);
* :func:`close_orphan_children`, :func:`tag_model_version` — MLflow hygiene and the registry tags;
* :func:`best_point`, :func:`auto_min_entropy` (tables and plots: :mod:`pipelines.frontier_plot`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from elf_core.config import SampleConfig

SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(SampleConfig))
SETTING_KEYS = ("sampler", "steps", "gamma", "sc_cfg", "cfg", "grid")  # what a frontier varies
PAPER_ENTROPY = 5.0  # "non-degenerate" entropy at the paper's 1024 tokens (ELF-B: 5.15)
PAPER_SEQ_LEN = 1024
TAG_PREFIX = "frontier."


class SweepError(ValueError):
    """A sweep that cannot run as asked; the message names the file / key / option at fault."""


# ------------------------------------------------------------------------------------------------
# Search spaces


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # "min" | "max"


@dataclass
class SweepSpace:
    """One ``experiments/sweeps/<name>.yaml``: constant SampleConfig fields, swept ones (lists, or
    ``{low, high[, log, type]}`` ranges for random/optuna search), two objectives, the published
    operating point to mark, and the constraint that picks the "best" Pareto point."""

    name: str
    path: str
    task: str  # unconditional | conditional
    fixed: dict[str, Any]
    params: dict[str, Any]
    objectives: tuple[Objective, Objective]
    reference: dict[str, Any] = field(default_factory=dict)
    constraint: dict[str, Any] = field(default_factory=dict)  # {metric, threshold: float|"auto"|None}
    description: str = ""

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.params.values() if isinstance(v, list))


def load_space(path: str | Path) -> SweepSpace:
    """Read and check a search-space YAML; errors name the file and the key."""
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        raise SweepError(f"search space file not found: {p}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    except Exception as e:
        raise SweepError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{p}: the top level must be a mapping")
    known = {"name", "description", "task", "fixed", "params", "objectives", "reference", "constraint"}
    if unknown := sorted(set(raw) - known):
        raise SweepError(f"{p}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    fixed, params = dict(raw.get("fixed") or {}), dict(raw.get("params") or {})
    for where, keys in (("fixed", fixed), ("params", params)):
        for k in keys:
            if k not in SAMPLE_FIELDS:
                raise SweepError(f"{p}: {where}.{k} is not a SampleConfig field ({', '.join(SAMPLE_FIELDS)})")
    if both := sorted(set(fixed) & set(params)):
        raise SweepError(f"{p}: {both} are both fixed and swept")
    if not params:
        raise SweepError(f"{p}: params is empty: nothing to sweep")
    for k, v in params.items():
        if isinstance(v, list):
            if not v:
                raise SweepError(f"{p}: params.{k} is an empty list")
        elif isinstance(v, dict):
            if not {"low", "high"} <= set(v) or set(v) - {"low", "high", "log", "type"}:
                raise SweepError(f"{p}: params.{k} must be a list or {{low, high[, log, type]}}, got {v}")
        else:
            raise SweepError(f"{p}: params.{k} must be a list of values or a {{low, high}} range, got {v!r}")
    objs = raw.get("objectives") or []
    if len(objs) != 2 or any(not isinstance(o, dict) or o.get("mode") not in ("min", "max") or not o.get("metric")
                             for o in objs):
        raise SweepError(f"{p}: objectives must be two {{metric, mode: min|max}} entries, got {objs}")
    task = raw.get("task", "unconditional")
    if task not in ("unconditional", "conditional"):
        raise SweepError(f"{p}: task must be unconditional or conditional, got {task!r}")
    constraint = dict(raw.get("constraint") or {})
    if constraint and constraint.get("metric") != objs[1]["metric"]:
        raise SweepError(f"{p}: constraint.metric must be the second objective ({objs[1]['metric']})")
    return SweepSpace(
        name=str(raw.get("name") or p.stem), path=str(p), task=task, fixed=fixed, params=params,
        objectives=(Objective(**objs[0]), Objective(**objs[1])), reference=dict(raw.get("reference") or {}),
        constraint=constraint, description=str(raw.get("description") or ""),
    )


def tune_param_space(space: SweepSpace, search: str) -> dict[str, Any]:
    """Tune's ``param_space``: ``grid_search`` over every list for ``grid``; ``choice`` / ``uniform``
    / ``loguniform`` / ``randint`` for ``random`` and ``optuna``."""
    from ray import tune

    out: dict[str, Any] = {}
    for k, v in space.params.items():
        if isinstance(v, list):
            out[k] = tune.grid_search(v) if search == "grid" else tune.choice(v)
            continue
        if search == "grid":
            raise SweepError(f"{space.path}: params.{k} is a range; grid search needs a list of values "
                             "(use --search random or optuna)")
        lo, hi = v["low"], v["high"]
        if v.get("type") == "int":
            out[k] = tune.lograndint(lo, hi + 1) if v.get("log") else tune.randint(lo, hi + 1)
        else:
            out[k] = tune.loguniform(lo, hi) if v.get("log") else tune.uniform(lo, hi)
    return out


def settings_label(cfg: Mapping[str, Any], conditional: bool = False) -> str:
    """``SDE 32 γ1.5 w3 ln`` (γ = 0 is the ODE; ``c`` only for conditional sweeps)."""
    gamma = float(cfg.get("gamma", 0.0))
    ode = cfg.get("sampler") == "ode" or gamma == 0.0
    parts = [f"{'ODE' if ode else 'SDE'} {cfg.get('steps', '?')}"]
    if not ode:
        parts.append(f"γ{gamma:g}")
    parts.append(f"w{float(cfg.get('sc_cfg', 0)):g}")
    if conditional:
        parts.append(f"c{float(cfg.get('cfg', 1.0)):g}")
    parts.append({"logit_normal": "ln", "uniform": "uni"}.get(str(cfg.get("grid", "")), str(cfg.get("grid", ""))))
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------
# Pareto set


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def pareto_mask(points: Sequence[Sequence[Any]], modes: Sequence[str]) -> list[bool]:
    """True for each point no other point dominates. Objectives are turned into minimisation
    (``max`` negated); j dominates i when j is no worse in every objective and better in one.
    Duplicates and ties do not dominate each other, so all copies of a Pareto point are kept.
    Points with a missing / NaN / infinite value (failed trials) are never on the front. O(n²)."""
    sign = [1.0 if m == "min" else -1.0 for m in modes]
    if any(m not in ("min", "max") for m in modes):
        raise ValueError(f"modes must be 'min' or 'max', got {list(modes)}")
    keys = [tuple(s * float(v) for s, v in zip(sign, p)) if all(_finite(v) for v in p) else None for p in points]
    mask = []
    for i, a in enumerate(keys):
        if a is None:
            mask.append(False)
            continue
        dominated = any(b is not None and j != i and all(y <= x for x, y in zip(a, b)) and b != a
                        for j, b in enumerate(keys))
        mask.append(not dominated)
    return mask


def auto_min_entropy(seq_len: int | None) -> float:
    """The paper's 5.0 nats scaled to the sample length: unigram entropy of n tokens is at most
    ln n, so the threshold is 5.0 · ln(min(L, 1024)) / ln 1024 (L = 64 → 3.0; L ≥ 1024 → 5.0)."""
    if not seq_len:
        return PAPER_ENTROPY
    return PAPER_ENTROPY * math.log(min(int(seq_len), PAPER_SEQ_LEN)) / math.log(PAPER_SEQ_LEN)


def best_point(rows: Sequence[Mapping[str, Any]], objectives: Sequence[Objective],
               threshold: float | None) -> dict[str, Any] | None:
    """The documented "best" operating point: among Pareto rows (``row["pareto"]``) whose second
    objective meets ``threshold`` (≥ for a ``max`` objective, ≤ for ``min``; None = no constraint),
    the one with the best first objective (lowest Gen PPL). None when no Pareto row qualifies."""
    o0, o1 = objectives

    def ok(r: Mapping[str, Any]) -> bool:
        if threshold is None:
            return True
        v = float(r[o1.metric])
        return v >= threshold if o1.mode == "max" else v <= threshold

    cands = [r for r in rows if r.get("pareto") and ok(r)]
    if not cands:
        return None
    key = (lambda r: float(r[o0.metric])) if o0.mode == "min" else (lambda r: -float(r[o0.metric]))
    return dict(min(cands, key=key))


def rule_text(objectives: Sequence[Objective], threshold: float | None) -> str:
    o0, o1 = objectives
    best = "lowest" if o0.mode == "min" else "highest"
    cond = "" if threshold is None else f" with {o1.metric} {'>=' if o1.mode == 'max' else '<='} {threshold:.3g}"
    return f"{best} {o0.metric} among Pareto points{cond}"


def constraint_tag_key(objectives: Sequence[Objective], threshold: float | None) -> str:
    """``frontier.best_gen_ppl_at_entropy_ge_3.00`` (MLflow tag keys allow no '>' or '=')."""
    o0, o1 = objectives
    if threshold is None:
        return f"{TAG_PREFIX}best_{o0.metric}"
    return f"{TAG_PREFIX}best_{o0.metric}_at_{o1.metric}_{'ge' if o1.mode == 'max' else 'le'}_{threshold:.2f}"


# ------------------------------------------------------------------------------------------------
# The trainable (runs in Ray worker processes)


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its sampler settings (passed with ``tune.with_parameters``)."""

    checkpoint: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str
    fixed: dict[str, Any]
    conditional: bool = False
    evaluator: str = "gpt2-large"
    evaluator_dtype: str = "float32"
    task: str | None = None
    references: str | None = None
    use_ema: bool | None = None
    device: str | None = None
    threads: int | None = None  # torch intra-op threads per CPU trial (its CPU share)
    log_samples: int = 8
    # Builds the session: None means pipelines.eval_session.EvalSession. Tests inject a stand-in.
    session_factory: Callable[..., Any] | None = None

    def session_key(self) -> tuple:
        f = self.session_factory
        # By name, not id(): a factory pickled by value is a new object in every trial's copy of ctx.
        fkey = None if f is None else (
            (_qualname(f.func), tuple(sorted((k, repr(v)) for k, v in f.keywords.items())))
            if isinstance(f, functools.partial) else _qualname(f))
        return (self.checkpoint, self.evaluator, self.evaluator_dtype, self.task, self.references,
                self.use_ema, self.device, self.tracking_uri, fkey)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


_SESSIONS: dict[tuple, Any] = {}
_SESSIONS_LOCK = threading.Lock()


def cached_session(ctx: TrialContext) -> tuple[Any, float, bool]:
    """(session, seconds spent loading now, reused?) — one session per process and key, so a reused
    Tune actor loads the ELF model and the evaluator once for all its trials."""
    key = ctx.session_key()
    with _SESSIONS_LOCK:
        if key in _SESSIONS:
            return _SESSIONS[key], 0.0, True
        factory = ctx.session_factory
        if factory is None:
            from pipelines.eval_session import EvalSession as factory  # noqa: N813
        t0 = time.perf_counter()
        session = factory(ctx.checkpoint, evaluator=ctx.evaluator, evaluator_dtype=ctx.evaluator_dtype,
                          task=ctx.task, references=ctx.references, device=ctx.device, use_ema=ctx.use_ema,
                          tracking_uri=ctx.tracking_uri)
        _SESSIONS[key] = session
        return session, time.perf_counter() - t0, False


def _set_tags(client: Any, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set string tags in ``log_batch`` calls of at most 100 (MLflow's limit), values cut to 5000 chars."""
    from mlflow.entities import RunTag

    items = [RunTag(str(k), str(v)[:5000]) for k, v in tags.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, tags=items[i:i + 100])


def _q(value: str) -> str:
    return "'" + value.replace("'", "") + "'"


def find_child_run(client: Any, experiment_id: str, parent_run_id: str, trial_id: str) -> Any | None:
    """The newest child run of ``parent_run_id`` recorded for Tune trial ``trial_id``, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = {_q(parent_run_id)} and tags.`elf.trial_id` = {_q(trial_id)}",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def frontier_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One sweep trial: sample + score one setting, log it as a child run, report its metrics."""
    from ray import tune

    from elf_core.sampling import nfe
    from pipelines import tracking

    os.environ.pop("MLFLOW_RUN_ID", None)  # a driver's active run must not capture the trial's logging
    tctx = tune.get_context()
    trial_id = tctx.get_trial_id()
    client = tracking.make_client(ctx.tracking_uri)
    settings = {k: config[k] for k in config}
    sample_cfg = SampleConfig(**{**ctx.fixed, **settings})
    previous = find_child_run(client, ctx.experiment_id, ctx.parent_run_id, trial_id)
    if previous is not None and previous.info.status == "FINISHED":
        # Finished before the sweep was interrupted: report what was logged, do not sample again.
        tune.report({**previous.data.metrics, "mlflow_run_id": previous.info.run_id, "reused_result": 1.0})
        return
    tags = {"mlflow.parentRunId": ctx.parent_run_id, "elf.trial_id": trial_id, "elf.sweep": ctx.sweep_name,
            "elf.trial_name": tctx.get_trial_name(), "elf.checkpoint": ctx.checkpoint,
            "elf.evaluator": ctx.evaluator, "elf.evaluator_dtype": ctx.evaluator_dtype}
    if previous is not None:  # re-attach: a trial that was running when the sweep stopped
        run_id = previous.info.run_id
        client.update_run(run_id, status="RUNNING")
        tags["elf.resume_count"] = str(int(previous.data.tags.get("elf.resume_count", "0")) + 1)
        _set_tags(client, run_id, tags)
    else:
        run_id = client.create_run(ctx.experiment_id, run_name=settings_label(settings, ctx.conditional),
                                   tags=tags).info.run_id
    status = "FAILED"
    try:
        tracking.log_params_flat(run_id, {**dataclasses.asdict(sample_cfg), "checkpoint": ctx.checkpoint,
                                          "evaluator": ctx.evaluator}, client)
        if ctx.threads and (ctx.device in (None, "cpu")):
            import torch

            torch.set_num_threads(int(ctx.threads))
        t0 = time.perf_counter()
        session, load_s, reused = cached_session(ctx)
        t1 = time.perf_counter()
        result = session.evaluate(sample_cfg, progress=False)
        t2 = time.perf_counter()
        metrics = {k: float(v) for k, v in result.metrics.items()}
        metrics.update(sample_seconds=float(result.sample_seconds), score_seconds=float(result.score_seconds),
                       load_seconds=load_s, session_reused=float(reused), evaluate_seconds=t2 - t1,
                       trial_seconds=t2 - t0, finished_at_s=time.time(),
                       nfe=float(nfe(sample_cfg.steps, sample_cfg.cfg, ctx.conditional)))
        logger = tracking.MetricsLogger(run_id, client)
        logger.log(metrics, step=0)
        logger.close()
        prov = {f"elf.eval.{k}": v for k, v in (result.provenance or {}).items()}
        prov["elf.worker_pid"] = str(os.getpid())
        _set_tags(client, run_id, prov)
        if ctx.log_samples and result.samples:
            import json

            lines = "".join(json.dumps(s) + "\n" for s in result.samples[: ctx.log_samples])
            client.log_text(run_id, lines, "samples/samples.jsonl")
        status = "FINISHED"
    except BaseException as e:
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            client.set_tag(run_id, "elf.error", f"{type(e).__name__}: {e}"[:5000])
        finally:
            client.set_terminated(run_id, status)
        raise
    client.set_terminated(run_id, status)
    tune.report({**metrics, "mlflow_run_id": run_id})


# ------------------------------------------------------------------------------------------------
# Driver side: callback, orphans, registry tags

_TRIAL_BUDGET: dict[str, int | None] = {"limit": None}


def set_trial_budget(limit: int | None) -> None:
    """Stop this process's next ``Tuner.fit`` after ``limit`` trials ended (None: no limit). The
    sweep stays resumable. Kept out of the pickled callback: a restored sweep gets a fresh budget."""
    if limit is not None and limit < 1:
        raise SweepError(f"--max-trials must be >= 1, got {limit}")
    _TRIAL_BUDGET["limit"] = limit


class SweepCallback:
    """Tune callback (driver): counts ended trials against :func:`set_trial_budget` and marks the
    child run of a trial that errored without ending it (a killed worker) FAILED."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str) -> None:
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.ended = 0

    def __reduce__(self) -> tuple:  # pickled into tuner.pkl: the count must restart on restore
        return (make_sweep_callback, (self.tracking_uri, self.experiment_id, self.parent_run_id))

    def _ended(self) -> None:
        self.ended += 1
        limit = _TRIAL_BUDGET["limit"]
        if limit is not None and self.ended >= limit and threading.current_thread() is threading.main_thread():
            # Tune's own interrupt (what Ctrl-C does): state is saved, the search is not marked finished.
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from pipelines import tracking

        client = tracking.make_client(self.tracking_uri)
        run = find_child_run(client, self.experiment_id, self.parent_run_id, trial.trial_id)
        if run is not None and run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "elf.error", "the trial's worker died (see the Tune trial log)")
            client.set_terminated(run.info.run_id, "FAILED")
        self._ended()


def make_sweep_callback(tracking_uri: str, experiment_id: str, parent_run_id: str) -> Any:
    """A :class:`SweepCallback` that is also a ``ray.tune.Callback`` (Ray is imported lazily)."""
    from ray import tune

    cls = type("TuneSweepCallback", (SweepCallback, tune.Callback), {"__module__": __name__})
    return cls(tracking_uri, experiment_id, parent_run_id)


def child_runs(client: Any, experiment_id: str, parent_run_id: str) -> list[Any]:
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = {_q(parent_run_id)}",
                              max_results=5000)


def close_orphan_children(client: Any, experiment_id: str, parent_run_id: str, status: str = "KILLED") -> int:
    """End every child of the parent still RUNNING (its trial was stopped with the sweep); a resumed
    sweep re-attaches to them by trial id. Returns how many were ended."""
    n = 0
    for run in child_runs(client, experiment_id, parent_run_id):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status)
            n += 1
    return n


def parse_models_uri(checkpoint: str) -> tuple[str, str] | None:
    """``models:/name/3`` → (name, "3"); ``models:/name@alias`` → (name, "@alias"); ``models:/name/latest``
    → (name, "latest"). None for anything that is not a ``models:/`` URI."""
    if not checkpoint.startswith("models:/"):
        return None
    rest = checkpoint[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, "@" + alias
    if "/" not in rest:
        raise SweepError(f"checkpoint {checkpoint!r}: expected models:/<name>/<version|latest> or models:/<name>@<alias>")
    name, ref = rest.split("/", 1)
    return name, ref


def resolve_model_version(client: Any, checkpoint: str) -> tuple[str, str] | None:
    """(registered model name, version number) of a ``models:/`` checkpoint, else None."""
    parsed = parse_models_uri(checkpoint)
    if parsed is None:
        return None
    name, ref = parsed
    if ref.startswith("@"):
        return name, str(client.get_model_version_by_alias(name, ref[1:]).version)
    if ref.isdigit():
        return name, ref
    if ref == "latest":
        versions = client.search_model_versions(f"name = {_q(name)}")
        if not versions:
            raise SweepError(f"checkpoint {checkpoint!r}: registered model {name!r} has no versions")
        return name, str(max(int(v.version) for v in versions))
    raise SweepError(f"checkpoint {checkpoint!r}: unknown version {ref!r} (use a number, 'latest' or @alias)")


def tag_model_version(client: Any, checkpoint: str, tags: Mapping[str, Any]) -> tuple[str, str] | None:
    """Set ``tags`` on the registered model version a ``models:/`` checkpoint names."""
    mv = resolve_model_version(client, checkpoint)
    if mv is None:
        return None
    for k, v in tags.items():
        client.set_model_version_tag(mv[0], mv[1], k, str(v)[:5000])
    return mv


def read_checkpoint_config(checkpoint: str, tracking_uri: str) -> Any | None:
    """The ExperimentConfig saved with a checkpoint (local dir, ``models:/…`` or ``runs:/…``), read
    from its ``config.yaml`` only (no weights); None when it has none."""
    from elf_core.config import from_yaml_text
    from pipelines import tracking

    if checkpoint.startswith(("models:/", "runs:/")):
        import tempfile

        import mlflow.artifacts

        if checkpoint.startswith("models:/"):
            client = tracking.make_client(tracking_uri)
            name, version = resolve_model_version(client, checkpoint)  # type: ignore[misc]
            base = client.get_model_version(name, version).source.rstrip("/")
        else:
            base = checkpoint.rstrip("/")
        with tempfile.TemporaryDirectory() as d:
            try:
                path = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/config.yaml", dst_path=d,
                                                           tracking_uri=tracking_uri)
            except Exception as e:  # noqa: BLE001 - MLflow raises several types for "not there"
                raise SweepError(f"checkpoint {checkpoint!r}: cannot read its config.yaml ({base}): {e}") from None
            text = Path(path).read_text()
    else:
        p = Path(checkpoint).expanduser()
        if not p.is_dir():
            raise SweepError(f"checkpoint {checkpoint!r}: not a directory, models:/ or runs:/ URI")
        if not (p / "config.yaml").is_file():
            return None
        text = (p / "config.yaml").read_text()
    return from_yaml_text(text, origin=f"{checkpoint} config.yaml")
