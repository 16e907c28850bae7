"""Which ELF Lab checkpoints a directory holds: listing the complete ones (a run's storage holds
``<name>/attempt-*/checkpoint_*``), the newest one, and rotation that keeps the newest N.

Split from :mod:`elf_core.checkpoint` (writing and reading one checkpoint); a checkpoint is
complete when its ``meta.json`` exists, since that file is written last and the directory is
renamed into place atomically. ``pipelines/remote_checkpoints.py`` applies the same rules to
object storage.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Optional

from elf_core.checkpoint import META_FILE, read_meta


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, ascending by step: directly under it,
    or one level down (a training run's storage holds ``<name>/attempt-*/checkpoint_*``).

    Hidden directories (temp / old / being-deleted) and directories without ``meta.json`` are not
    checkpoints and are skipped; a ``meta.json`` that does not parse is an error, not a skip, so a
    damaged newest checkpoint is never silently passed over for an older one.
    """
    base = Path(root)
    if not base.is_dir():
        return []
    found = []
    for child in base.iterdir():
        if child.name.startswith(".") or not child.is_dir():
            continue
        if (child / META_FILE).is_file():
            found.append((read_meta(child / META_FILE)["step"], child))
            continue
        for grandchild in child.iterdir():
            if not grandchild.name.startswith(".") and (grandchild / META_FILE).is_file():
                found.append((read_meta(grandchild / META_FILE)["step"], grandchild))
    return sorted(found, key=lambda sp: (sp[0], str(sp[1])))


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The complete checkpoint under ``root`` with the highest step, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def rotate_checkpoints(root: str | Path, keep: int, protect: Iterable[str | Path] = ()) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints (by step) under ``root``; return what was removed.

    ``protect`` names directories never deleted (e.g. the best checkpoint). Each victim is first
    renamed to a hidden name, so a half-deleted directory can never look like a checkpoint.
    """
    if keep < 1:
        raise ValueError(f"rotate_checkpoints: keep must be >= 1, got {keep}")
    protected = {Path(p).resolve() for p in protect}
    found = list_checkpoints(root)
    removed = []
    for _, path in found[:-keep]:
        if path.resolve() in protected:
            continue
        doomed = path.parent / f".{path.name}.del-{uuid.uuid4().hex[:12]}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path)
    return removed


__all__ = ["list_checkpoints", "latest_checkpoint", "rotate_checkpoints"]
