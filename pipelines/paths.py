"""Where ELF Lab keeps what it writes: the root that relative paths of configs and CLIs resolve under
(outputs, checkpoints, data cache, the default MLflow store) — the same for every entry point, so
``evaluate.py`` and the sweeps find what ``train.py`` wrote.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def runs_root() -> Path:
    """``$ELF_LAB_ROOT`` if set, else this checkout — except when the code runs from a
    ``ray job submit --working-dir`` upload, a temporary copy Ray deletes: then ``~/elf-lab``."""
    if os.environ.get("ELF_LAB_ROOT"):
        return Path(os.environ["ELF_LAB_ROOT"]).expanduser().resolve()
    if "working_dir_files" in PROJECT_ROOT.parts or "runtime_resources" in PROJECT_ROOT.parts:
        return Path.home() / "elf-lab"
    return PROJECT_ROOT
