"""Training rows from a source: tokenise, pack (unconditional) or pair (conditional), and cache on disk.

Row schemas (the official pre-tokenised schema, reference §2.1):

* unconditional: ``input_ids`` — every row exactly ``max_length`` ids. Documents are tokenised without
  special tokens and concatenated **without EOS separators** (as the official OpenWebText data was packed;
  ``eos_between_docs=True`` inserts one), then cut into rows; the final partial row is dropped.
* conditional: ``condition_input_ids`` / ``input_ids`` = the ``input`` / ``target`` text tokenised with
  EOS appended (as the released WMT14/XSum data), plus the raw ``input``/``target`` strings (eval
  references), ``index`` and the two lengths.

Datasets that already carry ``input_ids`` (and ``condition_input_ids`` for the conditional task) are
used unchanged — ``save_to_disk``/hub ones are returned as they are, JSONL ones are converted to Arrow
keeping ids, raw strings and ``index``. ``max_rows`` keeps the first N rows of the *source* (documents
for raw text) before tokenising.

Tokenised results are written once to ``DataConfig.cache_dir`` as an Arrow file whose name is a hash of
everything that decides its content (source + file sizes/mtimes or the HF fingerprint, split, tokenizer
fingerprint, task, fields, max_length, max_rows, separator); later calls memory-map it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa

from .config import DataConfig
from .data_sources import DataError, Source, iter_file_rows, load_hf_dataset, resolve_source
from .encoder import special_ids, tokenizer_fingerprint

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
TOKENIZE_BATCH = 64  # documents per tokenizer call


def is_pretokenised(columns: Iterable[str], conditional: bool) -> bool:
    cols = set(columns)
    return "input_ids" in cols and (not conditional or "condition_input_ids" in cols)


class Packer:
    """Cuts a stream of token-id lists into rows of exactly ``max_length``; the tail waits in ``remainder``.

    Invariant: concatenating every row returned so far, then ``remainder``, gives the concatenated input
    (with ``sep_id`` after each list when set).
    """

    def __init__(self, max_length: int, sep_id: Optional[int] = None) -> None:
        self.max_length = max_length
        self.sep_id = sep_id
        self.remainder = np.empty(0, dtype=np.int32)
        self.n_tokens = 0

    def add(self, id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Feed documents; returns the (n, max_length) int32 rows completed by them (n may be 0)."""
        parts = [self.remainder]
        for ids in id_lists:
            parts.append(np.asarray(ids, dtype=np.int32))
            if self.sep_id is not None:
                parts.append(np.array([self.sep_id], dtype=np.int32))
        stream = np.concatenate(parts)
        self.n_tokens += len(stream) - len(self.remainder)
        n = len(stream) // self.max_length
        self.remainder = stream[n * self.max_length:]
        return stream[: n * self.max_length].reshape(n, self.max_length)


# ----------------------------------------------------------------------------------------------
def _ids_array(rows: Sequence[Sequence[int]]) -> pa.Array:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]) if len(rows) else np.empty(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int32()))


def _text(where: str, row: dict, field: str) -> str:
    if field not in row:
        raise DataError(f"{where}: missing field '{field}' (has: {sorted(row)})")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _ids(where: str, row: dict, field: str) -> list[int]:
    value = row.get(field)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError(f"{where}: field '{field}' must be a list of token ids, got {str(value)[:60]}")
    return value


