"""Tokenise / pack an experiment's data once and cache it, so training (every worker) reuses it.

    python pipelines/prepare_data.py --config experiments/owt_elf_b.yaml [key=value ...]

The cache lives in ``data.cache_dir`` (keyed by source, tokenizer, lengths, fields), exactly where
``pipelines/train.py`` looks; running this first moves the tokenising out of the training job and
shows a progress bar. Prints the rows, the cache files and the steps per epoch the data gives.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.train import DEFAULT_CONFIG, absolutise  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="experiment YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    from elf_core.config import ConfigError, load_config
    from elf_core.data_sources import DataError
    from elf_core.encoder import EncoderError, load_tokenizer
    from pipelines.train_worker import training_rows

    try:
        cfg = load_config(args.config, args.overrides)
        absolutise(cfg)
        tokenizer = load_tokenizer(cfg.encoder.tokenizer or cfg.encoder.name)
        train, probe = training_rows(cfg, tokenizer, progress=True)
    except (ConfigError, DataError, EncoderError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = sorted({f["filename"] for f in getattr(train, "cache_files", [])})
    print(f"{len(train):,} training rows + {len(probe):,} held-out probe rows of {cfg.data.max_length} tokens; "
          f"{len(train) // cfg.train.global_batch_size:,} steps/epoch at global batch {cfg.train.global_batch_size}")
    for f in files:
        print(f"cached: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
