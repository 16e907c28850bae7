"""Scaling ablation: train ELF at every rung of a size ladder, sweep each frontier, compare them in
one MLflow run (``elf-ablate``).

    python experiments/scaling_ablation.py                                   # the local ladder (CPU)
    python experiments/scaling_ablation.py --ladder experiments/ladders/owt_paper.yaml --evaluator gpt2-large
    python experiments/scaling_ablation.py 'train=[ray.num_workers=1]' rungs.0.max_steps=100

A ladder (``experiments/ladders/*.yaml``) names the base experiment, its rungs (model size and run
length) and the sweep space; the run is :func:`pipelines.sweeps.ablation.run_ablation`. Re-running
the same command skips finished rungs. Exit status 3: some rung did not finish (re-run to resume).
"""

from __future__ import annotations

import sys
from typing import Sequence

from pipelines import cli
from pipelines.infra.paths import EXPERIMENTS_DIR

DEFAULT_LADDER = EXPERIMENTS_DIR / "ladders" / "local.yaml"
EPILOG = """settings (key=value overrides of the ladder YAML):
  train=[ray.num_workers=1,...]   overrides for every rung's training run
  sweep=[search.kind=grid,...]    overrides of the sweep settings of every rung
  rungs.<i>.max_steps=N           one rung's run length
  experiment=elf/scaling  out=outputs/scaling  name=...
"""


def _main(argv: Sequence[str]) -> int:
    p = cli.parser("experiments/scaling_ablation.py", __doc__.split("\n\n")[0], EPILOG)
    p.add_argument("--ladder", default=str(DEFAULT_LADDER), help="ladder YAML (default: experiments/ladders/local.yaml)")
    cli.add_flags(p, "overrides", "num_samples", "evaluator", "ray_address", "tracking_uri",
                  overrides={"help": "ladder settings, e.g. rungs.0.max_steps=100"},
                  **cli.from_the_yaml("sweep scoring", "evaluator"))
    p.add_argument("--name", default=None, help="ablation name (default: scaling-<ladder>-<data source>); re-use to resume")
    args = p.parse_args(argv)
    from pipelines.sweeps.ablation import load_ablation_config, run_ablation
    from pipelines.tracking.store import resolve_tracking_uri
    from pipelines.tracking.ui import ui_command

    cfg = load_ablation_config(args.ladder, list(args.overrides))
    # Flags given on the command line win over the ladder's own sweep list (appended after it).
    cfg.sweep += ([f"scoring.evaluator={args.evaluator}"] if args.evaluator is not None else []) \
        + ([f"fixed.num_samples={args.num_samples}"] if args.num_samples else [])
    ledger = run_ablation(cfg, name=args.name, tracking_uri=args.tracking_uri, ray_address=args.ray_address)
    uri = resolve_tracking_uri(args.tracking_uri)
    print(f"[scaling] see it in MLflow:\n{ui_command(uri, ledger['experiment_id'], ledger['parent_run_id'])}")
    return 0 if all((c.get("sweep") or {}).get("finished") for c in ledger["cells"].values()) else 3


def main(argv: Sequence[str] | None = None) -> int:
    """``elf-ablate`` (also ``python experiments/scaling_ablation.py``)."""
    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