def _tokenise(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _packed_batches(rows, tokenizer, cfg: DataConfig, sep_id, progress, source: str) -> Iterator[pa.RecordBatch]:
    packer = Packer(cfg.max_length, sep_id)
    n_docs = 0
    for batch in _batched(rows, progress):
        n_docs += len(batch)
        out = packer.add(_tokenise(tokenizer, [_text(w, r, cfg.text_field) for w, r in batch]))
        if len(out):
            yield pa.record_batch([_ids_array(out)], names=["input_ids"])
    if packer.n_tokens < cfg.max_length:
        raise DataError(f"data source '{source}': only {packer.n_tokens} tokens in {n_docs} documents, fewer than "
                        f"data.max_length={cfg.max_length}; no row can be packed (empty corpus?)")


def _conditional_batches(rows, tokenizer, cfg: DataConfig, eos_id, progress) -> Iterator[pa.RecordBatch]:
    index = 0
    for batch in _batched(rows, progress):
        inputs = [_text(w, r, cfg.input_field) for w, r in batch]
        targets = [_text(w, r, cfg.target_field) for w, r in batch]
        cond = [ids + [eos_id] for ids in _tokenise(tokenizer, inputs)]
        tgt = [ids + [eos_id] for ids in _tokenise(tokenizer, targets)]
        yield pa.record_batch(
            [pa.array(range(index, index + len(batch)), pa.int64()), pa.array(inputs, pa.string()),
             pa.array(targets, pa.string()), _ids_array(cond), _ids_array(tgt),
             pa.array([len(c) for c in cond], pa.int64()), pa.array([len(t) for t in tgt], pa.int64())],
            names=["index", "input", "target", "condition_input_ids", "input_ids",
                   "condition_sequence_length", "sequence_length"])
        index += len(batch)


def _passthrough_batches(rows, first: dict, progress) -> Iterator[pa.RecordBatch]:
    """Pre-tokenised JSONL rows: ids unchanged; raw strings and index kept when the first row has them."""
    id_cols = [c for c in ("condition_input_ids", "input_ids") if c in first]
    extra = {c: t for c, t in (("index", pa.int64()), ("input", pa.string()), ("target", pa.string())) if c in first}
    for batch in _batched(rows, progress):
        arrays = [_ids_array([_ids(w, r, c) for w, r in batch]) for c in id_cols]
        for c, typ in extra.items():
            if any(c not in r for _, r in batch):
                w = next(w for w, r in batch if c not in r)
                raise DataError(f"{w}: missing field '{c}' (the first row has it)")
            arrays.append(pa.array([r[c] for _, r in batch], typ))
        yield pa.record_batch(arrays, names=id_cols + list(extra))


def _batched(rows: Iterator[tuple[str, dict]], progress) -> Iterator[list[tuple[str, dict]]]:
    while batch := list(itertools.islice(rows, TOKENIZE_BATCH)):
        yield batch
        progress.update(len(batch))


# ----------------------------------------------------------------------------------------------
def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_arrow(path: Path, batches: Iterator[pa.RecordBatch]) -> None:
    """Stream record batches to ``path`` atomically (tmp file + rename; concurrent builders are safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    writer = None
    try:
        with pa.OSFile(str(tmp), "wb") as sink:
            for rb in batches:
                if writer is None:
                    writer = pa.ipc.new_stream(sink, rb.schema)
                writer.write_batch(rb)
            if writer is None:
                raise DataError(f"no rows were produced for {path.name}")
            writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _hf_rows(ds, src: Source, fields: list[str]) -> Iterator[tuple[str, dict]]:
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise DataError(f"data source '{src.spec}': missing column(s) {missing} (columns: {ds.column_names})")
    for i, row in enumerate(ds.select_columns(fields)):
        yield f"{src.spec} row {i}", row


def build_dataset(cfg: DataConfig, tokenizer, *, split: Optional[str] = None, source: Optional[str] = None,
                  eos_between_docs: bool = False, progress: bool = True):
    """The tokenised ``datasets.Dataset`` for ``source`` (default ``cfg.source``) / ``split`` (``cfg.split``)."""
    from datasets import Dataset
    from tqdm.auto import tqdm

    source = source if source is not None else cfg.source
    split = split if split is not None else cfg.split
    conditional = cfg.task == "conditional"
    eos_id, _ = special_ids(tokenizer)
    src = resolve_source(source)
    n_total: Optional[int] = None
    if src.kind == "file":
        assert src.path is not None and src.fmt is not None
        rows: Iterator[tuple[str, dict]] = iter_file_rows(src.path, src.fmt, cfg.text_field)
        signature = src.signature()
    else:
        ds = load_hf_dataset(src, split)
        if len(ds) == 0:
            raise DataError(f"data source '{source}': split '{split}' has no rows")
        if is_pretokenised(ds.column_names, conditional):
            return ds.select(range(min(cfg.max_rows, len(ds)))) if cfg.max_rows is not None else ds
        fields = [cfg.input_field, cfg.target_field] if conditional else [cfg.text_field]
        rows = _hf_rows(ds, src, fields)
        n_total = len(ds)
        signature = {**src.signature(), "fingerprint": ds._fingerprint}
    if cfg.max_rows is not None:
        rows = itertools.islice(rows, cfg.max_rows)
        n_total = cfg.max_rows if n_total is None else min(n_total, cfg.max_rows)

    key = cache_key(dict(
        version=CACHE_FORMAT_VERSION, source=signature, split=split, task=cfg.task,
        tokenizer=tokenizer_fingerprint(tokenizer), max_length=cfg.max_length, max_rows=cfg.max_rows,
        fields=[cfg.text_field, cfg.input_field, cfg.target_field], eos_between_docs=eos_between_docs,
    ))
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).name or source)[:40]
    path = Path(cfg.cache_dir).expanduser() / f"{slug}-{split}-{cfg.task}-{key}.arrow"
    if path.is_file():
        log.info("data: using cached %s", path)
        return Dataset.from_file(str(path))

    try:
        first = next(rows)
    except StopIteration:
        raise DataError(f"data source '{source}': no rows (max_rows={cfg.max_rows})") from None
    rows = itertools.chain([first], rows)
    bar = tqdm(total=n_total, desc=f"tokenising {source}", unit=" rows", disable=not progress)
    try:
        if is_pretokenised(first[1], conditional):
            batches = _passthrough_batches(rows, first[1], bar)
        elif conditional:
            batches = _conditional_batches(rows, tokenizer, cfg, eos_id, bar)
        else:
            batches = _packed_batches(rows, tokenizer, cfg, eos_id if eos_between_docs else None, bar, source)
        _write_arrow(path, batches)
    finally:
        bar.close()
    log.info("data: wrote %s", path)
    return Dataset.from_file(str(path))


PROBE_ROWS = 32  # held-out rows of the quality probe (elf_core.probe)


def training_rows(cfg, tokenizer, progress: bool = False):
    """``(train rows, probe rows)`` of an :class:`~elf_core.config.ExperimentConfig`: the tokenised
    dataset (cached on disk after the first build) and a fixed held-out slice for the quality probe —
    from ``data.eval_source`` when set, else the last rows of the training set, which are then
    excluded from training."""
    train = build_dataset(cfg.data, tokenizer, progress=progress)
    if cfg.data.eval_source:
        held = build_dataset(cfg.data, tokenizer, source=cfg.data.eval_source, split=cfg.data.eval_split,
                             progress=progress)
        return train, held.select(range(min(PROBE_ROWS, len(held))))
    n_probe = min(PROBE_ROWS, len(train) // 20)
    return train.select(range(len(train) - n_probe)), train.select(range(len(train) - n_probe, len(train)))
