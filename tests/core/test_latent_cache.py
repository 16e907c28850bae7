"""The latent cache (``data.cache_latents``, elf_core.latent_cache) with the real MiniLM encoder.

Cached latents equal the live encoder's; training steps fed from the cache give the live losses
(float32 storage: ≤ 1e-6 relative, measured 0; float16 ≤ 1e-4, measured 8e-6; bfloat16 ≤ 1e-3,
measured 7e-5, over 6 steps of the embedded default's model); label-dropped rows of a conditional
task are encoded live; the key changes with the encoder's weights and normalisation; a cache that
does not fit in memory or on disk is refused with a message naming ``data.cache_latents``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import namedtuple

import numpy as np
import pytest
import torch

from elf_core import latent_cache
from elf_core.collate import Collator
from elf_core.config import load_config
from elf_core.data import build_dataset
from elf_core.encoder import FrozenEncoder
from elf_core.flow import StepNoise, encode_for_step
from elf_core.latent_cache import LatentCacheError, build_latent_cache, latent_cache_for
from elf_core.network import ELFNetwork
from elf_core.trainer import ELFTrainer

ROWS, S = 48, 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latents")
    cfg = load_config("experiments/local_default.yaml", [
        f"data.cache_dir={tmp}", "data.max_rows=2", f"data.max_length={S}", "data.cache_latents=true"])
    encoder = FrozenEncoder.from_config(cfg.encoder)
    rows = build_dataset(cfg.data, encoder.tokenizer, progress=False)
    rows = rows.select(range(ROWS))
    collate = Collator.from_config(cfg.data, encoder.eos_id, encoder.pad_id)
    return cfg, encoder, rows, collate, tmp


def _losses(cfg, encoder, rows, collate, cache=None, steps: int = 6) -> list[float]:
    torch.manual_seed(0)
    net = ELFNetwork(cfg.model, encoder.dim, encoder.vocab_size)
    trainer = ELFTrainer(cfg, net, encoder, device=torch.device("cpu"), steps_per_epoch=10)
    out = []
    for s in range(steps):
        idx = [(5 * s + 7 * j) % ROWS for j in range(8)]
        batch = collate([rows[i] for i in idx])
        if cache is not None:
            batch["latents"] = cache.rows(idx)
        out.append(trainer.step(batch)["loss"])
    return out


def test_cache_equals_live_encoder_and_is_reused(setup):
    cfg, encoder, rows, collate, tmp = setup
    calls = []
    cache = build_latent_cache(rows, collate, encoder, tmp, dtype="float32", batch_size=20,
                               progress=lambda done, total: calls.append((done, total)))
    assert calls == [(20, ROWS), (40, ROWS), (ROWS, ROWS)]
    assert cache.array.shape == (ROWS, S, encoder.dim) and isinstance(cache.array, np.memmap)
    assert not cache.array.flags.writeable  # memory-mapped read-only: workers share the page cache
    idx = [3, 17, 40]
    batch = collate([rows[i] for i in idx])
    live = encoder.encode(batch["input_ids"], batch["encoder_mask"])
    torch.testing.assert_close(cache.rows(idx), live, rtol=0, atol=1e-6)
    assert json.loads(cache.path.with_suffix(".json").read_text())["encoder"] == cache.key["encoder"]
    again = build_latent_cache(rows, collate, encoder, tmp, dtype="float32",
                               progress=lambda d, t: pytest.fail("rebuilt an existing cache"))
    assert again.path == cache.path


@pytest.mark.parametrize("dtype,rel", [("float32", 1e-6), ("float16", 1e-4), ("bfloat16", 1e-3)])
def test_training_losses_from_the_cache_match_the_live_encoder(setup, dtype, rel):
    cfg, encoder, rows, collate, tmp = setup
    cache = latent_cache_for(dataclasses.replace(cfg.data, latent_cache_dtype=dtype), rows, collate, encoder,
                             progress=False)
    assert cache.rows([0]).dtype == {"float32": torch.float32, "float16": torch.float16,
                                     "bfloat16": torch.bfloat16}[dtype]
    assert latent_cache_for(dataclasses.replace(cfg.data, cache_latents=False), rows, collate, encoder) is None
    live = _losses(cfg, encoder, rows, collate)
    cached = _losses(cfg, encoder, rows, collate, cache)
    assert live[0] != live[-1]
    assert max(abs(a - b) / abs(b) for a, b in zip(cached, live)) <= rel


def test_encoder_is_skipped_unless_rows_are_label_dropped(setup, monkeypatch):
    cfg, encoder, rows, collate, tmp = setup
    cache = build_latent_cache(rows, collate, encoder, tmp, dtype="float32", progress=False)
    calls = []
    original = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda ids, mask: calls.append(ids.shape[0]) or original(ids, mask))
    batch = collate([rows[i] for i in range(8)])
    batch["latents"] = cache.rows(range(8))
    noise = StepNoise.draw((8, S, encoder.dim), cfg.flow, torch.Generator().manual_seed(0), "cpu")
    assert not noise.drop.any()  # unconditional: label_drop_prob = 0
    x0 = encode_for_step(encoder, batch, noise)
    assert calls == [] and x0.dtype == torch.float32


def test_label_dropped_rows_are_encoded_live(tmp_path):
    """Conditional task: cached rows equal the live step's latents unless dropped; dropped rows
    are encoded live under the label-drop mask (their latents really differ from the cache)."""
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps({"input": f"source sentence number {i} about cats",
                                         "target": f"target {i} dogs run"}) for i in range(12)))
    cfg = load_config("experiments/local_default.yaml", [
        f"data.cache_dir={tmp_path}", "data.task=conditional", f"data.source={src}", "data.max_length=24",
        "data.max_input_length=12", "data.max_rows=null", "data.pad_token=eos", "flow.label_drop_prob=0.5"])
    encoder = FrozenEncoder.from_config(cfg.encoder)
    rows = build_dataset(cfg.data, encoder.tokenizer, progress=False)
    collate = Collator.from_config(cfg.data, encoder.eos_id, encoder.pad_id)
    cache = build_latent_cache(rows, collate, encoder, tmp_path, dtype="float32", progress=False)
    batch = {k: v for k, v in collate([rows[i] for i in range(8)]).items() if isinstance(v, torch.Tensor)}
    noise = StepNoise.draw((8, 24, encoder.dim), cfg.flow, torch.Generator().manual_seed(1), "cpu")
    drop = noise.drop
    assert 0 < int(drop.sum()) < 8
    live = encode_for_step(encoder, batch, noise)
    cached = encode_for_step(encoder, {**batch, "latents": cache.rows(range(8))}, noise)
    torch.testing.assert_close(cached, live, rtol=0, atol=1e-5)
    assert not torch.allclose(cache.rows(range(8))[drop], live[drop], atol=1e-3)  # the drop mattered


def test_key_changes_with_encoder_weights_and_normalisation(setup):
    cfg, encoder, rows, collate, tmp = setup
    base = build_latent_cache(rows, collate, encoder, tmp, dtype="float16", progress=False)
    other = copy.deepcopy(encoder)
    with torch.no_grad():
        next(other.model.parameters()).view(-1)[0] += 1e-3
    renorm = copy.deepcopy(encoder)
    renorm.latent_std = 0.2
    paths = {base.path}
    for enc in (other, renorm):
        c = build_latent_cache(rows, collate, enc, tmp, dtype="float16", progress=False)
        assert c.key["encoder"] != base.key["encoder"]
        paths.add(c.path)
    assert len(paths) == 3
    shorter = build_latent_cache(rows.select(range(ROWS - 1)), collate, encoder, tmp, dtype="float16",
                                 progress=False)
    assert shorter.key["dataset"] != base.key["dataset"] and len(shorter) == ROWS - 1


def test_refused_when_it_does_not_fit(setup, monkeypatch, tmp_path):
    cfg, encoder, rows, collate, _ = setup
    need = ROWS * S * encoder.dim * 2  # float16
    assert latent_cache.cache_bytes(ROWS, S, encoder.dim, "float16") == need
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(latent_cache.shutil, "disk_usage", lambda p: Usage(10 ** 12, 0, need - 1))
    with pytest.raises(LatentCacheError, match=r"data\.cache_latents: .* free on disk"):
        build_latent_cache(rows, collate, encoder, tmp_path / "new", dtype="float16", progress=False)
    monkeypatch.setattr(latent_cache.shutil, "disk_usage", lambda p: Usage(10 ** 12, 0, 10 ** 12))
    monkeypatch.setattr(latent_cache, "available_memory_bytes", lambda: need - 1)
    with pytest.raises(LatentCacheError, match=r"data\.cache_latents: .* of memory is available"):
        build_latent_cache(rows, collate, encoder, tmp_path / "new", dtype="float16", progress=False)
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())  # nothing half-written


def test_available_memory_is_read_from_the_system():
    avail = latent_cache.available_memory_bytes()
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < avail <= total
