"""Tokenise / pack an experiment's data once and cache it, so training (every worker) reuses it.

    python pipelines/prepare_data.py --config experiments/owt_elf_b.yaml [key=value ...]

The cache lives in ``data.cache_dir`` (keyed by source, tokenizer, lengths, fields), exactly where
``pipelines/train.py`` looks; running this first moves the tokenising out of the training job and
shows a progress bar. Prints the rows, the cache files and the steps per epoch the data gives.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from pipelines import cli
from pipelines.infra.paths import DEFAULT_CONFIG, absolutise


def _main(argv: Sequence[str]) -> int:
    p = cli.parser("pipelines/prepare_data.py", __doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="experiment YAML")
    cli.add_flags(p, "overrides")
    args = p.parse_args(argv)
    from elf_core.config import load_config
    from elf_core.data import training_rows
    from elf_core.encoder import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    absolutise(cfg)
    train, probe = training_rows(cfg, load_tokenizer(cfg.encoder.tokenizer or cfg.encoder.name), progress=True)
    print(f"{len(train):,} training rows + {len(probe):,} held-out probe rows of {cfg.data.max_length} tokens; "
          f"{len(train) // cfg.train.global_batch_size:,} steps/epoch at global batch {cfg.train.global_batch_size}")
    for f in sorted({f["filename"] for f in getattr(train, "cache_files", [])}):
        print(f"cached: {f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
