"""The held-out probe of every checkpoint a training run kept: loss and clean-decode accuracy by step.

    python pipelines/train.py name=lr4e3 optim.lr=4e-3 train.max_steps=280 \\
        train.checkpoint_every=20 train.keep_checkpoints=20
    python benchmarks/probe_curve.py outputs/ray/lr4e3

The README's lr table came from three runs: that one; ``name=lr6e3 optim.lr=6e-3
train.max_steps=260`` with the same checkpoint settings; and, for the paper's 2e-3, the previous
default (``optim.lr=2e-3 train.max_steps=300``, checkpoints every 100, the last 2 kept: steps 200
and 300).

The probe is the one the driver's summary prints (``elf_core.probe.QualityProbe``, raw weights,
the run's own held-out rows and fixed noise, ``ray.cpus_per_worker`` threads), so the last row
equals the summary's "held-out" line. Checkpoints are listed by ``pipelines.checkpoints`` (local or
object-store runs; incomplete ones are skipped and reported).
The lr schedule is warmup then constant, so a run's checkpoint at step k holds the weights a run of
``train.max_steps=k`` ends with: one run gives the whole curve. Needs torch, transformers and the
checkpoint lister (no Ray, no MLflow run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elf_core.checkpoint import load_checkpoint  # noqa: E402
from elf_core.collate import Collator  # noqa: E402
from elf_core.data import training_rows  # noqa: E402
from elf_core.encoder import FrozenEncoder  # noqa: E402
from elf_core.probe import QualityProbe  # noqa: E402
from pipelines.checkpoints import list_checkpoints, resolve  # noqa: E402


def main(argv: list[str] | None = None) -> list[tuple[int, float, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run's storage directory (<ray.storage_path>/<name>: its attempt-*/ folders)")
    args = p.parse_args(argv)
    found = list_checkpoints(args.run_dir)
    if not found:
        raise SystemExit(f"{args.run_dir}: no complete checkpoint (attempt-*/checkpoint_*)")
    probe, rows = None, []
    for ckpt in found:
        with resolve(ckpt.location) as r:  # object-store checkpoints are downloaded, then deleted
            loaded = load_checkpoint(r.path)
        if probe is None:
            cfg = loaded.config
            torch.set_num_threads(max(1, cfg.ray.cpus_per_worker))
            encoder = FrozenEncoder.from_config(cfg.encoder)
            _, held_out = training_rows(cfg, encoder.tokenizer)
            probe = QualityProbe(cfg, encoder, held_out, Collator.from_config(cfg.data, encoder.eos_id, encoder.pad_id),
                                 torch.device("cpu"))
        m = probe.measure(loaded.model)
        rows.append((loaded.step, m["loss"], m["clean_decode_acc"]))
    print("| step | held-out loss | clean decode |\n| ---: | ---: | ---: |")
    for step, loss, acc in rows:  # list_checkpoints gives them in step order
        print(f"| {step} | {loss:.4f} | {acc:.4f} |")
    return rows


if __name__ == "__main__":
    main()
