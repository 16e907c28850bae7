"""Train ELF on Ray Train, tracked in MLflow — the ELF Lab training entry point.

    python pipelines/train.py                                   # the embedded default (offline, local)
    python pipelines/train.py --config experiments/owt_elf_b.yaml train.max_steps=1000
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- python pipelines/train.py ...

Top to bottom: load and check the config; check the MLflow server is reachable; tokenise and cache
the data (fail fast on bad data); connect to / start Ray and check the workers fit; open (or resume)
the MLflow run named after the experiment; run :func:`pipelines.train_worker.train_loop` on a
``TorchTrainer`` with checkpoints and failure retries; register the final checkpoint as a model
version; print the run, samples and the command that opens the MLflow UI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # `python pipelines/train.py` from a checkout
    sys.path.insert(0, str(PROJECT_ROOT))

from pipelines.paths import runs_root  # noqa: E402  (re-exported: experiments/ import it from here)

DEFAULT_CONFIG = PROJECT_ROOT / "experiments" / "local_default.yaml"
EPILOG = """examples:
  python pipelines/train.py                                  embedded default: tiny ELF, bundled corpus,
                                                             offline MiniLM encoder, 2 CPU workers (~10 min)
  python pipelines/train.py train.max_steps=50 ray.num_workers=1
  python pipelines/train.py --config experiments/owt_elf_b.yaml
  ray job submit --working-dir . -- python pipelines/train.py --config experiments/owt_elf_b.yaml

overrides are OmegaConf dot-lists (section.key=value); sections: model encoder data flow optim train
sample ray tracking. A run with the same `name` resumes from its latest checkpoint.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pipelines/train.py", description="Train an ELF model on Ray Train, tracked in MLflow.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help=f"experiment YAML (default: {DEFAULT_CONFIG.relative_to(PROJECT_ROOT)})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.depth=4 optim.blr=2e-3")
    p.add_argument("--fresh", action="store_true",
                   help="ignore checkpoints of an earlier run with the same name and start from step 0")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--inject-failure", default=None, help=argparse.SUPPRESS)  # tests: exception@K | exit@K
    return p.parse_args(argv)


