"""Where raw rows come from: bundled corpora, JSONL / text files, ``save_to_disk`` dirs, hub datasets.

``DataConfig.source`` is one of

* ``bundled:sotu`` — 233 State of the Union addresses shipped in ``elf_core/corpus`` (CC0), field ``text``;
* a ``.jsonl`` / ``.jsonl.gz`` file (one JSON object per line; blank lines are skipped);
* a ``.txt`` / ``.txt.gz`` file (one document per non-empty line, stored under ``DataConfig.text_field``);
* a directory written by ``datasets.save_to_disk`` (a ``Dataset`` or a ``DatasetDict``);
* any other string: a Hugging Face hub dataset, ``name`` or ``name:config`` (``datasets.load_dataset``).

Files are read as bytes and decoded here so that every problem names the file, the line and, for bad
UTF-8, the byte offset. Nothing in this module tokenises; data.py does.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from elf_core.errors import ElfError

log = logging.getLogger(__name__)

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
BUNDLED = {"sotu": CORPUS_DIR / "sotu.jsonl.gz"}
_FILE_FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".txt": "txt", ".txt.gz": "txt"}
# A missing path with one of these endings is a missing file, not a hub dataset name.
_DATA_SUFFIXES = {".json", ".csv", ".tsv", ".parquet", ".arrow", ".gz", ".zst", ".txt", ".jsonl"}


class DataError(ElfError, ValueError):
    """Unusable training data; the message names the source (file, line, row, column) at fault."""


@dataclass(frozen=True)
class Source:
    """A resolved ``DataConfig.source``. ``kind``: file | disk | hub."""

    spec: str  # as written in the config
    kind: str
    path: Optional[Path] = None  # file / disk
    fmt: Optional[str] = None  # file: jsonl | txt
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None

    def signature(self) -> dict:
        """What identifies the content for caching: name + size/mtime of the file(s)."""
        if self.kind == "hub":
            return {"hub": self.hub_name, "config": self.hub_config}
        assert self.path is not None
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.rglob("*") if p.is_file())
        return {"path": str(self.path),
                "files": [(str(f.relative_to(self.path)) if f != self.path else "", f.stat().st_size,
                           f.stat().st_mtime_ns) for f in files]}


def _file_format(path: Path) -> Optional[str]:
    name = path.name.lower()
    for ext, fmt in _FILE_FORMATS.items():
        if name.endswith(ext):
            return fmt
    return None


def resolve_source(spec: str) -> Source:
    """Classify ``spec`` (see the module docstring); missing files and unknown formats are errors."""
    if spec.startswith("bundled:"):
        key = spec.split(":", 1)[1]
        if key not in BUNDLED:
            raise DataError(f"data source '{spec}': no bundled corpus '{key}'; available: "
                            f"{', '.join('bundled:' + k for k in sorted(BUNDLED))}")
        return Source(spec, "file", path=BUNDLED[key], fmt="jsonl")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
            raise DataError(f"data source '{spec}': directory {path} was not written by datasets.save_to_disk "
                            "(no state.json or dataset_dict.json)")
        return Source(spec, "disk", path=path.resolve())
    if path.exists():
        fmt = _file_format(path)
        if fmt is None:
            raise DataError(f"data source '{spec}': unsupported file type {path.name}; use one of "
                            f"{', '.join(_FILE_FORMATS)} or a save_to_disk directory")
        return Source(spec, "file", path=path.resolve(), fmt=fmt)
    if _file_format(path) is not None or spec.startswith((".", "/", "~")) or path.suffix.lower() in _DATA_SUFFIXES:
        raise DataError(f"data source '{spec}': file not found: {path}")
    name, _, config = spec.partition(":")
    return Source(spec, "hub", hub_name=name, hub_config=config or None)


# ----------------------------------------------------------------------------------------------
# Files
def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def iter_file_rows(path: Path, fmt: str, text_field: str = "text") -> Iterator[tuple[str, dict]]:
    """Yield ``(location, row)`` for each non-blank line, location = ``"<file>:<line>"``."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    n_rows = 0
    offset = 0  # byte offset of the current line (in the decompressed stream for .gz)
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: line {lineno}: not valid UTF-8 at byte offset {start + e.start}"
                                    f"{' of the decompressed text' if path.name.endswith('.gz') else ''} "
                                    f"({e.reason})") from None
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                if fmt == "txt":
                    row = {text_field: line}
                else:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
                n_rows += 1
                yield where, row
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; truncated .gz raises EOFError
        raise DataError(f"{path}: cannot read: {type(e).__name__}: {e}") from None
    if n_rows == 0:
        raise DataError(f"{path}: file has no rows (only blank lines)")


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets (save_to_disk dirs and the hub)
def _pick_split(names: list[str], split: str, where: str) -> str:
    if split in names:
        return split
    if len(names) == 1:  # official data repos hold one split named after the repo, e.g. ..._validation_t5
        log.warning("%s has a single split '%s'; using it for requested split '%s'", where, names[0], split)
        return names[0]
    raise DataError(f"{where}: no split '{split}'; available splits: {names}")


def looks_like_saved_arrow(ds) -> bool:
    """A hub repo uploaded from ``save_to_disk`` loads as one row of ``_``-prefixed metadata columns."""
    return len(ds) == 1 and all(c.startswith("_") for c in ds.column_names)


def load_hf_dataset(src: Source, split: str):
    """The requested split of a ``disk`` or ``hub`` source as a ``datasets.Dataset``."""
    import datasets

    if src.kind == "disk":
        try:
            ds = datasets.load_from_disk(str(src.path))
        except Exception as e:
            raise DataError(f"{src.path}: datasets.load_from_disk failed: {type(e).__name__}: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[_pick_split(list(ds.keys()), split, str(src.path))]
        return ds

    where = f"hub dataset '{src.hub_name}'" + (f" (config '{src.hub_config}')" if src.hub_config else "")
    try:
        names = datasets.get_dataset_split_names(src.hub_name, src.hub_config)
        chosen = _pick_split(names, split, where)
        ds = datasets.load_dataset(src.hub_name, src.hub_config, split=chosen)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"data source '{src.spec}': could not load {where} split '{split}': {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}. No local file or directory has that name; "
            "the hub dataset may not exist, or the hub is unreachable (offline machines: use bundled:sotu, "
            "a .jsonl/.txt file or a save_to_disk dir)"
        ) from e
    if looks_like_saved_arrow(ds):  # as the official loader does for the released pre-tokenised data
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=src.hub_name, repo_type="dataset")
        ds = datasets.load_from_disk(local)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[_pick_split(list(ds.keys()), split, where)]
    return ds
