"""The training driver: one submission of one run, top to bottom.

1. check the MLflow store is reachable and the run's storage writable (before anything slow);
2. tokenise and cache the data once (workers reuse the cache) and plan the run length;
3. decide what the run name means now (:mod:`pipelines.training.run_model`): new, resume, finished
   (print one line, exit 0: no MLflow run opened, no Ray attempt started) or refused;
4. connect to / start Ray and check the workers and their storage fit the cluster;
5. open (or reattach) the MLflow run and run :func:`pipelines.training.worker.train_loop` on a
   ``TorchTrainer`` — one attempt, with checkpoints and worker-failure retries;
6. register the final checkpoint as a model version (alias ``@last``), log the samples, print the
   summary and the command that opens the MLflow UI on the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mlflow import MlflowClient

from elf_core.config import ExperimentConfig, to_flat_dict, to_yaml
from elf_core.data import training_rows
from elf_core.encoder import load_tokenizer
from elf_core.errors import ElfError
from elf_core.schedule import total_steps
from pipelines import checkpoints
from pipelines.infra import filesystems as fsx
from pipelines.infra.host_memory import cpu_worker_env
from pipelines.infra.ray_env import check_cluster_fits, init_ray
from pipelines.infra.storage import check_storage_for_cluster, nodes_for_run
from pipelines.tracking import names, registry, runs
from pipelines.tracking.store import check_tracking_reachable, make_client, resolve_tracking_uri
from pipelines.tracking.ui import ui_command
from pipelines.training import evaluator
from pipelines.training.eval_record import sampling_points
from pipelines.training.run_model import RunPlan, finished_line, plan_run


@dataclass
class TrainOutcome:
    """What one submission did (the scaling ablation reads it)."""

    action: str  # "trained" | "finished"
    run_id: str
    experiment_id: str
    steps: int
    model_uri: Optional[str]  # models:/<name>/<version>
    wall_s: float
    params: Optional[int] = None  # the network's parameter count (meta.json)
    tokens: Optional[int] = None
    latent_dim: Optional[int] = None  # the encoder's width and vocabulary the network was built for
    vocab_size: Optional[int] = None
    train_seconds: Optional[float] = None  # rank 0's training loop (no start-up, no final evaluation)
    evaluation: Optional[dict] = None  # what the evaluator beside training did (train.eval_every)
    handoff_s: tuple[float, ...] = ()  # how long each checkpoint handoff to it took on rank 0


def planned_length(cfg: ExperimentConfig) -> tuple[int, int, int]:
    """``(training rows, steps per epoch, planned steps)``; tokenises and caches the data once."""
    tokenizer = load_tokenizer(cfg.encoder.tokenizer or cfg.encoder.name)
    rows, _ = training_rows(cfg, tokenizer, progress=True)
    steps_per_epoch = len(rows) // cfg.train.global_batch_size
    if steps_per_epoch == 0:
        raise ElfError(f"data: {len(rows)} training rows is less than one global batch "
                       f"(train.global_batch_size={cfg.train.global_batch_size})")
    return len(rows), steps_per_epoch, total_steps(cfg, steps_per_epoch)


def connect_ray(cfg: ExperimentConfig, tracking_uri: str, evaluates: bool) -> bool:
    """Connect to / start Ray; check the workers (and the evaluator beside them, when ``evaluates``) can
    ever fit and their storage is shared when they span nodes — all before any MLflow run exists.
    Returns whether workers get a GPU."""
    session = init_ray(cfg.ray.address)
    use_gpu = {"true": True, "false": False}.get(cfg.ray.use_gpu, session.resources.get("GPU", 0) > 0)
    gpus = 1.0 if use_gpu else 0.0
    check_cluster_fits(cfg.ray.num_workers, cfg.ray.cpus_per_worker, gpus,
                       hint="lower ray.num_workers / ray.cpus_per_worker or add nodes")
    if evaluates:
        evaluator.check_fits(cfg, use_gpu)
    report = check_storage_for_cluster(cfg.ray.storage_path, nodes_for_run(cfg.ray.num_workers,
                                       cfg.ray.cpus_per_worker, gpus), tracking_uri=tracking_uri)
    print(f"[elf] storage: {report.summary()}", flush=True)
    return use_gpu


def log_config(client: MlflowClient, run_id: str, cfg: ExperimentConfig, plan: RunPlan) -> None:
    """Every resolved config value as a param. MLflow params cannot change, so on a resubmission the
    run-length / cadence / resource keys that changed are recorded as ``elf.resubmitted.<key>`` tags."""
    flat = to_flat_dict(cfg)
    if plan.action == "resume":
        logged = client.get_run(run_id).data.params
        runs.set_tags(client, run_id, {f"elf.resubmitted.{k}": flat[k] for k in plan.changed if k in logged})
        flat = {k: v for k, v in flat.items() if k not in logged}
    runs.log_params(client, run_id, flat)
    client.log_text(run_id, to_yaml(cfg), "config/resolved.yaml")


def fit(cfg: ExperimentConfig, plan: RunPlan, run_id: str, tracking_uri: str, use_gpu: bool,
        inject_failure: Optional[str], evaluator: Optional[tuple[str, int]] = None) -> Any:
    """One attempt: the worker loop on a TorchTrainer with checkpointing and failure retries. Ray's
    retries inside an attempt resume from its checkpoints; a resubmission resumes from the newest
    complete checkpoint of any attempt, found by ELF Lab (``plan.checkpoint``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.training.worker import train_loop

    attempt = time.strftime("attempt-%Y%m%d-%H%M%S")
    loop_cfg = {"config_yaml": to_yaml(cfg), "run_id": run_id, "tracking_uri": tracking_uri,
                "resume_from": plan.checkpoint.location if plan.checkpoint else None, "inject_failure": inject_failure,
                "marker_dir": str(Path(cfg.train.output_dir) / cfg.name / "failure-markers"),
                "run_root": plan.root, "attempt": attempt, "keep_checkpoints": cfg.train.keep_checkpoints,
                "evaluator": evaluator[0] if evaluator else None, "eval_every": evaluator[1] if evaluator else None}
    resources = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=attempt, storage_path=plan.root,  # a URI keeps its ?query (endpoint_override=...) last
            # ELF Lab rotates every attempt itself (keep-K over the whole run, sparing checkpoints being
            # evaluated); Ray's own num_to_keep would delete them behind the evaluator's back.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            # CPU workers keep freed host memory: no page faults on every step (pipelines/infra/host_memory.py)
            worker_runtime_env={} if use_gpu else {"env_vars": cpu_worker_env()}))
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        bad_input = elf_error_in(e)
        if bad_input is None:
            raise
        raise ElfError(str(bad_input)) from None  # bad input on a worker: one line, exit 2, not a traceback