def absolutise(cfg) -> None:
    """Make relative paths absolute under :func:`runs_root` (Ray workers run in other directories)."""
    root = runs_root()
    for section, key in (("data", "cache_dir"), ("train", "output_dir"), ("ray", "storage_path")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and "://" not in value and not Path(value).expanduser().is_absolute():
            setattr(obj, key, str(root / value))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from elf_core.config import ConfigError, load_config, to_yaml

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    absolutise(cfg)
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    from pipelines.tracking import TrackingError

    try:
        return run(cfg, fresh=args.fresh, inject_failure=args.inject_failure)
    except (UserFacingError, TrackingError) as e:  # the message is the whole story
        print(f"error: {e}", file=sys.stderr)
        return 1


class UserFacingError(RuntimeError):
    """An error whose message is the whole story (no traceback needed)."""


def run(cfg, *, fresh: bool = False, inject_failure: str | None = None) -> int:
    from elf_core.config import to_flat_dict, to_yaml
    from elf_core.data_sources import DataError
    from elf_core.encoder import EncoderError, load_tokenizer
    from pipelines import tracking
    from pipelines.ray_env import ClusterTooSmall, check_cluster_fits, init_ray
    from pipelines.storage import StorageNotShared, check_storage_for_cluster, nodes_for_run
    from pipelines.train_worker import total_steps, training_rows

    t_start = time.time()
    # 1. MLflow reachable? (before anything slow)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri, runs_root())
    try:
        tracking.check_tracking_reachable(uri)
    except tracking.TrackingUnavailable as e:
        raise UserFacingError(str(e)) from None

    # 2. Data: tokenise + cache once here, with a progress bar; workers reuse the cache.
    try:
        tokenizer = load_tokenizer(cfg.encoder.tokenizer or cfg.encoder.name)
        rows, _ = training_rows(cfg, tokenizer, progress=True)
    except (DataError, EncoderError, ValueError) as e:
        raise UserFacingError(str(e)) from None
    steps_per_epoch = len(rows) // cfg.train.global_batch_size
    if steps_per_epoch == 0:
        raise UserFacingError(f"data: {len(rows)} training rows is less than one global batch "
                              f"(train.global_batch_size={cfg.train.global_batch_size})")
    n_steps = total_steps(cfg, steps_per_epoch)
    print(f"[elf] data: {len(rows):,} rows of {cfg.data.max_length} tokens, {steps_per_epoch} steps/epoch, "
          f"{n_steps} steps planned", flush=True)

    # 3. Ray: connect or start locally; fail fast when the workers can never fit.
    session = init_ray(cfg.ray.address)
    use_gpu = {"true": True, "false": False}.get(cfg.ray.use_gpu, session.resources.get("GPU", 0) > 0)
    try:
        check_cluster_fits(cfg.ray.num_workers, cfg.ray.cpus_per_worker, 1.0 if use_gpu else 0.0,
                           hint="lower ray.num_workers / ray.cpus_per_worker or add nodes")
    except ClusterTooSmall as e:
        raise UserFacingError(str(e)) from None
    try:  # multi-node runs need storage and an MLflow store every node can reach
        storage_report = check_storage_for_cluster(
            cfg.ray.storage_path,
            nodes_for_run(cfg.ray.num_workers, cfg.ray.cpus_per_worker, 1.0 if use_gpu else 0.0),
            tracking_uri=uri)
    except StorageNotShared as e:
        raise UserFacingError(str(e)) from None
    print(f"[elf] storage: {storage_report.summary()}", flush=True)

    # 4. Resume? The newest complete checkpoint of an earlier attempt of this run (unless --fresh);
    #    the MLflow run is continued only together with a checkpoint, else a new run is opened.
    #    Object storage (s3://, gs://, any pyarrow URI) is listed through pyarrow.fs; the worker
    #    downloads the checkpoint it names (pipelines/remote_checkpoints.py).
    from elf_core.checkpoint import CheckpointError
    from pipelines.remote_checkpoints import RemoteStorageError, is_uri, redact, run_checkpoints_at

    resume_from = None
    if not fresh:
        try:
            found = (run_checkpoints_at(cfg.ray.storage_path, cfg.name) if is_uri(cfg.ray.storage_path)
                     else run_checkpoints(Path(cfg.ray.storage_path), cfg.name))
        except (RemoteStorageError, CheckpointError) as e:  # unreachable storage, a damaged meta.json
            raise UserFacingError(f"ray.storage_path: {e}") from None
        resume_from = str(found[-1][1]) if found else None
    client = tracking.make_client(uri)
    exp_id = tracking.ensure_experiment(cfg.tracking.experiment, client)
    run_id = tracking.start_or_resume_run(exp_id, cfg.name, client, tracking.provenance_tags(),
                                          resume=resume_from is not None)
    registered = cfg.tracking.registered_model or f"elf-{tracking.registered_model_name(cfg.name)}"
    print(f"[elf] MLflow run {run_id} in experiment '{cfg.tracking.experiment}' ({uri})", flush=True)
    if resume_from:
        print(f"[elf] resuming from {redact(resume_from)}", flush=True)

    with tracking.run_guard(run_id, client):
        tracking.log_params_flat(run_id, to_flat_dict(cfg), client)
        client.log_text(run_id, to_yaml(cfg), "config/resolved.yaml")
        result = fit(cfg, run_id=run_id, uri=uri, use_gpu=use_gpu, resume_from=resume_from,
                     inject_failure=inject_failure, fresh=fresh)
        summary = result.return_value or {}
        version = None
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:
                version = tracking.log_checkpoint_model(
                    run_id, Path(d), registered, client, alias="last",
                    files=["model.safetensors", "ema.safetensors", "config.yaml", "meta.json"])
        samples, samples_start = summary.get("samples", []), summary.get("samples_start", [])
        log_samples(client, run_id, samples, samples_start)

    end = summary.get("probe_end", {})
    print("\n" + "=" * 80)
    print(f"[elf] done in {(time.time() - t_start) / 60:.1f} min: {summary.get('steps')} steps; "
          f"MLflow run {run_id} (experiment '{cfg.tracking.experiment}')")
    logged = client.get_run(run_id).data.metrics  # probe_start/* was logged at step 0 of this run
    for key in ("loss", "clean_decode_acc"):
        before, after = logged.get(f"probe_start/{key}"), end.get(f"probe_end/{key}")
        if after is not None:
            print(f"      held-out {key}: {before if before is not None else float('nan'):.4f} at step 0 "
                  f"-> {after:.4f} at step {summary.get('steps')}")
    if version is not None:
        print(f"      model: models:/{registered}/{version} (alias @last)")
    if samples_start:
        print("[elf] samples at step 0:")
        for i, text in enumerate(samples_start[:3]):
            print(f"  [{i}] {text[:200]!r}")
    print(f"[elf] samples at step {summary.get('steps')} ({summary.get('samples_weights', 'raw')} weights):")
    for i, text in enumerate(samples[:5]):
        print(f"  [{i}] {text[:300]!r}")
    print(f"[elf] see it in MLflow:\n{tracking.ui_command(uri, exp_id, run_id)}")
    return 0


def run_checkpoints(storage: Path, name: str) -> list[tuple[int, Path]]:
    """Complete checkpoints of run ``name`` over all its attempts, ascending by step."""
    from elf_core.checkpoint_dirs import list_checkpoints

    return list_checkpoints(Path(storage) / name)


def log_samples(client, run_id: str, samples: list[str], samples_start: list[str]) -> None:
    """Samples as JSONL artifacts (the official ``{"id", "generated"}`` format) and as a table in the UI."""
    for name, texts in (("final", samples), ("start", samples_start)):
        if texts:
            client.log_text(run_id, "".join(json.dumps({"id": i, "generated": t}) + "\n" for i, t in enumerate(texts)),
                            f"samples/{name}.jsonl")
    if samples:
        rows = {"id": list(range(len(samples))), "at_end": samples,
                "at_start": (samples_start + [""] * len(samples))[:len(samples)]}
        client.log_table(run_id, data=rows, artifact_file="samples/table.json")


def fit(cfg, *, run_id: str, uri: str, use_gpu: bool, resume_from: str | None, inject_failure: str | None,
        fresh: bool = False):
    """Run the worker loop on a TorchTrainer with checkpointing and failure retries."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from elf_core.config import to_yaml
    from pipelines.train_worker import train_loop

    # Each submission is its own Ray Train run ("attempt") under <storage>/<name>/: Ray's retries
    # inside an attempt resume from its checkpoints; a new submission resumes from the newest
    # complete checkpoint of any attempt (``resume_from``), found by ELF Lab rather than by Ray,
    # whose restore-by-name can point at checkpoints an interrupted run already rotated away.
    from pipelines.remote_checkpoints import child_uri

    storage = child_uri(cfg.ray.storage_path, cfg.name)  # keeps a URI's ?query (endpoint_override=...) last
    loop_cfg = {"config_yaml": to_yaml(cfg), "run_id": run_id, "tracking_uri": uri,
                "resume_from": resume_from, "inject_failure": inject_failure,
                "marker_dir": str(Path(cfg.train.output_dir) / cfg.name / "failure-markers")}
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=time.strftime("attempt-%Y%m%d-%H%M%S"),
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
        ),
    )
    return trainer.fit()


if __name__ == "__main__":
    sys.exit(main())
