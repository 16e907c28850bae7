"""Train ELF on Ray Train, tracked in MLflow — the ELF Lab training entry point (``elf-train``).

    python pipelines/train.py                                   # the embedded default (offline, local)
    python pipelines/train.py --config experiments/owt_elf_b.yaml train.max_steps=1000
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- python pipelines/train.py ...

The work is :func:`pipelines.training.driver.run`; this file parses the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from pipelines import cli
from pipelines.infra.paths import DEFAULT_CONFIG, PROJECT_ROOT, absolutise

EPILOG = """examples:
  python pipelines/train.py                                  the embedded default: tiny ELF, bundled corpus,
                                                             offline MiniLM encoder, 1 worker x 2 CPUs
  python pipelines/train.py train.max_steps=50 ray.num_workers=1
  python pipelines/train.py --config experiments/owt_elf_b.yaml
  ray job submit --working-dir . -- python pipelines/train.py --config experiments/owt_elf_b.yaml
  python pipelines/train.py train.eval_every=100              score every 100th checkpoint beside training
                                                             (Gen PPL / BLEU in MLflow as eval/*, @best)

overrides are OmegaConf dot-lists (section.key=value); sections: model encoder data flow optim train
sample eval ray tracking.

the same name is the same run:
  not finished      resubmitting resumes it (same MLflow run, data order and loss curve continue)
  finished          resubmitting prints where it finished and exits 0; raise train.max_steps or
                    train.epochs to continue the same MLflow run
  --fresh           retires the earlier attempts for good and opens a new MLflow run
  changed config    anything but run length, log/checkpoint/eval cadence, eval.*, Ray resources and
                    paths is refused
"""


def parse_args(argv: Sequence[str]):
    p = cli.parser("pipelines/train.py", "Train an ELF model on Ray Train, tracked in MLflow.", EPILOG)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help=f"experiment YAML (default: {DEFAULT_CONFIG.relative_to(PROJECT_ROOT)})")
    cli.add_flags(p, "overrides", "ray_address", "tracking_uri",
                  overrides={"help": "config overrides, e.g. model.depth=4 optim.blr=2e-3"})
    p.add_argument("--fresh", action="store_true",
                   help="start this run name over: retire its earlier attempts for good, open a new MLflow run")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--inject-failure", default=None, help=argparse.SUPPRESS)  # tests: exception@K | exit@K
    return p.parse_args(argv)


def load(args):
    """The resolved config: YAML, then the overrides, then the shorthand flags; paths absolutised."""
    from elf_core.config import load_config

    overrides = list(args.overrides)
    overrides += [f"ray.address={args.ray_address}"] if args.ray_address else []
    overrides += [f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else []
    cfg = load_config(args.config, overrides)
    absolutise(cfg)
    return cfg


def _main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    cfg = load(args)
    if args.print_config:
        from elf_core.config import to_yaml

        print(to_yaml(cfg))
        return 0
    from pipelines.training.driver import run

    run(cfg, fresh=args.fresh, inject_failure=args.inject_failure)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``elf-train`` (also ``python pipelines/train.py`` / ``python -m pipelines.train``)."""
    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
