"""The one error base class of ELF Lab.

:class:`ElfError` marks a problem the user can fix — a bad config value, a missing file, an unusable
checkpoint, an unreachable store — whose message is the whole story: one line that names the key,
the file (and line) or the URI at fault and what to do. Every ELF Lab error derives from it, in
``elf_core`` and in ``pipelines``, so the command-line entry points have one rule: an ``ElfError`` is
printed as that line with exit status 2; anything else is a bug and gets its traceback (exit 1).
"""

from __future__ import annotations


class ElfError(Exception):
    """Bad input or an unusable resource; the message names what is at fault and how to fix it."""


__all__ = ["ElfError"]
