"""Where ELF Lab keeps what it writes: the root that relative paths of configs and CLIs resolve under
(outputs, checkpoints, data cache, the default MLflow store) — the same for every entry point, so
``evaluate.py`` and the sweeps find what ``train.py`` wrote.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"
DEFAULT_CONFIG = EXPERIMENTS_DIR / "local_default.yaml"  # the embedded default


def runs_root() -> Path:
    """``$ELF_LAB_ROOT`` if set, else this checkout — except when the code runs from a
    ``ray job submit --working-dir`` upload, a temporary copy Ray deletes: then ``~/elf-lab``."""
    if os.environ.get("ELF_LAB_ROOT"):
        return Path(os.environ["ELF_LAB_ROOT"]).expanduser().resolve()
    if "working_dir_files" in PROJECT_ROOT.parts or "runtime_resources" in PROJECT_ROOT.parts:
        return Path.home() / "elf-lab"
    return PROJECT_ROOT


def under_root(path: str | Path) -> Path:
    """``path`` as given when absolute (``~`` expanded), else under :func:`runs_root`."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else runs_root() / p


def in_checkout(path: str | Path) -> Path:
    """A file shipped with the code (a base YAML, a sweep space): ``path`` as given when absolute, else
    under the checkout — not the runs root, which may be elsewhere."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


def absolutise(cfg) -> None:
    """Make the config's relative paths absolute under :func:`runs_root` (Ray workers run in other
    directories); URIs (``s3://…``) are left as they are."""
    for section, key in (("data", "cache_dir"), ("train", "output_dir"), ("ray", "storage_path")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and "://" not in value:
            setattr(obj, key, str(under_root(value)))
    # Files the evaluator beside training reads, in a Ray actor whose working directory is not the
    # user's: a relative path that names a file here (or in the checkout) becomes absolute. Anything
    # else (a hub dataset name, a URI) is left for the loader to resolve or refuse.
    for key in ("sampling", "references"):
        value = getattr(cfg.eval, key)
        if value and "://" not in value and not Path(value).is_absolute():
            for candidate in (Path(value), PROJECT_ROOT / value):
                if candidate.exists():
                    setattr(cfg.eval, key, str(candidate.resolve()))
                    break
