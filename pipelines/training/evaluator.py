"""Evaluation beside training: one long-lived Ray actor scores each due checkpoint while training
goes on (``train.eval_every`` / ``train.eval_every_epochs``).

* The driver starts the actor before training, with its own resources (``ray.eval_cpus`` /
  ``ray.eval_gpus``), and waits until it has loaded the encoder and the Gen-PPL evaluator: an
  evaluator that cannot be loaded, or resources the cluster can never provide, is one line before
  any training step. The driver owns it, so it outlives worker failures and retries.
* Rank 0 hands each due checkpoint over *by reference* (its storage location and step) with a
  fire-and-forget call: training never waits for evaluation (:func:`hand_over`).
* The actor keeps one pending checkpoint at most: when it falls behind, a newer due checkpoint
  replaces the pending one, which is counted as ``eval/skipped`` — it never queues without bound.
  The checkpoint being scored and the pending one are protected from rotation (:meth:`protected`).
* If an evaluation fails, training goes on and the failure is logged once (``elf.eval.error``);
  if the actor's process dies, Ray restarts it (``elf.eval.restarts``).
* On resume, steps already evaluated (``eval/evaluated`` in the run) are never repeated, and the
  newest due checkpoint not yet scored is handed over first (:func:`catch_up`).
* At the end the driver hands over the final checkpoint and waits for it (:func:`finish`), so the
  run is marked FINISHED only after its last checkpoint was evaluated.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import ray

from elf_core.config import ExperimentConfig, from_yaml_text, to_yaml
from elf_core.errors import ElfError
from pipelines import checkpoints
from pipelines.evaluation.choices import WEIGHTS
from pipelines.infra.ray_env import ClusterTooSmall, workers_that_fit
from pipelines.tracking import registry, runs
from pipelines.tracking.store import make_client
from pipelines.training import eval_record as rec

NAMESPACE = "elf-lab"


def _log(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


class TrainingEvaluator:
    """The actor body (``ray.remote(max_concurrency=4, max_restarts=…)``): handoffs, status calls and
    ``finish`` run while the scoring thread works."""

    def __init__(self, config_yaml: str, tracking_uri: str, run_id: str, faults: Optional[dict] = None):
        import torch

        self.cfg: ExperimentConfig = from_yaml_text(config_yaml, origin="eval config")
        self.client, self.run_id, self.faults = make_client(tracking_uri), run_id, dict(faults or {})
        torch.set_num_threads(max(1, int(self.cfg.ray.eval_cpus)))
        self.cond = threading.Condition()
        self.pending: Optional[tuple[str, int]] = None
        self.busy: Optional[tuple[str, int]] = None
        self.skipped_since, self.skipped_total, self.errors = 0, 0, 0
        self.session: Any = None
        self.history = self._history()
        self.task = "unconditional" if self.cfg.data.task == "unconditional" else None  # set by the session
        self.best: Optional[dict[str, float]] = None
        with warnings.catch_warnings():  # Ray 2.60 warns about its own actor_id use inside this property
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if restarted:
            restarts = int(self.client.get_run(run_id).data.tags.get("elf.eval.restarts", "0")) + 1
            runs.set_tags(self.client, run_id, {"elf.eval.restarts": restarts})
            _log(f"the evaluator was restarted ({restarts}×); training went on")
        threading.Thread(target=self._loop, daemon=True, name="elf-evaluator").start()

    def _history(self) -> dict[int, dict[str, float]]:
        """What earlier evaluations of this run logged: step -> primary metrics."""
        steps = {m.step for m in self.client.get_metric_history(self.run_id, rec.EVALUATED)}
        out: dict[int, dict[str, float]] = {s: {} for s in steps}
        for key in ("gen_ppl", "entropy", "bleu", "rouge1", "rouge2", "rougeL"):
            for m in self.client.get_metric_history(self.run_id, f"eval/{key}"):
                if m.step in out:
                    out[m.step][key] = m.value
        return out

    def _session(self) -> Any:
        if self.session is None:
            from pipelines.evaluation.session import EvalSession

            e = self.cfg.eval
            self.session = EvalSession(None, config=self.cfg, evaluator=e.evaluator, evaluator_dtype=e.evaluator_dtype,
                                       references=e.references, tracking_uri=self.client.tracking_uri)
            self.task = self.session.task
            threshold = rec.best_threshold(self.cfg, self.task)
            for step in sorted(self.history):  # the best so far, under the same rule
                if self.history[step] and rec.is_better(self.task, self.history[step], self.best, threshold):
                    self.best = self.history[step]
        return self.session

    # -- calls ------------------------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        """Load the encoder and the evaluator (once); what the driver checks before training."""
        s = self._session()
        return {"evaluator": s.evaluator.name if s.evaluator else s.task, "evaluated": sorted(self.history),
                "pid": os.getpid()}

    def submit(self, location: str, step: int) -> bool:
        """Hand a checkpoint over; False when it was evaluated already (or a newer one is due)."""
        with self.cond:
            if step in self.history or (self.busy and self.busy[1] >= step) or (self.pending and self.pending[1] >= step):
                return False
            if self.pending is not None:
                self.skipped_since += 1  # fell behind: the newest due checkpoint replaces the pending one
            self.pending = (location, step)
            self.cond.notify_all()
            return True

    def protected(self) -> list[str]:
        """Checkpoints rotation must not delete: the one being scored and the pending one."""
        with self.cond:
            return [x[0] for x in (self.busy, self.pending) if x is not None]

    def finish(self, location: str, step: int) -> dict[str, Any]:
        """Score the final checkpoint (unless it was already) and wait until nothing is left."""
        self.submit(location, step)
        with self.cond:
            while self.pending is not None or self.busy is not None:
                self.cond.wait(timeout=1.0)
        return {"evaluated": sorted(self.history), "skipped": self.skipped_total, "errors": self.errors}

    # -- the scoring thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while self.pending is None:
                    self.cond.wait()
                self.busy, self.pending = self.pending, None
                skipped, self.skipped_since = self.skipped_since, 0
                self.skipped_total += skipped
            try:
                self._evaluate(*self.busy, skipped)
            except Exception as e:  # noqa: BLE001 - training must go on; logged once
                self.errors += 1
                if self.errors == 1:
                    runs.set_tags(self.client, self.run_id, {"elf.eval.error": f"step {self.busy[1]}: {type(e).__name__}: {e}"})
                    _log(f"evaluating step {self.busy[1]} failed ({type(e).__name__}: {e}); training goes on")
            finally:
                with self.cond:
                    self.busy = None
                    self.cond.notify_all()

    def _fault(self, step: int) -> None:
        """Test hooks: ``delay_s`` before reading a checkpoint; ``exit_at`` = step: the process dies once;
        ``exit_always``: it dies at every checkpoint (gone for good after ``max_restarts``)."""
        time.sleep(float(self.faults.get("delay_s", 0.0)))
        if self.faults.get("exit_always"):
            os._exit(1)
        marker = Path(self.faults.get("marker_dir", "/nonexistent")) / f"evaluator-exit-{step}"
        if self.faults.get("exit_at") == step and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("1")
            os._exit(1)

    def _evaluate(self, location: str, step: int, skipped: int) -> None:
        t0 = time.perf_counter()
        self._fault(step)
        session = self._session()
        session.use_checkpoint(location, use_ema=WEIGHTS["auto"])  # EMA once it is warm, as evaluate.py
        results = [(sc, session.evaluate(sc, progress=False)) for sc in rec.sampling_points(self.cfg)]
        extra = {"skipped": float(skipped), "seconds": time.perf_counter() - t0}
        metrics = rec.log_evaluation(self.client, self.run_id, step, results, self.task, extra)
        self.history[step] = metrics
        threshold = rec.best_threshold(self.cfg, self.task)
        rec.log_plot(self.client, self.run_id, self.history, self.task, self.cfg.name, threshold)
        if rec.is_better(self.task, metrics, self.best, threshold):
            self.best = metrics
            with checkpoints.resolve(location, files=registry.REGISTERED_FILES) as ck:
                model = rec.register_best(self.client, self.run_id, self.cfg, ck.path, step, metrics, self.task)
            _log(f"step {step}: new @best {model}")
        _log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
             + (f" (fell behind: skipped {skipped} older checkpoint(s))" if skipped else ""))


# ------------------------------------------------------------------------------------------------
# Driver and rank-0 sides


def eval_every(cfg: ExperimentConfig, steps_per_epoch: int) -> Optional[int]:
    """The evaluation cadence in steps (None: off); ``eval_every_epochs`` is rounded to the nearest
    multiple of ``train.checkpoint_every``."""
    t = cfg.train
    if t.eval_every is not None:
        return t.eval_every
    if t.eval_every_epochs is None:
        return None
    return max(1, round(t.eval_every_epochs * steps_per_epoch / t.checkpoint_every)) * t.checkpoint_every


def _last_line(error: BaseException) -> str:
    """What went wrong inside the actor, in one line: the last line of the original exception that Ray
    wrapped (its ``cause``), else the exception's type."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip()
    return text.splitlines()[-1][:500] if text else type(cause).__name__