def elf_error_in(error: BaseException) -> Optional[ElfError]:
    """The ElfError a worker raised, if that is what failed the attempt. Ray wraps it: a
    ``WorkerGroupError`` maps ranks to ``RayTaskError``s whose ``cause`` (or ``__cause__``) is the
    original; the wrapper itself also subclasses ElfError, so only an unwrapped one is returned."""
    import ray.exceptions

    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ElfError) and not isinstance(e, ray.exceptions.RayError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, *getattr(e, "worker_failures", {}).values()]
    return None


def register(client: MlflowClient, run_id: str, cfg: ExperimentConfig, root: str) -> tuple[Optional[str], dict]:
    """Register the run's newest checkpoint as a version of its model (alias ``@last``); returns
    ``(models:/name/version, its meta.json)``."""
    name = registry.model_name_for(cfg)
    with checkpoints.resolve(root, files=registry.REGISTERED_FILES if fsx.is_uri(root) else None) as ckpt:
        files = [f for f in registry.REGISTERED_FILES if (ckpt.path / f).is_file()]  # ema.safetensors is optional
        version = registry.register_checkpoint(client, run_id, ckpt.path, name, alias="last", files=files,
                                               tags={"elf.step": ckpt.step})
        return f"models:/{name}/{version}", ckpt.meta


def log_samples(client: MlflowClient, run_id: str, summary: dict) -> None:
    """Samples as JSONL artifacts (the official ``{"id", "generated"}`` format) and as a UI table."""
    start, end = (summary.get("start") or {}).get("samples_start", []), (summary.get("end") or {}).get("samples", [])
    for name, texts in (("final", end), ("start", start)):
        if texts:
            runs.log_jsonl(client, run_id, [{"id": i, "generated": t} for i, t in enumerate(texts)],
                           f"samples/{name}.jsonl")
    if end:
        client.log_table(run_id, data={"id": list(range(len(end))), "at_end": end,
                                       "at_start": (start + [""] * len(end))[:len(end)]},
                         artifact_file="samples/table.json")


