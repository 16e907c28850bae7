"""The two evaluation commands behind ``pipelines/evaluate.py``: evaluate a checkpoint (sample, score,
write, log each sampling config) and score an existing samples file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from elf_core.config import load_config
from pipelines import checkpoints
from pipelines.evaluation.choices import WEIGHTS
from pipelines.evaluation import records
from pipelines.evaluation.inputs import EvalError, apply_overrides, load_sampling_configs, run_name
from pipelines.infra.filesystems import basename
from pipelines.infra.paths import DEFAULT_CONFIG, under_root


def default_checkpoint() -> str:
    """The embedded default's run storage directory (its newest checkpoint), when it has one."""
    cfg = load_config(DEFAULT_CONFIG)
    root = under_root(cfg.ray.storage_path) / cfg.name
    if checkpoints.newest_checkpoint(root) is None:
        raise EvalError(f"no checkpoint of the embedded default yet under {root}: train it first "
                        "(python pipelines/train.py) or pass --checkpoint")
    return str(root)


def print_table(rows: list[tuple[str, str]], title: str = "") -> None:
    width = max(len(k) for k, _ in rows)
    if title:
        print(title)
    print(f"  {'metric'.ljust(width)}  value\n  {'-' * width}  {'-' * 12}")
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")


def fmt(key: str, v: float) -> str:
    return f"{v:.0f}" if key.startswith("num_") else f"{v:.4f}"


def _start_pool(args: Any, session: Any, spec: str, uri: str):
    from pipelines.evaluation.shards import ShardPool

    ck = session.ckpt
    return ShardPool(ck.pinned, workers=args.workers, task=session.task, references=args.references,
                     use_ema=ck.weights == "ema", tracking_uri=uri,
                     expect={"step": ck.step, "weights": ck.weights, "task": session.task},
                     cpus_per_worker=args.worker_cpus, gpus_per_worker=args.worker_gpus, address=args.ray_address,
                     wait=False)


def evaluate_checkpoint(args: Any, client: Any, uri: str) -> list[tuple[str, Any, str, Optional[str]]]:
    """Every sampling config of ``args``: ``[(run name, EvalResult, where written, MLflow run id)]``."""
    from pipelines.evaluation.session import EvalSession

    spec = args.checkpoint or default_checkpoint()
    print(f"[eval] checkpoint: {spec}", file=sys.stderr, flush=True)
    # The evaluator is loaded after the checkpoint: with --workers > 1 while the Ray workers load it.
    session = EvalSession(spec, evaluator=None, task=args.task, references=args.references, device=args.device,
                          use_ema=WEIGHTS[args.weights], tracking_uri=uri)
    base = session.config.sample
    configs = [apply_overrides(c, args.overrides)
               for c in (load_sampling_configs(args.sampling, base) if args.sampling else [base])]
    pool = _start_pool(args, session, spec, uri) if args.workers > 1 else None
    try:
        session.load_evaluator(args.evaluator, args.evaluator_dtype)
        ck = session.ckpt
        print(f"[eval] step {ck.step}, {ck.weights} weights, task {session.task}"
              + (f", evaluator {session.evaluator.name} ({session.evaluator.dtype})" if session.evaluator else "")
              + (f", training run {ck.training_run_id}" if ck.training_run_id else ""), file=sys.stderr, flush=True)
        if pool is not None:
            pool.wait_loaded()  # here, so that sample_seconds counts sampling only
        label = basename(spec.rstrip("/")).replace(":", "_").replace("@", "_") or "checkpoint"
        return [_one_config(args, session, sc, i, len(configs), label, client, pool) for i, sc in enumerate(configs, 1)]
    finally:
        if pool is not None:
            pool.close()


def _one_config(args: Any, session: Any, sc: Any, i: int, n: int, label: str, client: Any, pool: Any):
    name = run_name(sc, session.task != "unconditional")
    print(f"[eval] config {i}/{n}: {name}", file=sys.stderr, flush=True)
    out_dir = under_root(args.output_dir or "outputs/eval") / f"{label}-step{session.ckpt.step}" / name
    if client is None:
        result = _evaluate(session, sc, args, pool, out_dir)
        return name, result, str(records.write_result(out_dir, result)), None
    with records.evaluation_run(client, session, name, sc, args.num_samples, args.seed) as run_id:
        result = _evaluate(session, sc, args, pool, out_dir)
        samples = records.write_result(out_dir, result)
        records.log_evaluation(client, run_id, session, result, samples, args.table_rows)
    return name, result, str(samples), run_id


def _evaluate(session: Any, sc: Any, args: Any, pool: Any, out_dir: Path):
    from pipelines.evaluation.session import EmptySamplesError

    try:
        return session.evaluate(sc, num_samples=args.num_samples, seed=args.seed, sampler=pool)
    except EmptySamplesError as e:
        path = records.write_jsonl(out_dir / "samples.jsonl", e.samples)
        raise EvalError(f"{e} (samples written to {path})") from None


def score_samples_file(args: Any) -> dict[str, Any]:
    """The metrics of an existing samples JSONL (the official ``{"id", "generated"}`` format too)."""
    from elf_core.evaluator import load_evaluator
    from elf_core.metrics import conditional_metrics, drop_empty
    from pipelines.evaluation.inputs import read_reference_texts, read_samples

    samples = read_samples(args.samples)
    texts = [s["generated"] for s in samples]
    task = args.task or ("translation" if args.references or all("target" in s for s in samples) else "unconditional")
    if task == "unconditional":
        if not drop_empty(texts)[0]:
            raise EvalError(f"{args.samples}: all {len(texts)} samples are empty or whitespace-only; nothing to score")
        ev = load_evaluator(args.evaluator, dtype=args.evaluator_dtype, device=args.device,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
        metrics = ev.perplexity(texts, max_length=args.max_length, batch_size=args.batch_size).as_metrics()
        return {"task": task, "samples": len(samples), "evaluator": f"{ev.name} ({ev.dtype})",
                "empty dropped": drop_empty(texts)[1], **metrics}
    if args.references:
        refs = read_reference_texts(args.references, args.split)
        refs = refs[: len(texts)] if args.references_prefix and len(refs) >= len(texts) else refs
        if len(refs) != len(texts):
            raise EvalError(f"{args.references} has {len(refs)} references but {args.samples} has {len(texts)} samples; "
                            "they must pair up 1:1 (--references-prefix uses the first N references, as the official "
                            "eval scores the first num_samples rows)")
    else:
        missing = next((s for s in samples if "target" not in s), None)
        if missing is not None:
            raise EvalError(f"{args.samples}: sample id {missing['id']} has no 'target'; pass --references")
        refs = [s["target"] for s in samples]
    return {"task": task, "samples": len(samples), **conditional_metrics(texts, refs)}


def print_scores(args: Any, scores: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps({**scores, "samples": str(args.samples)}))
        return
    rows = [(k, fmt(k, v) if isinstance(v, float) else str(v)) for k, v in scores.items() if k != "task"]
    print_table(rows, f"{args.samples} ({scores['task']})")


__all__ = ["default_checkpoint", "evaluate_checkpoint", "score_samples_file", "print_scores", "print_table", "fmt"]
