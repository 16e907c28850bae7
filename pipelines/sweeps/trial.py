"""One frontier-sweep trial on Ray Tune, and the driver-side callback that watches the trials.

The trainable (importable by Ray workers: trainables in test modules cannot be unpickled) samples
and scores one sampler setting with an :class:`~pipelines.evaluation.session.EvalSession` — one per
worker *process*, cached by checkpoint + scoring settings and reused across trials
(``reuse_actors=True``) — and records it as one MLflow child run of the sweep's parent run through
the run lifecycle (:func:`pipelines.tracking.runs.tracked_run`). A trial whose child run already
FINISHED (the sweep died before Tune saw it) reports the stored metrics instead of sampling again.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ray import tune

from elf_core.config import SampleConfig
from elf_core.sampling import nfe
from pipelines.evaluation.choices import WEIGHTS
from pipelines.sweeps.settings import Scoring
from pipelines.sweeps.space import settings_label
from pipelines.tracking import runs
from pipelines.tracking.metrics import log_metrics
from pipelines.tracking.store import make_client

TRIAL_TAG = "elf.trial_id"


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its sampler settings (passed with ``tune.with_parameters``)."""

    checkpoint: str  # pinned: the exact files the driver resolved
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str
    fixed: dict[str, Any]
    scoring: Scoring
    conditional: bool = False
    threads: Optional[int] = None  # torch intra-op threads per CPU trial (its CPU share)
    # Builds the session: None means pipelines.evaluation.session.EvalSession. Tests inject a stand-in.
    session_factory: Optional[Callable[..., Any]] = None

    def session_key(self) -> tuple:
        f = self.session_factory
        # By name, not id(): a factory pickled by value is a new object in every trial's copy of ctx.
        fkey = None if f is None else (
            (_qualname(f.func), tuple(sorted((k, repr(v)) for k, v in f.keywords.items())))
            if isinstance(f, functools.partial) else _qualname(f))
        return (self.checkpoint, dataclasses.astuple(self.scoring), self.tracking_uri, fkey)


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
            from pipelines.evaluation.session import EvalSession as factory  # noqa: N813
        s, t0 = ctx.scoring, time.perf_counter()
        _SESSIONS[key] = factory(ctx.checkpoint, evaluator=s.evaluator, evaluator_dtype=s.evaluator_dtype,
                                 task=s.task, references=s.references, device=s.device, use_ema=WEIGHTS[s.weights],
                                 tracking_uri=ctx.tracking_uri)
        return _SESSIONS[key], time.perf_counter() - t0, False


def find_trial_run(client: Any, experiment_id: str, parent_run_id: str, trial_id: str) -> Any | None:
    """The newest child run of ``parent_run_id`` recorded for Tune trial ``trial_id``, or None."""
    found = client.search_runs([experiment_id], filter_string=(
        f"tags.`{runs.PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def _evaluate(ctx: TrialContext, client: Any, run_id: str, sample_cfg: SampleConfig) -> dict[str, float]:
    runs.log_params(client, run_id, {**dataclasses.asdict(sample_cfg), "checkpoint": ctx.checkpoint,
                                     "evaluator": ctx.scoring.evaluator})
    if ctx.threads and ctx.scoring.device in (None, "cpu"):
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
    log_metrics(client, run_id, metrics, step=0)
    runs.set_tags(client, run_id, {**{f"elf.eval.{k}": v for k, v in (result.provenance or {}).items()},
                                   "elf.worker_pid": os.getpid()})
    if ctx.scoring.log_samples and result.samples:
        runs.log_jsonl(client, run_id, result.samples[: ctx.scoring.log_samples], "samples/samples.jsonl")
    return metrics


def frontier_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One sweep trial: sample + score one setting as a child run of the sweep, report its metrics."""
    os.environ.pop("MLFLOW_RUN_ID", None)  # a driver's active run must not capture the trial's logging
    tctx = tune.get_context()
    trial_id = tctx.get_trial_id()
    client = make_client(ctx.tracking_uri)
    settings = dict(config)
    sample_cfg = SampleConfig(**{**ctx.fixed, **settings})
    previous = find_trial_run(client, ctx.experiment_id, ctx.parent_run_id, trial_id)
    if previous is not None and previous.info.status == "FINISHED":
        # Finished before the sweep was interrupted: report what was logged, do not sample again.
        tune.report({**previous.data.metrics, "mlflow_run_id": previous.info.run_id, "reused_result": 1.0})
        return
    tags = {TRIAL_TAG: trial_id, "elf.sweep": ctx.sweep_name, "elf.trial_name": tctx.get_trial_name(),
            "elf.checkpoint": ctx.checkpoint, "elf.evaluator": ctx.scoring.evaluator}
    with runs.tracked_run(client, ctx.experiment_id, settings_label(settings, ctx.conditional), kind="sweep-trial",
                          reattach=previous.info.run_id if previous is not None else None,
                          parent_run_id=ctx.parent_run_id, tags=tags) as run:
        metrics = _evaluate(ctx, client, run.run_id, sample_cfg)
    tune.report({**metrics, "mlflow_run_id": run.run_id})


class SweepCallback(tune.Callback):
    """Driver side: marks the child run of a trial whose worker died FAILED, and stops this
    invocation after ``max_trials`` ended trials with Tune's own graceful interrupt (what Ctrl-C
    does: state saved, the sweep stays resumable; ``stop_all`` would mark the search finished)."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, max_trials: Optional[int] = None):
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.max_trials, self.ended = max_trials, 0

    def __getstate__(self) -> dict[str, Any]:  # pickled into Tune's state: a restored sweep has no budget
        return {**self.__dict__, "max_trials": None, "ended": 0}

    def _ended(self) -> None:
        self.ended += 1
        if self.max_trials is not None and self.ended >= self.max_trials \
                and threading.current_thread() is threading.main_thread():
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        client = make_client(self.tracking_uri)
        run = find_trial_run(client, self.experiment_id, self.parent_run_id, trial.trial_id)
        if run is not None and run.info.status == "RUNNING":
            runs.finish_run(client, run.info.run_id, "FAILED", RuntimeError("the trial's worker died (see its Tune log)"))
        self._ended()


def close_orphan_children(client: Any, experiment_id: str, parent_run_id: str, status: str = "KILLED") -> int:
    """End every child of the parent still RUNNING (its trial was stopped with the sweep); a resumed
    sweep re-attaches to them by trial id. Returns how many were ended."""
    orphans = [r for r in runs.child_runs(client, experiment_id, parent_run_id) if r.info.status == "RUNNING"]
    for run in orphans:
        runs.finish_run(client, run.info.run_id, status)
    return len(orphans)


__all__ = ["TrialContext", "frontier_trial", "cached_session", "find_trial_run", "SweepCallback",
           "close_orphan_children", "TRIAL_TAG"]
