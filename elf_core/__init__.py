"""ELF Lab core library (pure torch + transformers). Submodules are imported lazily."""

from typing import Any

_LAZY = {"load_official_checkpoint": "elf_core.official"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'elf_core' has no attribute '{name}'")


__all__ = list(_LAZY)
