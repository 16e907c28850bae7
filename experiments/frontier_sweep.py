"""Trace a checkpoint's quality/diversity frontier with Ray Tune, tracked in MLflow (``elf-sweep``).

    python experiments/frontier_sweep.py --checkpoint models:/elf-local-default/latest \\
        --space experiments/sweeps/cpu_tiny.yaml --evaluator smollm2
    python experiments/frontier_sweep.py --checkpoint models:/elf-owt-b@best              # paper space, grid
    python experiments/frontier_sweep.py --checkpoint X search.kind=optuna search.trials=40
    python experiments/frontier_sweep.py --checkpoint X --resume          # continue an interrupted sweep

The sweep is :func:`pipelines.sweeps.run.run_sweep`; its settings are the space YAML plus dot-list
overrides (:class:`pipelines.sweeps.settings.SweepConfig`: ``search.*``, ``scoring.*``, ``fixed.*``,
``constraint.threshold``, ...). Exit status 3: stopped before every trial ended (``--resume`` it).
"""

from __future__ import annotations

import sys
from typing import Sequence

from pipelines import cli
from pipelines.infra.paths import EXPERIMENTS_DIR

DEFAULT_SPACES = {"unconditional": EXPERIMENTS_DIR / "sweeps" / "uncond_paper.yaml",
                  "conditional": EXPERIMENTS_DIR / "sweeps" / "cond_paper.yaml"}
EPILOG = """settings (key=value overrides of the space YAML):
  search.kind=grid|random|optuna  search.trials=N  search.max_concurrent=N  search.cpus_per_trial=1
  search.max_trials=N (stop after N, resumable)  search.retry_failed=true  search.seed=0
  scoring.references=...  scoring.device=cpu|cuda  scoring.log_samples=8
  fixed.batch_size=16  constraint.threshold=auto|none|3.0  experiment=elf/frontier  out=outputs/sweeps

A sweep of a training run's checkpoint is a child of that training run in MLflow; its parent run
holds frontier/results.csv, pareto.csv, frontier.png and best.json.
"""


def _main(argv: Sequence[str]) -> int:
    p = cli.parser("experiments/frontier_sweep.py", __doc__.split("\n\n")[0], EPILOG)
    cli.add_flags(p, "checkpoint", "overrides", "num_samples", "task", "weights", "evaluator", "evaluator_dtype",
                  "ray_address", "tracking_uri", checkpoint={"required": True},
                  overrides={"help": "sweep settings, e.g. search.kind=optuna search.trials=40"},
                  **cli.from_the_yaml("scoring", "evaluator", "evaluator_dtype", "weights"))
    p.add_argument("--space", default=None, help="search-space YAML (default: experiments/sweeps/uncond_paper.yaml "
                   "or cond_paper.yaml by the checkpoint's task)")
    p.add_argument("--name", default=None, help="sweep name (default: <checkpoint>--<space>[-<search>])")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this --name")
    args = p.parse_args(argv)
    from pipelines import checkpoints
    from pipelines.sweeps.run import run_sweep
    from pipelines.sweeps.settings import load_sweep_config
    from pipelines.tracking.store import resolve_tracking_uri
    from pipelines.tracking.ui import ui_command

    space = args.space
    if space is None:
        ck = checkpoints.read_config(args.checkpoint, args.tracking_uri)
        space = DEFAULT_SPACES["conditional" if ck is not None and ck.data.task == "conditional" else "unconditional"]
    flags = {"scoring.evaluator": args.evaluator, "scoring.evaluator_dtype": args.evaluator_dtype,
             "scoring.weights": args.weights, "scoring.task": args.task, "fixed.num_samples": args.num_samples}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    cfg = load_sweep_config(space, overrides)
    out = run_sweep(args.checkpoint, cfg, name=args.name, resume="yes" if args.resume else "no",
                    tracking_uri=args.tracking_uri, ray_address=args.ray_address)
    print(f"[sweep] see it in MLflow:\n{ui_command(resolve_tracking_uri(args.tracking_uri), out.experiment_id, out.parent_run_id)}")
    return 0 if out.status == "FINISHED" else 3


def main(argv: Sequence[str] | None = None) -> int:
    """``elf-sweep`` (also ``python experiments/frontier_sweep.py``)."""
    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
