"""Import checkpoints of the official PyTorch port (branch ``pytorch_elf``) into an ELFNetwork.

The official ``save_checkpoint`` (pt:utils/checkpoint_utils.py:49-77) writes one file
``<output_dir>/checkpoint_<step>`` with ``torch.save`` of::

    {"params": unwrap_model(model).state_dict(),      # clean keys (train_utils.py:122-133)
     "ema_params1": {name: tensor},                    # dict over named_parameters (train_utils.py:44-46),
                                                       # updated in place by lerp (train_utils.py:136-142)
     "opt_state": optimizer.state_dict(), "lr_scheduler": LambdaLR.state_dict() | None,
     "step": int, "epoch": int, "dropout_rng": ByteTensor | None, "grad_accum_buffers": {name: tensor}}

Everything in it is tensors and primitive containers (a LambdaLR state dict stores ``lr_lambdas``
as ``[None]`` for plain lambdas), so it loads with ``torch.load(weights_only=True)`` — unlike the
official loader (checkpoint_utils.py:127). The official eval uses the EMA weights when present
(pt:generation.py:41-47). The released ``embedded-language-flows/ELF-*-torch`` hub repos are read
the way the official eval reads them: the newest ``checkpoint_*`` file in the (downloaded) directory
(checkpoint_utils.py:86-128). Parameter names are the same as :class:`ELFNetwork`'s, and the
architecture is inferred from tensor shapes (nothing else in the file describes it).
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from elf_core.checkpoint import MODEL_FILE, CheckpointError, build_network, clean_state_dict
from elf_core.config import MODEL_PRESETS, EncoderConfig, ExperimentConfig, ModelConfig, resolve
from elf_core.network import ELFNetwork

_CKPT_NAME = re.compile(r"^checkpoint_(\d+)$")


def _ffn_inner(hidden: int, mlp_ratio: float) -> int:
    """The official SwiGLU inner width: ``int(int(H · mlp_ratio) · 2/3)`` (pt:modules/layers.py:229)."""
    return int(int(hidden * mlp_ratio) * 2 / 3)


def infer_mlp_ratio(hidden: int, ffn_inner: int) -> float:
    """An ``mlp_ratio`` that reproduces the inner width F; 4.0 (the paper's) whenever it does."""
    if _ffn_inner(hidden, 4.0) == ffn_inner:
        return 4.0
    # mlp_hidden m must satisfy int(m · 2/3) == F: m lies in [1.5 F, 1.5 (F + 1)).
    for m in range(math.floor(1.5 * ffn_inner), math.ceil(1.5 * (ffn_inner + 1)) + 1):
        if int(m * 2 / 3) != ffn_inner:
            continue
        for ratio in (m / hidden, (m + 0.5) / hidden):  # the second guards float round-down of H·(m/H)
            if _ffn_inner(hidden, ratio) == ffn_inner:
                return ratio
    raise CheckpointError(f"no mlp_ratio gives a SwiGLU inner width of {ffn_inner} at hidden size {hidden}")


def _shape(state: Mapping[str, torch.Tensor], key: str, ndim: int, origin: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{origin}: parameter '{key}' is missing, so this is not an ELF checkpoint "
                              "(or it uses a variant without it, which ELF Lab does not support)")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{origin}: parameter '{key}' has shape {shape}, expected {ndim} dimensions")
    return shape


def infer_architecture(state: Mapping[str, torch.Tensor], origin: str = "state dict") -> tuple[ModelConfig, int, int]:
    """``(ModelConfig, latent_dim D, vocab_size V)`` read from the shapes of an official state dict.

    Works on meta tensors too (only shapes are read).
    """
    D, twoD = _shape(state, "self_cond_proj.weight", 2, origin)
    if twoD != 2 * D:
        raise CheckpointError(f"{origin}: 'self_cond_proj.weight' has shape {(D, twoD)}, expected (D, 2D)")
    bottleneck, _ = _shape(state, "text_proj.proj1.weight", 2, origin)
    H, _ = _shape(state, "text_proj.proj2.weight", 2, origin)
    block_ids = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not block_ids or block_ids != list(range(len(block_ids))):
        raise CheckpointError(f"{origin}: transformer blocks must be numbered 0..N-1, found {block_ids[:10]}")
    depth = len(block_ids)
    (head_dim,) = _shape(state, "blocks.0.attn.q_norm.weight", 1, origin)
    if H % head_dim:
        raise CheckpointError(f"{origin}: hidden size {H} is not a multiple of head_dim {head_dim} "
                              "('blocks.0.attn.q_norm.weight')")
    two_f, _ = _shape(state, "blocks.0.mlp.w12.weight", 2, origin)
    D_u, V = _shape(state, "unembed_kernel", 2, origin)
    if D_u != D:
        raise CheckpointError(f"{origin}: 'unembed_kernel' has shape {(D_u, V)}, expected ({D}, V)")
    _, n_time, _ = _shape(state, "t_emb_tokens", 3, origin)
    _, n_sc, _ = _shape(state, "self_cond_cfg_tokens", 3, origin)
    _, n_mode, _ = _shape(state, "mode_tokens", 3, origin)
    _, freq_dim = _shape(state, "t_embedder.mlp_0.weight", 2, origin)

    arch = dict(depth=depth, hidden_size=H, num_heads=H // head_dim)
    preset = next((name for name, p in MODEL_PRESETS.items() if p == arch), "ELF-B")
    cfg = ModelConfig(
        preset=preset, **arch, mlp_ratio=infer_mlp_ratio(H, two_f // 2), bottleneck_dim=bottleneck,
        num_time_tokens=n_time, num_sc_cfg_tokens=n_sc, num_mode_tokens=n_mode, freq_embed_dim=freq_dim,
    )
    return cfg, D, V


def _find_in_directory(directory: Path) -> Path:
    """The newest ``checkpoint_<step>`` file in a directory (the official eval's rule)."""
    found = sorted((int(m.group(1)), p) for p in directory.iterdir() if p.is_file() and (m := _CKPT_NAME.match(p.name)))
    if found:
        return found[-1][1]
    hint = ""
    if (directory / MODEL_FILE).is_file():
        hint = " — it looks like an ELF Lab checkpoint; load it with elf_core.checkpoint.load_checkpoint"
    listing = sorted(p.name for p in directory.iterdir())[:10]
    raise CheckpointError(f"{directory}: no official checkpoint file ('checkpoint_<step>') in this directory "
                          f"(contents: {listing}){hint}")


def _download(source: str) -> Path:
    """``owner/name[/sub/path]`` from the Hugging Face hub; a clear error when that is impossible."""
    parts = source.strip("/").split("/")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"'{source}' is not a local path, and huggingface_hub is not installed to "
                              "download it from the hub") from None
    patterns = [f"{sub}", f"{sub}/checkpoint_*"] if sub else ["checkpoint_*"]
    try:
        local = Path(snapshot_download(repo_id=repo_id, repo_type="model", allow_patterns=patterns))
    except Exception as e:
        raise CheckpointError(
            f"'{source}' is not a local path, and downloading hub repo '{repo_id}' "
            f"(files {patterns}) failed: {type(e).__name__}: {e}. If this machine is offline, download the "
            "checkpoint elsewhere and pass its local file or directory.") from None
    path = local / sub if sub else local
    if not path.exists():
        raise CheckpointError(f"hub repo '{repo_id}' has no '{sub}'")
    return path


def _torch_load(path: Path) -> Any:
    def attempt(mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return attempt(mmap=True)  # large files: only the tensors we keep get read
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return attempt(mmap=False)  # legacy (non-zip) torch.save format cannot be mmap'ed
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it pickles {found.group(1)}" if found else f"it pickles objects it does not allow ({str(e)[:200]})"
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refused this file: {what}, not only "
            f"tensors and primitive containers. Official checkpoints contain only tensors, numbers and "
            "dicts, so this file was written by something else. If you trust it, load it yourself with "
            "torch.load(path, weights_only=False) and pass the dict to load_official_checkpoint.") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read it as a torch.save file (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None


def _read_payload(source: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if isinstance(source, Mapping):
        return source, "official checkpoint dict"
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists():
        looks_like_hub = "://" not in text and not text.startswith(("/", ".", "~")) and text.count("/") >= 1
        if not looks_like_hub:
            raise CheckpointError(f"official checkpoint not found: {path}")
        path = _download(text)
    if path.is_dir():
        path = _find_in_directory(path)
    return _torch_load(path), str(path)


def load_official_checkpoint(path_or_state_dict: str | Path | Mapping[str, Any],
                             use_ema: bool = True) -> tuple[ELFNetwork, ExperimentConfig]:
    """``(model, config)`` from an official-port checkpoint: file, directory, hub id, or loaded dict.

    ``use_ema=True`` takes ``ema_params1`` (what the official eval samples with), else ``params``.
    The model is in eval mode on the CPU, fp32. The config carries the paper's default settings plus
    the inferred architecture; the task (OWT / De-En / XSum) is not recorded in the file — set it.
    """
    payload, origin = _read_payload(path_or_state_dict)
    if not isinstance(payload, Mapping) or not isinstance(payload.get("params"), Mapping):
        found = sorted(map(str, payload.keys()))[:12] if isinstance(payload, Mapping) else type(payload).__name__
        raise CheckpointError(f"{origin}: not an official ELF checkpoint — expected a dict with 'params' "
                              f"(and 'ema_params1', 'opt_state', 'step', ...), found {found}")
    key = "ema_params1" if use_ema else "params"
    weights = payload.get(key)
    if weights is None:
        raise CheckpointError(f"{origin}: has no '{key}' weights" +
                              ("; pass use_ema=False to load the raw 'params'" if use_ema else ""))
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{origin}: '{key}' is a {type(weights).__name__}; the official port stores a "
                              "dict {parameter name: tensor}")
    state = clean_state_dict(weights, f"{origin} ['{key}']")
    model_cfg, latent_dim, vocab_size = infer_architecture(state, f"{origin} ['{key}']")
    config = resolve(ExperimentConfig(name=f"official-{model_cfg.preset}", model=model_cfg,
                                      encoder=EncoderConfig(name="t5-small")), origin=origin)
    model = build_network(config.model, latent_dim, vocab_size, state, f"{origin} ['{key}']")
    return model.eval(), config


__all__ = ["load_official_checkpoint", "infer_architecture", "infer_mlp_ratio"]
