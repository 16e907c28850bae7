"""The one command-line convention of ELF Lab's entry points (``elf-train``, ``elf-eval``,
``elf-sweep``, ``elf-ablate`` and their ``python pipelines/… / experiments/…`` forms).

* The same flag means the same thing everywhere: ``--checkpoint``, ``--task``, ``--num-samples``
  (texts generated per sampling config), ``--weights``, ``--evaluator`` (default ``auto``),
  ``--ray-address``, ``--tracking-uri``, ``--threads``. Each is defined once, in :data:`FLAGS`.
* Settings are typed configs overridden by positional OmegaConf dot-lists (``section.key=value``).
* Exit status: 0 done, 2 bad input (an :class:`~elf_core.errors.ElfError`: its one-line message,
  no traceback), 130 interrupted (Ctrl-C), 1 anything unexpected (with its traceback).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional, Sequence

from elf_core.errors import ElfError
from pipelines.evaluation.choices import EVALUATOR_DTYPES, TASKS, WEIGHTS


# name -> (argparse flags, keyword arguments): one definition per flag for every CLI.
FLAGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "checkpoint": (("--checkpoint",), dict(default=None, help=(
        "what to use: a checkpoint dir, a training storage dir (its newest checkpoint), s3://… or any pyarrow "
        "URI, models:/<name>/<version|latest>, models:/<name>@<alias>, runs:/<run id>[/checkpoint], or an "
        "official ELF checkpoint (file, dir or hub id)"))),
    "task": (("--task",), dict(default=None, choices=TASKS, help="default: the checkpoint's data.task")),
    "num_samples": (("--num-samples",), dict(type=int, default=None, metavar="N",
                                             help="texts generated per sampling config (default: sample.num_samples)")),
    "weights": (("--weights",), dict(default="auto", choices=tuple(WEIGHTS),
                                     help="auto (default): EMA once step >= 1/(1-ema_decay), else the raw weights")),
    "evaluator": (("--evaluator",), dict(default="auto", help=(
        "Gen-PPL model: auto (default; gpt2-large in fp32 when loadable, else the offline smollm2 proxy, "
        "announced), gpt2-large, smollm2, a hub name, a save_pretrained dir or a .gguf file"))),
    "evaluator_dtype": (("--evaluator-dtype",), dict(default="float32", choices=EVALUATOR_DTYPES,
                                                    help="evaluator precision (default float32, as the paper)")),
    "ray_address": (("--ray-address",), dict(default=None, metavar="ADDR", help=(
        "Ray cluster (default: RAY_ADDRESS, else a fresh local Ray); e.g. http://head:8265 or auto"))),
    "tracking_uri": (("--tracking-uri",), dict(default=None, metavar="URI", help=(
        "MLflow store (default: MLFLOW_TRACKING_URI, else <root>/mlruns/mlflow.db; root = $ELF_LAB_ROOT or the "
        "checkout)"))),
    "threads": (("--threads",), dict(type=int, default=None, metavar="N", help=(
        "torch CPU threads (default: torch's choice). On a busy 2-core machine 1 can be several times faster"))),
    "overrides": (("overrides",), dict(nargs="*", metavar="key=value", help="config overrides (OmegaConf dot-lists)")),
}


def from_the_yaml(section: str, *names: str) -> dict[str, dict[str, Any]]:
    """``add_flags`` changes for a CLI whose YAML also sets these flags (a sweep space's ``scoring``):
    unset, the flag is None and the YAML's value stands (the YAML's own default is the flag's)."""
    return {n: {"default": None, "help": f"{FLAGS[n][1]['help']}. Unset: the YAML's {section}.{n}"} for n in names}


def at_least(low: float, kind: Callable[[str], Any] = float, *, open_low: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: a number >= ``low`` (> ``low`` when ``open_low``); anything else is a
    usage error naming the flag (exit 2), not a traceback from deep inside."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < low or (open_low and value == low):
            raise argparse.ArgumentTypeError(f"{text} is not {'>' if open_low else '>='} {low:g}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_flags(parser: argparse.ArgumentParser, *names: str, **changes: dict[str, Any]) -> None:
    """Add the named :data:`FLAGS`; ``changes`` adjusts one's keywords (e.g. ``overrides={"help": …}``)."""
    for name in names:
        flags, kwargs = FLAGS[name]
        parser.add_argument(*flags, **{**kwargs, **changes.get(name, {})})


class _Parser(argparse.ArgumentParser):
    """Overrides may come anywhere on the line (``--config X a=1 --fresh b=2``): intermixed parsing,
    except for a parser with subcommands (argparse cannot intermix those)."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._subparsers is not None:
            return super().parse_args(args, namespace)
        return self.parse_intermixed_args(args, namespace)


def parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def set_threads(n: Optional[int]) -> None:
    if n is None:
        return
    if n < 1:
        raise ElfError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)


def run_main(fn: Callable[[Sequence[str]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run an entry point under the exit-status rule of this module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return fn(argv)
    except ElfError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


__all__ = ["FLAGS", "from_the_yaml", "at_least", "add_flags", "parser", "set_threads", "run_main"]
