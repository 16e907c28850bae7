"""Data layer: collator and masks on real WMT rows, packing, every source type, caching, bad input."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import elf_core.data as data_mod
from elf_core.collate import Collator, pairwise_encoder_mask
from elf_core.config import DataConfig
from elf_core.data import Packer, build_dataset
from elf_core.data_sources import BUNDLED, DataError, looks_like_saved_arrow
from elf_core.encoder import load_tokenizer

FIXTURE = Path(__file__).parents[1] / "fixtures" / "wmt14_deen_val_200.jsonl"
DOCS = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is ELF Lab.",
        "A third document about flows in latent space.", "Fourth: short."]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("t5-small")


def _tokens(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _cfg(tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def _write_jsonl(path: Path, records: list, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


# ----------------------------------------------------------------------------------------------
# Collator and masks
def test_collator_on_wmt_rows_eos_padding(rows):
    r0, r1 = rows[0], rows[1]
    assert (len(r0["condition_input_ids"]), len(r0["input_ids"])) == (20, 14)
    b = Collator(64, eos_id=1, pad_id=0, pad_token="eos", conditional=True, max_input_length=32)([r0, r1])
    assert b["input_ids"].shape == (2, 64) and b["input_ids"].dtype == torch.long
    assert b["encoder_mask"].shape == (2, 64, 64) and b["encoder_mask"].dtype == torch.bool
    assert b["loss_mask"].dtype == torch.float32 and b["attention_mask"].dtype == torch.bool
    ids = b["input_ids"][0].tolist()
    assert ids[:20] == r0["condition_input_ids"] and ids[20:34] == r0["input_ids"]
    assert ids[34:] == [1] * 30  # padded with EOS
    assert b["cond_mask"][0].tolist() == [True] * 20 + [False] * 44
    assert b["attention_mask"][0].tolist() == [True] * 34 + [False] * 30
    m = b["encoder_mask"][0]
    assert m[5, 10] and not m[5, 25] and not m[5, 40]  # condition row: condition columns only
    assert m[25, 5] and m[25, 30] and not m[25, 40]  # target row: every valid column, no pads
    assert m[40, 5] and m[40, 33] and not m[40, 40]  # pad row: valid columns, not even itself
    assert m.sum().item() == 20 * 20 + 44 * 34
    # EOS padding: the whole non-condition tail is supervised
    assert b["loss_mask"][0].tolist() == [0.0] * 20 + [1.0] * 44
    c1, t1 = len(r1["condition_input_ids"]), len(r1["input_ids"])
    assert b["cond_mask"][1].sum().item() == min(c1, 32)
    assert b["attention_mask"][1].sum().item() == min(min(c1, 32) + t1, 64)
    assert b["index"] == [0, 1] and b["target"] == [r0["target"], r1["target"]]


def test_collator_pad_padding_masks_tail_from_loss(rows):
    b = Collator(64, eos_id=1, pad_id=0, pad_token="pad", conditional=True, max_input_length=32)([rows[0]])
    assert b["input_ids"][0, 34:].tolist() == [0] * 30
    assert b["loss_mask"][0].tolist() == [0.0] * 20 + [1.0] * 14 + [0.0] * 30


def test_encoder_mask_matches_definition_elementwise(rows):
    b = Collator(48, 1, 0, pad_token="eos", conditional=True, max_input_length=16)(rows[:6])
    cond, valid = b["cond_mask"], b["attention_mask"]
    want = torch.zeros(6, 48, 48, dtype=torch.bool)
    for n in range(6):
        for i in range(48):
            for j in range(48):
                want[n, i, j] = bool(cond[n, i] and cond[n, j]) or bool(not cond[n, i] and valid[n, j])
    assert torch.equal(b["encoder_mask"], want)
    assert torch.equal(pairwise_encoder_mask(cond, valid), want)


def test_pairwise_encoder_mask_by_hand():
    is_cond = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    is_valid = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    assert pairwise_encoder_mask(is_cond, is_valid)[0].int().tolist() == [
        [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]


def test_long_condition_is_truncated(rows):
    r = next(r for r in rows if len(r["condition_input_ids"]) > 40)
    b = Collator(64, 1, 0, pad_token="eos", conditional=True, max_input_length=8)([r])
    n_valid = min(8 + len(r["input_ids"]), 64)
    assert b["cond_mask"][0].sum().item() == 8
    assert b["input_ids"][0, :8].tolist() == r["condition_input_ids"][:8]  # the condition's EOS is cut off
    assert b["input_ids"][0, 8:n_valid].tolist() == r["input_ids"][: n_valid - 8]
    # whole row longer than max_length: truncated, no pads
    b = Collator(16, 1, 0, pad_token="pad", conditional=True, max_input_length=8)([r])
    assert b["attention_mask"][0].all() and b["input_ids"][0, 8:].tolist() == r["input_ids"][:8]
    assert b["loss_mask"][0].tolist() == [0.0] * 8 + [1.0] * 8


def test_unconditional_collate_ignores_condition_and_pickles(rows):
    collate = Collator(8, eos_id=1, pad_id=0, pad_token="pad")
    batch = [{"input_ids": np.arange(2, 7)}, {"input_ids": list(range(2, 12)), "condition_input_ids": [9, 9]}]
    b = collate(batch)
    assert b["input_ids"].tolist() == [[2, 3, 4, 5, 6, 0, 0, 0], list(range(2, 10))]
    assert not b["cond_mask"].any()
    assert torch.equal(b["encoder_mask"], b["attention_mask"][:, None, :].expand(2, 8, 8))
    assert b["loss_mask"].tolist() == [[1.0] * 5 + [0.0] * 3, [1.0] * 8]
    clone = pickle.loads(pickle.dumps(collate))
    assert all(torch.equal(v, clone(batch)[k]) for k, v in b.items())
    cond = Collator.from_config(DataConfig(task="conditional", max_length=64, max_input_length=32, pad_token="eos"), 1, 0)
    assert (cond.fill_id, cond.conditional, cond.max_input_length) == (1, True, 32)
    with pytest.raises(KeyError, match="row 7 has no 'condition_input_ids'"):
        cond([{"input_ids": [5, 1], "index": 7}])


def test_collator_refuses_empty_row():
    with pytest.raises(ValueError, match="row 1 has no tokens"):
        Collator(8, 1, 0)([{"input_ids": [3]}, {"input_ids": []}])


# ----------------------------------------------------------------------------------------------
# Packing
@pytest.mark.parametrize("sep", [None, 1])
def test_packer_rows_concatenate_to_the_stream(sep):
    g = np.random.default_rng(0)
    docs = [g.integers(2, 100, size=int(n)).tolist() for n in g.integers(0, 30, size=40)]
    stream = [t for d in docs for t in (d + ([sep] if sep is not None else []))]
    packer = Packer(16, sep_id=sep)
    out = [packer.add(docs[i:i + 7]) for i in range(0, len(docs), 7)]
    packed = np.concatenate(out)
    assert packed.shape == (len(stream) // 16, 16) and packed.dtype == np.int32
    assert packed.reshape(-1).tolist() + packer.remainder.tolist() == stream
    assert packer.n_tokens == len(stream)


def test_unconditional_build_packs_jsonl(tmp_path, tok):
    src = _write_jsonl(tmp_path / "docs.jsonl", [{"text": d, "other": 1} for d in DOCS])
    ds = build_dataset(_cfg(tmp_path, source=str(src), max_length=8), tok, progress=False)
    stream = [t for d in DOCS for t in _tokens(tok, d)]  # no EOS separators (official packing)
    assert len(ds) == len(stream) // 8 and ds.column_names == ["input_ids"]
    assert all(len(r) == 8 for r in ds["input_ids"])
    assert [t for r in ds["input_ids"] for t in r] == stream[: len(ds) * 8]
    ds_sep = build_dataset(_cfg(tmp_path, source=str(src), max_length=8), tok, eos_between_docs=True, progress=False)
    stream_sep = [t for d in DOCS for t in _tokens(tok, d) + [1]]
    assert [t for r in ds_sep["input_ids"] for t in r] == stream_sep[: len(stream_sep) // 8 * 8]


# ----------------------------------------------------------------------------------------------
# Sources
def test_gz_jsonl_and_txt_sources(tmp_path, tok):
    expected = [t for d in DOCS for t in _tokens(tok, d)][:16]
    gz = _write_jsonl(tmp_path / "docs.jsonl.gz", [{"body": d} for d in DOCS], gz=True)
    ds = build_dataset(_cfg(tmp_path, source=str(gz), text_field="body", max_length=8), tok, progress=False)
    assert [t for r in ds["input_ids"][:2] for t in r] == expected
    txt = tmp_path / "docs.txt"
    txt.write_text("\n".join(DOCS[:2]) + "\n\n" + "\n".join(DOCS[2:]) + "\n", encoding="utf-8")  # blank line skipped
    ds = build_dataset(_cfg(tmp_path, source=str(txt), max_length=8), tok, progress=False)
    assert [t for r in ds["input_ids"][:2] for t in r] == expected


def test_conditional_raw_jsonl_matches_official_ids(tmp_path, tok, rows):
    src = _write_jsonl(tmp_path / "pairs.jsonl", [{"de": r["input"], "en": r["target"]} for r in rows[:20]])
    cfg = _cfg(tmp_path, task="conditional", source=str(src), input_field="de", target_field="en",
               max_length=64, max_input_length=32)
    ds = build_dataset(cfg, tok, progress=False)
    assert len(ds) == 20
    assert ds["condition_input_ids"] == [r["condition_input_ids"] for r in rows[:20]]
    assert ds["input_ids"] == [r["input_ids"] for r in rows[:20]]
    assert ds["target"] == [r["target"] for r in rows[:20]] and ds["index"] == list(range(20))
    assert ds["sequence_length"] == [len(r["input_ids"]) for r in rows[:20]]


def test_pretokenised_jsonl_loads_unchanged(tmp_path, tok, rows, monkeypatch):
    monkeypatch.setattr(data_mod, "_tokenise", lambda *a: pytest.fail("pre-tokenised rows were re-tokenised"))
    cfg = _cfg(tmp_path, task="conditional", source=str(FIXTURE), max_length=64, max_input_length=32, max_rows=50)
    ds = build_dataset(cfg, tok, progress=False)
    assert len(ds) == 50
    assert ds["condition_input_ids"] == [r["condition_input_ids"] for r in rows[:50]]
    assert ds["input_ids"] == [r["input_ids"] for r in rows[:50]] and ds["input"] == [r["input"] for r in rows[:50]]


def test_save_to_disk_sources(tmp_path, tok, rows, monkeypatch):
    from datasets import Dataset, DatasetDict

    pre = tmp_path / "pre"
    Dataset.from_list(rows).save_to_disk(str(pre))
    raw = tmp_path / "raw"
    DatasetDict({"train": Dataset.from_dict({"text": DOCS}), "validation": Dataset.from_dict({"text": DOCS[::-1]})}
                ).save_to_disk(str(raw))
    # raw text in a DatasetDict: split chosen by name and tokenised
    cfg = _cfg(tmp_path, source=str(raw), max_length=8, eval_source=str(raw))
    train = build_dataset(cfg, tok, progress=False)
    val = build_dataset(cfg, tok, source=cfg.eval_source, split=cfg.eval_split, progress=False)
    assert [t for r in train["input_ids"][:2] for t in r] == [t for d in DOCS for t in _tokens(tok, d)][:16]
    assert val["input_ids"][0] == [t for d in DOCS[::-1] for t in _tokens(tok, d)][:8]
    with pytest.raises(DataError, match=r"raw: no split 'test'; available splits: \['train', 'validation'\]"):
        build_dataset(cfg, tok, split="test", progress=False)
    # pre-tokenised Dataset: returned unchanged, no tokenisation, max_rows keeps the first rows
    monkeypatch.setattr(data_mod, "_tokenise", lambda *a: pytest.fail("re-tokenised"))
    cfg = _cfg(tmp_path, task="conditional", source=str(pre), max_length=64, max_input_length=32, max_rows=5)
    ds = build_dataset(cfg, tok, progress=False)
    assert len(ds) == 5 and ds.column_names == list(rows[0])
    assert ds[3]["condition_input_ids"] == rows[3]["condition_input_ids"] and ds[3]["input_ids"] == rows[3]["input_ids"]


def test_bundled_corpus_with_max_rows(tmp_path, tok):
    first_doc = json.loads(gzip.open(BUNDLED["sotu"], "rt", encoding="utf-8").readline())
    ds = build_dataset(_cfg(tmp_path, max_rows=1, max_length=128), tok, progress=False)
    ids = _tokens(tok, first_doc["text"])
    assert len(ds) == len(ids) // 128
    assert ds[0]["input_ids"] == ids[:128] and ds[len(ds) - 1]["input_ids"] == ids[(len(ds) - 1) * 128: len(ds) * 128]


def test_hub_source_unreachable_is_a_clear_error(tmp_path, tok, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"could not load hub dataset 'owner/no-such-data' split 'train'.*offline"):
        build_dataset(_cfg(tmp_path, source="owner/no-such-data"), tok, progress=False)
    assert not looks_like_saved_arrow(datasets.Dataset.from_dict({"text": ["a"]}))
    assert looks_like_saved_arrow(datasets.Dataset.from_dict({"_data_files": [["x"]], "_fingerprint": ["f"]}))


# ----------------------------------------------------------------------------------------------
# Caching
def test_second_call_reads_the_cache(tmp_path, tok, monkeypatch):
    src = _write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    cfg = _cfg(tmp_path, source=str(src), max_length=8)
    calls = []
    real = data_mod._tokenise
    monkeypatch.setattr(data_mod, "_tokenise", lambda t, texts: calls.append(len(texts)) or real(t, texts))
    first = build_dataset(cfg, tok, progress=False)
    assert calls == [4] and len(list((tmp_path / "cache").glob("*.arrow"))) == 1
    again = build_dataset(cfg, tok, progress=False)
    assert calls == [4] and again["input_ids"] == first["input_ids"]  # not re-tokenised
    build_dataset(_cfg(tmp_path, source=str(src), max_length=4), tok, progress=False)  # new key
    assert calls == [4, 4]
    _write_jsonl(src, [{"text": d} for d in DOCS[::-1]])  # content (size/mtime) changed -> rebuilt
    changed = build_dataset(cfg, tok, progress=False)
    assert calls == [4, 4, 4] and changed["input_ids"][0] == [t for d in DOCS[::-1] for t in _tokens(tok, d)][:8]


# ----------------------------------------------------------------------------------------------
# Bad input: every message names the file (and line)
def _err(tmp_path, tok, **kw) -> str:
    with pytest.raises(DataError) as info:
        build_dataset(_cfg(tmp_path, **kw), tok, progress=False)
    return str(info.value)


def test_bad_input_errors(tmp_path, tok):
    missing = tmp_path / "absent.jsonl"
    assert f"file not found: {missing}" in _err(tmp_path, tok, source=str(missing))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert _err(tmp_path, tok, source=str(empty)) == f"{empty}: file is empty"
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    assert _err(tmp_path, tok, source=str(blank)) == f"{blank}: file has no rows (only blank lines)"
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    assert _err(tmp_path, tok, source=str(bad_json)).startswith(f"{bad_json}: line 3: not valid JSON")
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "ok"}\n{"body": "x"}\n')
    assert _err(tmp_path, tok, source=str(no_field)) == f"{no_field}:2: missing field 'text' (has: ['body'])"
    not_str = tmp_path / "notstr.jsonl"
    not_str.write_text('{"text": 5}\n')
    assert _err(tmp_path, tok, source=str(not_str)) == f"{not_str}:1: field 'text' must be a string, got int"
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("first line\nZürich\n".encode("latin-1"))
    assert _err(tmp_path, tok, source=str(bad_utf8)).startswith(
        f"{bad_utf8}: line 2: not valid UTF-8 at byte offset 12")  # 'ü' is byte 1 of line 2
    tiny = _write_jsonl(tmp_path / "tiny.jsonl", [{"text": "two words"}, {"text": ""}])
    assert len(_tokens(tok, "two words")) == 2
    assert "only 2 tokens in 2 documents, fewer than data.max_length=1024" in _err(tmp_path, tok, source=str(tiny))
    txt = tmp_path / "docs.txt"
    txt.write_text("just text\n")
    assert _err(tmp_path, tok, source=str(txt), task="conditional", max_length=8, max_input_length=4) == (
        f"{txt}:1: missing field 'input' (has: ['text'])")
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    assert "unsupported file type d.csv" in _err(tmp_path, tok, source=str(csv))
    (tmp_path / "plain_dir").mkdir()
    assert "was not written by datasets.save_to_disk" in _err(tmp_path, tok, source=str(tmp_path / "plain_dir"))
    assert "no bundled corpus 'nope'; available: bundled:sotu" in _err(tmp_path, tok, source="bundled:nope")
    # no half-written cache file is left behind by a failed build
    assert not list((tmp_path / "cache").glob("*"))