def print_summary(client: MlflowClient, outcome: TrainOutcome, summary: dict, uri: str) -> None:
    print("\n" + "=" * 80)
    print(f"[elf] done in {outcome.wall_s / 60:.1f} min: {outcome.steps} steps; MLflow run {outcome.run_id}")
    for key in ("loss", "clean_decode_acc"):
        history = sorted(client.get_metric_history(outcome.run_id, names.probe_key(key)), key=lambda m: (m.step, m.timestamp))
        if history:
            print(f"      held-out {key}: {history[0].value:.4f} at step {history[0].step} -> "
                  f"{history[-1].value:.4f} at step {history[-1].step}")
    if outcome.train_seconds is not None:
        print(f"      training loop: {outcome.train_seconds:.1f} s on rank 0")
    if outcome.evaluation and outcome.evaluation.get("error"):
        print(f"      evaluation beside training failed (tag elf.eval.error): {outcome.evaluation['error']}")
    elif outcome.evaluation is not None:
        e = outcome.evaluation
        print(f"      evaluated beside training at steps {e.get('evaluated')} (skipped {e.get('skipped')}, "
              f"errors {e.get('errors')}); handoffs took at most {max(outcome.handoff_s or (0.0,)) * 1000:.0f} ms")
    if outcome.model_uri:
        print(f"      model: {outcome.model_uri} (alias @last)")
    for title, key, n in (("at step 0", "start", 3), (f"at step {outcome.steps}", "end", 5)):
        part = summary.get(key) or {}
        texts = part.get("samples_start" if key == "start" else "samples", [])
        if texts:
            print(f"[elf] samples {title} ({part.get('samples_weights', 'raw')} weights):")
            for i, text in enumerate(texts[:n]):
                print(f"  [{i}] {text[:300]!r}")
    print(f"[elf] see it in MLflow:\n{ui_command(uri, outcome.experiment_id, outcome.run_id)}", flush=True)


def run(cfg: ExperimentConfig, *, fresh: bool = False, parent_run_id: Optional[str] = None,
        inject_failure: Optional[str] = None, eval_faults: Optional[dict] = None) -> TrainOutcome:
    """One submission of run ``cfg.name`` (module docstring). Raises ElfError for bad input."""
    t0 = time.time()
    uri = resolve_tracking_uri(cfg.tracking.uri)
    check_tracking_reachable(uri)
    client = make_client(uri)
    n_rows, steps_per_epoch, n_steps = planned_length(cfg)
    print(f"[elf] data: {n_rows:,} rows of {cfg.data.max_length} tokens, {steps_per_epoch} steps/epoch, "
          f"{n_steps} steps planned", flush=True)
    plan = plan_run(cfg, n_steps, client, fresh=fresh)
    if plan.retired:
        print(f"[elf] {plan.retired}", flush=True)
    if plan.action == "finished":
        return _already_finished(client, cfg, plan, n_steps, t0)
    every = evaluator.eval_every(cfg, steps_per_epoch)
    if every:
        sampling_points(cfg)  # a bad eval.sampling list is refused here, not in the actor mid-run
    use_gpu = connect_ray(cfg, uri, evaluates=bool(every))
    exp_id = runs.ensure_experiment(cfg.tracking.experiment, client)
    with runs.tracked_run(client, exp_id, cfg.name, kind="training", reattach=plan.mlflow_run_id,
                          parent_run_id=parent_run_id) as run:
        run_id = run.run_id
        print(f"[elf] MLflow run {run_id} in experiment '{cfg.tracking.experiment}' ({uri})"
              + (f"; resuming from step {plan.start_step} ({fsx.redact(plan.checkpoint.location)})"
                 if plan.checkpoint else "") + (f"; evaluating every {every} steps beside training" if every else ""),
              flush=True)
        log_config(client, run_id, cfg, plan)
        checkpoints.rotate_checkpoints(plan.root, cfg.train.keep_checkpoints)
        actor = evaluator.start(cfg, run_id, uri, use_gpu, eval_faults) if every else None
        try:
            if actor is not None:
                evaluator.catch_up(actor, plan.root, every)
            summary = fit(cfg, plan, run_id, uri, use_gpu, inject_failure,
                          (evaluator.actor_name(run_id), every) if actor is not None else None).return_value or {}
            model_uri, meta = register(client, run_id, cfg, plan.root)
            log_samples(client, run_id, summary)
            evaluated = evaluator.finish(actor, plan.root) if actor is not None else None
            if evaluated and evaluated.get("error"):
                runs.set_tags(client, run_id, {"elf.eval.error": evaluated["error"]})
        finally:
            evaluator.stop(actor)
    steps = int(meta["step"])
    outcome = TrainOutcome("trained", run_id, exp_id, steps, model_uri, time.time() - t0, meta.get("param_count"),
                           steps * cfg.train.global_batch_size * cfg.data.max_length, meta.get("latent_dim"),
                           meta.get("vocab_size"), summary.get("train_seconds"), evaluated,
                           tuple(summary.get("handoff_s", ())))
    print_summary(client, outcome, summary, uri)
    return outcome


def _already_finished(client: MlflowClient, cfg: ExperimentConfig, plan: RunPlan, n_steps: int,
                      t0: float) -> TrainOutcome:
    model = registry.last_of_run(client, registry.model_name_for(cfg), plan.mlflow_run_id)
    print(finished_line(cfg, plan, n_steps, model), flush=True)
    exp_id = client.get_run(plan.mlflow_run_id).info.experiment_id
    meta = plan.checkpoint.meta
    return TrainOutcome("finished", plan.mlflow_run_id, exp_id, plan.start_step, model, time.time() - t0,
                        meta.get("param_count"), plan.start_step * cfg.train.global_batch_size * cfg.data.max_length,
                        meta.get("latent_dim"), meta.get("vocab_size"))
