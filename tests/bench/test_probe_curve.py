"""``benchmarks/probe_curve.py``: one row per complete checkpoint, in step order, each the probe the
driver's summary would print for those raw weights (same held-out rows, same fixed noise)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import probe_curve  # noqa: E402

from elf_core.checkpoint import save_checkpoint  # noqa: E402
from elf_core.collate import Collator  # noqa: E402
from elf_core.config import load_config  # noqa: E402
from elf_core.data import training_rows  # noqa: E402
from elf_core.encoder import FrozenEncoder  # noqa: E402
from elf_core.network import ELFNetwork  # noqa: E402
from elf_core.probe import QualityProbe  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_every_checkpoint_is_probed_in_step_order(tmp_path):
    cfg = load_config(ROOT / "experiments" / "local_default.yaml",
                      ["data.max_rows=4", "data.max_length=16", f"data.cache_dir={tmp_path / 'cache'}"])
    nets = {}
    torch.manual_seed(99)
    ema = ELFNetwork(cfg.model, 384, 30522).state_dict()  # other weights: the probe must not use them
    # The later attempt's name sorts first: the rows must come in step order all the same.
    for attempt, step, seed in (("attempt-a", 7, 1), ("attempt-b", 3, 0)):
        torch.manual_seed(seed)
        nets[step] = ELFNetwork(cfg.model, 384, 30522)
        save_checkpoint(tmp_path / "run" / attempt / f"checkpoint_{step:08d}", model=nets[step], config=cfg, step=step,
                        ema_state=ema)
    (tmp_path / "run" / "attempt-b" / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's file: skipped
    (tmp_path / "run" / "attempt-b" / "checkpoint_00000009").mkdir()  # incomplete (no meta.json): skipped

    before = torch.get_num_threads()
    try:  # main() takes the run's ray.cpus_per_worker threads, as the worker does; the suite runs on 1
        rows = probe_curve.main([str(tmp_path / "run")])
        encoder = FrozenEncoder.from_config(cfg.encoder)
        _, held_out = training_rows(cfg, encoder.tokenizer)
        probe = QualityProbe(cfg, encoder, held_out, Collator.from_config(cfg.data, encoder.eos_id, encoder.pad_id),
                             torch.device("cpu"))
        want = {step: probe.measure(net) for step, net in nets.items()}
    finally:
        torch.set_num_threads(before)
    assert [r[0] for r in rows] == [3, 7]
    for step, loss, acc in rows:
        assert (loss, acc) == (want[step]["loss"], want[step]["clean_decode_acc"])
    assert rows[0][1] != rows[1][1]  # different weights, different numbers
