"""Evaluate ELF checkpoints the way the paper did, tracked in MLflow — or score a samples file (``elf-eval``).

    python pipelines/evaluate.py                      # the embedded default's newest checkpoint, offline
    python pipelines/evaluate.py --checkpoint models:/elf-local-default@last --sampling experiments/sampling/uncond_paper.yaml
    python pipelines/evaluate.py score --samples all_generated_3_57051.jsonl --evaluator gpt2-large

``evaluate`` (the default command): per sampling config, generate N samples, write them as JSONL
(``{"id", "generated"[, "input", "target"]}``), score them (Gen PPL + entropy, or BLEU + ROUGE) and
log them to MLflow — a child run of the training run when the checkpoint came from one, else in
experiment ``elf/eval``. ``score``: the metrics of an existing samples file, printed as a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from elf_core.errors import ElfError
from pipelines import cli

EPILOG = """examples:
  python pipelines/evaluate.py                                   embedded default's newest checkpoint, its sampling settings
  python pipelines/evaluate.py --sampling experiments/sampling/tiny_cpu.yaml
  python pipelines/evaluate.py --checkpoint models:/elf-local-default@last sample.steps=64 --num-samples 100
  python pipelines/evaluate.py --checkpoint runs:/<run id>/checkpoint --evaluator smollm2
  python pipelines/evaluate.py --checkpoint ckpt_dir --task translation --references ../shared/data/wmt14_de-en_validation_t5
  python pipelines/evaluate.py --workers 2 --num-samples 32      sample on 2 Ray workers (GPUs if the cluster has them)
  python pipelines/evaluate.py score --samples samples.jsonl [--evaluator gpt2-large]
  python pipelines/evaluate.py score --samples hyps.jsonl --references refs.jsonl --task translation
"""
REFS_HELP = "conditional tasks: pairs JSONL {input,target}, save_to_disk dir, hub dataset, or wmt14-de-en / xsum"


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="sample and score a checkpoint (the default command)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(p, "checkpoint", "overrides", "num_samples", "task", "weights", "evaluator", "evaluator_dtype",
                  "ray_address", "tracking_uri", "threads",
                  checkpoint={"help": cli.FLAGS["checkpoint"][1]["help"] + " (default: the embedded default's run)"},
                  overrides={"metavar": "sample.key=value", "help": "sampling overrides, e.g. sample.steps=64"})
    p.add_argument("--sampling", type=Path, default=None,
                   help="YAML list of sampling configs (experiments/sampling/*.yaml); default: the checkpoint's sample section")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: sample.seed)")
    p.add_argument("--references", default=None, help=REFS_HELP)
    p.add_argument("--output-dir", type=Path, default=None, help="samples and metrics (default: <root>/outputs/eval)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--table-rows", type=int, default=50, help="samples shown in the MLflow table (default 50)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--workers", type=int, default=1, help=(
        "shard sample generation over N Ray workers (default 1: in this process, no Ray); the samples are identical "
        "to --workers 1 (per-batch seeds); scoring stays in this process"))
    p.add_argument("--worker-cpus", type=cli.at_least(0, float, open_low=True), default=1.0,
                   help="CPUs per Ray worker (default 1)")
    p.add_argument("--worker-gpus", type=cli.at_least(0, float), default=None,
                   help="GPUs per Ray worker (default: 1 if the cluster has GPUs)")


def _score_parser(sub) -> None:
    p = sub.add_parser("score", help="score an existing samples JSONL ({\"id\", \"generated\"} or \"text\")")
    p.add_argument("--samples", type=Path, required=True)
    cli.add_flags(p, "task", "evaluator", "evaluator_dtype", "threads",
                  task={"help": "default: translation when references are given or the samples carry 'target'"})
    p.add_argument("--references", default=None, help="references: .txt (one per line), .jsonl (target), or a dataset")
    p.add_argument("--references-prefix", action="store_true",
                   help="pair the samples with the first len(samples) references (the official eval's rule)")
    p.add_argument("--split", default="validation", help="dataset split of --references (default validation)")
    p.add_argument("--batch-size", type=int, default=16, help="evaluator batch size (default 16)")
    p.add_argument("--max-length", type=int, default=1024, help="evaluator tokens per sample (default 1024)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def parse_args(argv: Sequence[str]):
    p = cli.parser("pipelines/evaluate.py", "Sample and score ELF checkpoints (paper metrics), tracked in MLflow.",
                   "commands: evaluate (default) | score; `pipelines/evaluate.py <command> --help` for each")
    sub = p.add_subparsers(dest="command", metavar="{evaluate,score}")
    _evaluate_parser(sub)
    _score_parser(sub)
    argv = list(argv)
    if not argv or argv[0] not in ("evaluate", "score", "-h", "--help"):
        argv = ["evaluate", *argv]
    return p.parse_args(argv)


def _main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    cli.set_threads(args.threads)
    from pipelines.evaluation import runner

    if args.command == "score":
        runner.print_scores(args, runner.score_samples_file(args))
        return 0
    if args.workers < 1:
        raise ElfError(f"--workers must be >= 1, got {args.workers}")
    from pipelines.tracking.store import check_tracking_reachable, make_client, resolve_tracking_uri
    from pipelines.tracking.ui import ui_command

    uri = resolve_tracking_uri(args.tracking_uri)
    if not args.no_mlflow:
        check_tracking_reachable(uri)
    client = None if args.no_mlflow else make_client(uri)
    done = runner.evaluate_checkpoint(args, client, uri)
    print("\n" + "=" * 80)
    for name, result, where, run_id in done:
        rows = [(k, runner.fmt(k, v)) for k, v in result.metrics.items()]
        rows += [("sample seconds", f"{result.sample_seconds:.1f}"), ("score seconds", f"{result.score_seconds:.1f}")]
        runner.print_table(rows, f"{name}  [{result.provenance.get('evaluator', result.provenance['task'])}, "
                                 f"step {result.provenance['checkpoint_step']}]")
        print(f"  -> {where}" + (f"\n     MLflow run {run_id}" if run_id else ""))
        for s in result.samples[:3]:
            print(f"     [{s['id']}] {s['generated'][:200]!r}")
    if done and done[-1][3]:
        exp_id = client.get_run(done[-1][3]).info.experiment_id
        print(f"[eval] see it in MLflow:\n{ui_command(uri, exp_id, done[-1][3])}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``elf-eval`` (also ``python pipelines/evaluate.py`` / ``python -m pipelines.evaluate``)."""
    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
