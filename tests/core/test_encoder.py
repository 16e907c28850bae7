"""Frozen encoder: vendored T5 tokenizer ids, conditional-mask invariance, normalisation, freezing, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from elf_core.collate import Collator
from elf_core.config import EncoderConfig
from elf_core.encoder import (EncoderError, FrozenEncoder, load_tokenizer, mask_after_eos, minilm_dir,
                              resolve_name, special_ids, tokenizer_fingerprint)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "wmt14_deen_val_200.jsonl"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def t5_tok():
    return load_tokenizer("t5-small")


def _save_tiny_t5(path: Path, vocab_size: int = 32128) -> Path:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    T5EncoderModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory) -> Path:
    return _save_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="module")
def tiny_t5(tiny_t5_dir) -> FrozenEncoder:
    return FrozenEncoder.from_config(EncoderConfig(name=str(tiny_t5_dir), tokenizer="t5-small"))


@pytest.fixture(scope="module")
def minilm() -> FrozenEncoder:
    return FrozenEncoder.from_config(EncoderConfig(name="minilm", latent_std=1.0))


# ----------------------------------------------------------------------------------------------
def test_vendored_t5_tokenizer_reproduces_official_ids(t5_tok, rows):
    assert len(t5_tok) == 32100 and special_ids(t5_tok) == (1, 0)
    for r in rows:
        src = t5_tok(r["input"], add_special_tokens=False)["input_ids"] + [t5_tok.eos_token_id]
        tgt = t5_tok(r["target"], add_special_tokens=False)["input_ids"] + [t5_tok.eos_token_id]
        assert src == r["condition_input_ids"], r["index"]
        assert tgt == r["input_ids"], r["index"]
    # aliases of the same vocabulary give the same tokenizer
    assert tokenizer_fingerprint(load_tokenizer("google-t5/t5-small")) == tokenizer_fingerprint(t5_tok)


def test_minilm_alias_and_bert_special_ids():
    d = Path(resolve_name("minilm"))
    assert d == minilm_dir() and (d / "config.json").is_file()
    tok = load_tokenizer("minilm")
    assert len(tok) == 30522
    assert special_ids(tok) == (tok.sep_token_id, tok.pad_token_id) == (102, 0)  # EOS := [SEP]


def test_attributes(tiny_t5, minilm):
    assert (tiny_t5.dim, tiny_t5.vocab_size, tiny_t5.eos_id, tiny_t5.pad_id) == (64, 32100, 1, 0)
    assert tiny_t5.max_positions is None  # relative positions
    assert (minilm.dim, minilm.vocab_size, minilm.eos_id, minilm.pad_id) == (384, 30522, 102, 0)
    assert minilm.max_positions == 512


def _wmt_batch(rows, tok, eos_id, pad_id, retokenise: bool):
    picked = []
    short = [r for r in rows if min(len(r["condition_input_ids"]), 32) + len(r["input_ids"]) < 48][:3]
    for r in short:
        if retokenise:  # the same sentences in another tokenizer's ids
            r = dict(condition_input_ids=tok(r["input"], add_special_tokens=False)["input_ids"] + [eos_id],
                     input_ids=tok(r["target"], add_special_tokens=False)["input_ids"] + [eos_id])
        picked.append(r)
    collate = Collator(64, eos_id, pad_id, pad_token="pad", conditional=True, max_input_length=32)
    return collate(picked)


@pytest.mark.parametrize("which", ["tiny_t5", "minilm"])
def test_condition_latents_ignore_target_tokens(which, request, rows):
    enc: FrozenEncoder = request.getfixturevalue(which)
    b = _wmt_batch(rows, enc.tokenizer, enc.eos_id, enc.pad_id, retokenise=which == "minilm")
    ids, mask = b["input_ids"], b["encoder_mask"]
    is_target = b["attention_mask"] & ~b["cond_mask"]
    is_pad = ~b["attention_mask"]
    assert is_target.any(dim=1).all() and is_pad.any(dim=1).all() and b["cond_mask"].any(dim=1).all()
    g = torch.Generator().manual_seed(1)
    new_target = torch.where(is_target, torch.randint(1000, 20000, ids.shape, generator=g), ids)
    x0, x1 = enc.encode(ids, mask), enc.encode(new_target, mask)
    assert x0.shape == (3, 64, enc.dim) and x0.dtype == torch.float32
    cond = b["cond_mask"]
    assert (x0 - x1)[cond].abs().max().item() < 1e-6  # conditions never see the target
    assert (x0 - x1)[is_target].abs().amax(-1).min().item() > 1e-3  # every target position changes
    # pads are invisible to everybody: changing pad tokens changes no valid position
    new_pad = torch.where(is_pad, torch.randint(1000, 20000, ids.shape, generator=g), ids)
    x2 = enc.encode(new_pad, mask)
    assert (x0 - x2)[b["attention_mask"]].abs().max().item() < 1e-6


def test_pairwise_mask_without_condition_equals_key_padding_mask(tiny_t5, minilm):
    for enc in (tiny_t5, minilm):
        ids = torch.randint(1000, 20000, (2, 12), generator=torch.Generator().manual_seed(0))
        valid = torch.arange(12)[None] < torch.tensor([[12], [7]])
        pairwise = valid[:, None, :].expand(2, 12, 12)
        torch.testing.assert_close(enc.encode(ids, pairwise), enc.encode(ids, valid), atol=1e-6, rtol=0)


def test_normalisation_arithmetic(tiny_t5_dir, tiny_t5, t5_tok):
    raw = FrozenEncoder(tiny_t5.model, t5_tok, latent_mean=0.0, latent_std=1.0)
    shifted = FrozenEncoder(tiny_t5.model, t5_tok, latent_mean=0.3, latent_std=0.5)
    ids = torch.randint(0, 32100, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, 10, dtype=torch.bool)
    with torch.no_grad():
        h = tiny_t5.model(input_ids=ids, attention_mask=mask[:, None]).last_hidden_state
    torch.testing.assert_close(raw.encode(ids, mask), h, atol=0, rtol=0)
    torch.testing.assert_close(shifted.encode(ids, mask), (h - 0.3) / 0.5, atol=1e-6, rtol=0)
    # the default (0.0, 0.2) of the paper: x = 5 h
    torch.testing.assert_close(tiny_t5.encode(ids, mask), 5.0 * h, atol=1e-5, rtol=1e-6)


def test_frozen(tiny_t5):
    assert all(not p.requires_grad for p in tiny_t5.parameters())
    tiny_t5.train()
    assert not tiny_t5.model.training  # dropout stays off
    ids = torch.randint(0, 32100, (1, 6))
    with torch.enable_grad():
        x = tiny_t5.encode(ids, torch.ones(1, 6, 6, dtype=torch.bool))
    assert not x.requires_grad and x.grad_fn is None


def test_decode_ids_cuts_at_first_eos(tiny_t5, rows):
    ids = [r["input_ids"] + [71, 8994, 1, 0, 0] for r in rows[:2]]  # junk after EOS
    width = max(map(len, ids))
    batch = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    assert tiny_t5.decode_ids(batch) == [rows[0]["target"], rows[1]["target"]]
    assert tiny_t5.decode_ids([71, 8994, 1998]) == ["A Republican strategy"]  # no EOS: keep all
    assert mask_after_eos(torch.tensor([[5, 1, 6, 1]]), 1, 0).tolist() == [[5, 0, 0, 0]]


def test_mismatched_tokenizer_and_encoder(tmp_path, tiny_t5_dir):
    with pytest.raises(EncoderError, match=r"tokenizer 't5-small' does not match encoder 'minilm'.*32100.*30522"):
        FrozenEncoder.from_config(EncoderConfig(name="minilm", tokenizer="t5-small"))
    with pytest.raises(EncoderError, match=r"tokenizer 'minilm' does not match encoder .*tiny_t5.*BertTokenizer"):
        FrozenEncoder.from_config(EncoderConfig(name=str(tiny_t5_dir), tokenizer="minilm"))
    small = _save_tiny_t5(tmp_path / "small_vocab", vocab_size=1000)
    with pytest.raises(EncoderError, match=r"'t5-small' does not match .*small_vocab.*32100 ids.*1000 rows"):
        FrozenEncoder.from_config(EncoderConfig(name=str(small), tokenizer="t5-small"))


def test_unreachable_encoder_names_what_was_tried(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EncoderError, match=r"could not load encoder 't5-small' \(tried Hugging Face hub .*minilm"):
        FrozenEncoder.from_config(EncoderConfig(name="t5-small"))
    missing = str(tmp_path / "nope")
    with pytest.raises(EncoderError, match=r"local directory .*nope, which does not exist"):
        FrozenEncoder.from_config(EncoderConfig(name=missing, tokenizer="t5-small"))


def test_too_long_for_absolute_positions(minilm):
    with pytest.raises(EncoderError, match=r"'minilm' has 512 positions; rows of 513"):
        minilm.encode(torch.zeros(1, 513, dtype=torch.long), torch.ones(1, 513, 513, dtype=torch.bool))


def test_masked_minilm_latents_are_pinned(minilm):
    """The latents of a pairwise-masked batch, pinned to the values measured with SDPA attention
    (transformers 5.24, torch 2.13 CPU). Under ``attn_implementation="eager"`` the boolean mask is
    added to the scores as 0/1 and these numbers move by up to 1.16: the test catches that (and any
    other change of the masked latents, e.g. a transformers upgrade)."""
    from elf_core.collate import pairwise_encoder_mask

    assert minilm.model.config._attn_implementation == "sdpa"
    tok, S = minilm.tokenizer, 12
    x = torch.zeros(2, S, dtype=torch.long)
    for i, text in enumerate(["the state of the union is strong", "we hold these truths"]):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [minilm.eos_id]
        x[i, :len(ids)] = torch.tensor(ids[:S])
    cond = torch.zeros(2, S, dtype=torch.bool)
    cond[:, :3] = True  # the first three tokens play the condition: they see only each other
    h = minilm.encode(x, pairwise_encoder_mask(cond, x != 0))
    assert h.sum().item() == pytest.approx(71.5538330078125, abs=2e-3)
    torch.testing.assert_close(h[0, :2, :4], torch.tensor([[-0.026048608, 0.094869696, 0.068451092, 0.143082023],
                                                           [-0.133034140, 0.258064538, 0.169041097, 0.386434108]]),
                               atol=2e-5, rtol=0)
    torch.testing.assert_close(h[1, 4, :3], torch.tensor([-0.387433380, 1.071206450, 0.027557747]), atol=2e-5, rtol=0)