def actor_name(run_id: str) -> str:
    """The evaluator's Ray actor name: rank 0 finds it by this name (``hand_over``)."""
    return f"elf-evaluator-{run_id}"


def check_fits(cfg: ExperimentConfig, use_gpu: bool) -> None:
    """The evaluator must fit beside the training workers (refused before any step otherwise)."""
    totals = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", False)]
    r = cfg.ray
    need_cpu = r.num_workers * r.cpus_per_worker + r.eval_cpus
    need_gpu = (r.num_workers if use_gpu else 0) + r.eval_gpus
    if workers_that_fit(nodes, r.eval_cpus, r.eval_gpus) < 1 or totals.get("CPU", 0) < need_cpu \
            or totals.get("GPU", 0) < need_gpu:
        raise ClusterTooSmall(
            f"the evaluator beside training asks for ray.eval_cpus={r.eval_cpus:g}, ray.eval_gpus={r.eval_gpus:g} on "
            f"top of the training workers ({need_cpu:g} CPUs, {need_gpu:g} GPUs in all) but the Ray cluster has "
            f"{totals.get('CPU', 0):g} CPUs, {totals.get('GPU', 0):g} GPUs; lower them, add nodes, or evaluate after "
            "training instead (train.eval_every=null train.eval_every_epochs=null)")


