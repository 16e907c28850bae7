"""A disk cache of the frozen encoder's latents for a tokenised dataset (``data.cache_latents``).

The encoder is deterministic (eval mode, no dropout), so for a row whose encoder mask does not
depend on the step's draws — every unconditional row, and conditional rows that are not
label-dropped — the latents ``x0 = (h − μ)/σ`` are a pure function of the collated row. They are
computed once, stored next to the token cache (``data.cache_dir``) as one ``.npy`` array
(N, S, D) that is memory-mapped read-only, so several workers on a machine share one copy in the
page cache, and handed to the step as ``batch["latents"]`` (:func:`elf_core.flow.encode_for_step`
re-encodes only the label-dropped rows live).

The file name carries a key over everything that decides the numbers: the encoder's weights
(a hash of its state dict), its config, compute mode (fp32 on CPU, bf16 autocast on CUDA) and the
latent normalisation; the tokenised dataset's fingerprint and length; the collator's settings;
the storage dtype. A different encoder, dataset or normalisation can never reuse a cache.

Storage dtype (``data.latent_cache_dtype``): float16 (default), bfloat16 (kept as raw uint16
bits, numpy has no bfloat16) or float32. tests/core/test_latent_cache.py pins how far the training
loss moves from the live encoder's: float32 ≤ 1e-5 relative, float16 ≤ 2e-3, bfloat16 ≤ 1e-2.

A cache that would not fit on disk (``shutil.disk_usage``) or in the memory available now
(``MemAvailable`` in /proc/meminfo) is refused with an error naming ``data.cache_latents``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from elf_core.config import DataConfig
from elf_core.errors import ElfError

CACHE_FORMAT_VERSION = 1
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {  # storage dtype -> (torch view, numpy storage)
    "float16": (torch.float16, np.dtype(np.float16)),
    "bfloat16": (torch.bfloat16, np.dtype(np.uint16)),
    "float32": (torch.float32, np.dtype(np.float32)),
}
ProgressFn = Callable[[int, int], None]  # (rows done, rows total)


class LatentCacheError(ElfError, ValueError):
    """A latent cache that cannot be built or used; the message names ``data.cache_latents``."""


# ----------------------------------------------------------------------------------------------
# Identity
def encoder_fingerprint(encoder) -> str:
    """A hash of a :class:`~elf_core.encoder.FrozenEncoder`: every weight (name, dtype, shape,
    bytes), the model config, its compute mode on its device, and the latent normalisation."""
    h = hashlib.sha256()
    model = encoder.model
    h.update(type(model).__name__.encode())
    h.update(model.config.to_json_string(use_diff=False).encode())
    device = encoder.device
    compute = "cuda-bf16" if device.type == "cuda" and encoder.dtype_mode in ("auto", "bfloat16") else "fp32"
    h.update(json.dumps([device.type, compute, encoder.latent_mean, encoder.latent_std]).encode())
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def cache_key(dataset, collator, encoder, dtype: str) -> dict[str, Any]:
    """Everything that decides a cache's content (hashed into its file name)."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is None:
        raise LatentCacheError(f"data.cache_latents: dataset {type(dataset).__name__} has no fingerprint "
                               "(use the datasets.Dataset from elf_core.data.build_dataset)")
    return dict(version=CACHE_FORMAT_VERSION, dataset=fingerprint, rows=len(dataset), collator=repr(collator),
                encoder=encoder_fingerprint(encoder), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Fit checks
def available_memory_bytes() -> int:
    """Memory available to new allocations now: ``MemAvailable`` from /proc/meminfo (Linux), else
    the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cache_bytes(rows: int, seq_len: int, dim: int, dtype: str) -> int:
    return rows * seq_len * dim * DTYPES[dtype][1].itemsize


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def check_fits(n_bytes: int, directory: Path, *, need_disk: bool) -> None:
    """Refuse a cache of ``n_bytes`` that would not fit in available memory (or, when it is still to
    be written, on the disk holding ``directory``)."""
    what = f"data.cache_latents: the latent cache needs {_gb(n_bytes)}"
    fix = "; set data.cache_latents=false, a smaller data.latent_cache_dtype, or lower data.max_rows"
    if need_disk:
        probe = directory
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if n_bytes > free:
            raise LatentCacheError(f"{what} but {probe} has {_gb(free)} free on disk{fix}")
    avail = available_memory_bytes()
    if n_bytes > avail:
        raise LatentCacheError(f"{what} but only {_gb(avail)} of memory is available (the cache is read "
                               f"at random offsets every step and must stay in the page cache){fix}")


# ----------------------------------------------------------------------------------------------
@dataclass
class LatentCache:
    """The cached latents of a dataset: ``rows(indices)`` gives ``batch["latents"]``."""

    path: Path
    array: np.ndarray  # (N, S, D) read-only memmap in the storage dtype (bfloat16: raw uint16 bits)
    dtype: str
    key: dict[str, Any]

    def __len__(self) -> int:
        return self.array.shape[0]

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        """(len(indices), S, D) latents of those dataset rows, on the CPU in the storage dtype
        (the step casts them to float32 on its device)."""
        picked = np.ascontiguousarray(self.array[np.asarray(indices, dtype=np.int64)])
        if self.dtype == "bfloat16":  # raw bits: through int16, which torch and numpy share
            return torch.from_numpy(picked.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(picked)


def _rows_of(dataset, start: int, end: int) -> list[dict[str, Any]]:
    cols = dataset[start:end]
    return [{k: v[j] for k, v in cols.items()} for j in range(end - start)]


def build_latent_cache(dataset, collator, encoder, cache_dir: str | Path, *, dtype: str = "float16",
                       batch_size: int = 32, progress: bool | ProgressFn = True) -> LatentCache:
    """Load the cache for ``dataset`` (rows collated by ``collator``, encoded by ``encoder``) from
    ``cache_dir``, building it first if it is not there.

    Building encodes ``batch_size`` rows at a time under each row's own encoder mask and writes a
    temporary file renamed into place at the end, so concurrent builders are safe (the last rename
    wins with identical content). In a multi-worker job let one worker per machine build it, then
    barrier, then the others load it. ``progress``: a tqdm bar (True), none (False), or a callable
    ``(rows done, rows total)``.
    """
    if dtype not in DTYPES:
        raise LatentCacheError(f"data.latent_cache_dtype='{dtype}' is not one of {sorted(DTYPES)}")
    if len(dataset) == 0:
        raise LatentCacheError("data.cache_latents: the dataset has no rows")
    key = cache_key(dataset, collator, encoder, dtype)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    directory = Path(cache_dir).expanduser()
    path = directory / f"latents-{digest}.npy"
    shape = (len(dataset), collator.max_length, encoder.dim)
    n_bytes = cache_bytes(*shape, dtype)
    if not path.is_file():
        check_fits(n_bytes, directory, need_disk=True)
        _write(path, shape, dataset, collator, encoder, dtype, batch_size, progress)
        path.with_suffix(".json").write_text(json.dumps(key, indent=1, sort_keys=True))
    else:
        check_fits(n_bytes, directory, need_disk=False)
    array = np.load(path, mmap_mode="r")
    if array.shape != shape or array.dtype != DTYPES[dtype][1]:
        raise LatentCacheError(f"data.cache_latents: {path} holds {array.dtype} {array.shape}, expected "
                               f"{DTYPES[dtype][1]} {shape}; delete the file to rebuild it")
    return LatentCache(path, array, dtype, key)


@torch.no_grad()
def _write(path: Path, shape: tuple[int, int, int], dataset, collator, encoder, dtype: str, batch_size: int,
           progress: bool | ProgressFn) -> None:
    from tqdm.auto import tqdm

    torch_dtype, np_dtype = DTYPES[dtype]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    bar = tqdm(total=shape[0], desc="caching latents", unit=" rows", disable=progress is not True)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape)
        for start in range(0, shape[0], batch_size):
            end = min(start + batch_size, shape[0])
            batch = collator(_rows_of(dataset, start, end))
            x0 = encoder.encode(batch["input_ids"], batch["encoder_mask"]).to(torch_dtype).cpu()
            out[start:end] = x0.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else x0.numpy()
            bar.update(end - start)
            if callable(progress):
                progress(end, shape[0])
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)


def latent_cache_for(cfg: DataConfig, dataset, collator, encoder, *,
                     progress: bool | ProgressFn = True) -> Optional[LatentCache]:
    """The cache the config asks for: None unless ``data.cache_latents``; else
    :func:`build_latent_cache` in ``data.cache_dir`` with ``data.latent_cache_dtype``."""
    if not cfg.cache_latents:
        return None
    return build_latent_cache(dataset, collator, encoder, cfg.cache_dir, dtype=cfg.latent_cache_dtype,
                              progress=progress)