def start(cfg: ExperimentConfig, run_id: str, tracking_uri: str, use_gpu: bool, faults: Optional[dict] = None) -> Any:
    """Create the evaluator actor and wait until it has loaded its models (``check_fits`` first)."""
    actor = ray.remote(TrainingEvaluator).options(
        name=actor_name(run_id), namespace=NAMESPACE, num_cpus=cfg.ray.eval_cpus, num_gpus=cfg.ray.eval_gpus,
        max_concurrency=4, max_restarts=3, max_task_retries=-1).remote(to_yaml(cfg), tracking_uri, run_id, faults)
    try:
        info = ray.get(actor.ready.remote())
    except ray.exceptions.RayError as e:
        ray.kill(actor)
        raise ElfError(f"eval.evaluator='{cfg.eval.evaluator}': the evaluator beside training could not be loaded: "
                       f"{_last_line(e)}") from None
    _log(f"evaluator ready ({info['evaluator']}); already evaluated: {info['evaluated'] or 'none'}")
    return actor


def catch_up(actor: Any, root: str, every: int) -> None:
    """A resubmission: hand over the newest due checkpoint not yet scored (older ones count as skipped)."""
    due = [c for c in checkpoints.list_checkpoints(root, on_incomplete=lambda *_: None) if c.step % every == 0]
    for ckpt in due[-1:]:
        actor.submit.remote(ckpt.location, ckpt.step)


def hand_over(name: str, root: str, step: int, due: bool) -> tuple[str, ...]:
    """Rank 0 after checkpoint ``step`` was reported: hand it over when ``due`` (fire and forget) and
    return what rotation must spare; if the evaluator cannot be asked right now (busy past 10 s, or gone
    for good after ``max_restarts``), everything is spared and training goes on."""
    stored = checkpoints.list_checkpoints(root, on_incomplete=lambda *_: None)
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
        found = [c for c in stored if c.step == step]
        if due and found:
            actor.submit.remote(found[-1].location, step)
        return tuple(ray.get(actor.protected.remote(), timeout=10))
    except (ValueError, ray.exceptions.RayError, ray.exceptions.GetTimeoutError):  # ValueError: no such actor
        return tuple(c.location for c in stored)


def finish(actor: Any, root: str) -> dict[str, Any]:
    """Evaluate the run's final checkpoint and wait for it (the run is FINISHED only afterwards). An
    evaluator that died for good does not fail the trained run: ``{"error": ...}`` says what happened."""
    newest = checkpoints.newest_checkpoint(root)
    try:
        return ray.get(actor.finish.remote(newest.location, newest.step)) if newest else {}
    except ray.exceptions.RayError as e:
        message = _last_line(e)
        _log(f"the evaluator beside training failed; the trained run is kept: {message}")
        return {"error": message}


def stop(actor: Any) -> None:
    """Kill the evaluator actor (None: nothing to stop)."""
    if actor is not None:
        ray.kill(actor)


__all__ = ["TrainingEvaluator", "actor_name", "eval_every", "start", "catch_up", "hand_over", "finish", "stop", "check_fits"]
