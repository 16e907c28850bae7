"""ELF Lab checkpoints: one directory per checkpoint, written atomically, loaded without pickle.

Layout of a checkpoint directory (design.md "Checkpoints")::

    model.safetensors   raw weights (wrapper prefixes ``module.`` / ``_orig_mod.`` stripped)
    ema.safetensors     EMA shadow weights (optional; ``meta.json`` says whether it must be there)
    state.pt            optimizer + lr-scheduler state, step, epoch, data position, RNG states, extra;
                        only tensors and primitive containers, so ``torch.load(weights_only=True)`` reads it
    config.yaml         the resolved ExperimentConfig (``elf_core.config.to_yaml``)
    meta.json           format version, step, param count, created time, latent_dim, vocab_size, file sizes

Atomicity: everything is written into a hidden temp sibling (``.<name>.tmp-<id>``), fsync'ed, then
renamed into place; ``meta.json`` is written last, so a directory without it is not a checkpoint.
A crash at any point leaves the previous checkpoint loadable, and
the run listing (``pipelines.checkpoints``) never picks a hidden or incomplete directory. Every load error names the file at fault; a failed load
raises — it never silently starts from scratch (the official port does, pt:train.py:252-254).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file as _st_load_file, save_file as _st_save_file

from elf_core.errors import ElfError
from elf_core.config import ConfigError, ExperimentConfig, ModelConfig, from_yaml_text, to_yaml
from elf_core.network import ELFNetwork, count_parameters
from elf_core.parallel import is_sharded, load_full_model_state, shard_optimizer_state

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# ModelConfig fields that do not change the function the weights compute.
_NON_ARCH_FIELDS = {"preset", "gradient_checkpointing"}


class CheckpointError(ElfError, RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file (and key) at fault."""


# ----------------------------------------------------------------------------------------------
# Helpers shared with elf_core.official
def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers, in any nesting."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


def strip_prefixes(key: str) -> str:
    """``module._orig_mod.blocks.0...`` -> ``blocks.0...`` (wrapper prefixes, repeatedly)."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def clean_state_dict(state: Mapping[str, Any], origin: str) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes from every key; every value must be a tensor; no two keys may collide."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{origin}: entry '{key}' is a {type(value).__name__}, expected a tensor")
        clean = strip_prefixes(str(key))
        if clean in out:
            raise CheckpointError(f"{origin}: keys collide after stripping wrapper prefixes: '{clean}'")
        out[clean] = value
    return out


def architecture_diff(a: ModelConfig, b: ModelConfig, a_name: str = "checkpoint", b_name: str = "model") -> list[str]:
    """Human-readable ``field: a vs b`` lines for the architecture fields that differ."""
    diffs = []
    for f in fields(ModelConfig):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va != vb and (f.name == "preset" or f.name not in _NON_ARCH_FIELDS):
            diffs.append(f"model.{f.name}: {va!r} ({a_name}) vs {vb!r} ({b_name})")
    return diffs


def build_network(cfg: ModelConfig, latent_dim: int, vocab_size: int, state: Mapping[str, torch.Tensor],
                  origin: str) -> ELFNetwork:
    """An ELFNetwork holding exactly ``state`` (fp32), without paying for a random init first."""
    with torch.device("meta"):
        net = ELFNetwork(cfg, latent_dim, vocab_size)
    check_shapes(net, state, origin, hint=None)
    target = net.state_dict()
    # Copy (also out of mmap'ed / foreign-dtype storage) into the parameter dtype, then adopt.
    owned = {k: state[k].to(dtype=target[k].dtype, device="cpu", copy=True) for k in target}
    net.load_state_dict(owned, strict=True, assign=True)
    for name, t in list(net.named_parameters()) + list(net.named_buffers()):
        if t.is_meta:  # a tensor the state dict did not cover (e.g. a future non-persistent buffer)
            raise CheckpointError(f"{origin}: '{name}' was not restored (still on the meta device)")
    return net


def check_shapes(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str,
                 hint: Optional[str], allow_missing: bool = False) -> None:
    """Same keys and shapes as ``model.state_dict()``, or a CheckpointError naming each difference."""
    target = model.state_dict()
    problems = []
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing and not allow_missing:
        problems.append(f"missing parameters: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected parameters: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for k, t in target.items():  # in the model's order: input layers first, then blocks, then heads
        if k in state and tuple(state[k].shape) != tuple(t.shape):
            problems.append(f"'{k}': shape {tuple(state[k].shape)} in the checkpoint vs {tuple(t.shape)} in the model")
    if problems:
        more = len(problems) - 12
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {more} more" if more > 0 else "")
        msg = f"{origin} does not fit the model:\n  {shown}"
        if hint:
            msg += f"\n{hint}"
        raise CheckpointError(msg)


# ----------------------------------------------------------------------------------------------
def checkpoint_path(root: str | Path, step: int) -> Path:
    """The conventional directory for ``step`` under ``root``: ``root/step_00001000``."""
    return Path(root) / f"step_{int(step):08d}"


def _check_plain(obj: Any, where: str) -> None:
    """Only what ``torch.load(weights_only=True)`` accepts: tensors and primitive containers."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} cannot be stored in {STATE_FILE}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored in {STATE_FILE} "
                    "(only tensors, numbers, strings, None, lists, tuples and dicts load with weights_only=True)")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data files are synced already
        pass
    finally:
        os.close(fd)


def _tensors_for_file(state: Mapping[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    clean = clean_state_dict(state, origin)
    # safetensors refuses shared storage; clone only when a tensor is a view of a bigger storage.
    out = {}
    for k, v in clean.items():
        v = v.detach().to("cpu")
        if not v.is_contiguous() or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.contiguous().clone()
        out[k] = v
    return out


def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    config: ExperimentConfig,
    ema_state: Optional[Mapping[str, torch.Tensor]] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    step: int,
    epoch: int = 0,
    data_position: Optional[Mapping[str, int]] = None,
    generators: Optional[Mapping[str, torch.Generator]] = None,
    extra: Optional[Mapping[str, Any]] = None,
    model_state: Optional[Mapping[str, torch.Tensor]] = None,
    optimizer_state: Optional[Mapping[str, Any]] = None,
    run: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    ``model_state`` / ``optimizer_state`` replace ``model.state_dict()`` / ``optimizer.state_dict()``:
    an FSDP2-sharded model must pass them, gathered to one rank with
    :func:`elf_core.parallel.gather_full_state` (checkpoints are always unsharded).
    ``run`` (e.g. ``{"name": ..., "mlflow_run_id": ...}``) is recorded in ``meta.json`` as ``run``: which
    run wrote the checkpoint, readable without loading any tensor (also from object storage).

    If ``directory`` already holds a checkpoint it is replaced (the old one stays until the new one
    is complete); a non-empty directory that is *not* a checkpoint is refused rather than deleted.
    """
    target = Path(directory)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not (target / META_FILE).is_file() and (not target.is_dir() or any(target.iterdir())):
        raise CheckpointError(f"{target} exists and is not an ELF Lab checkpoint (no {META_FILE}); refusing to replace it")

    inner = unwrap_model(model)
    if isinstance(inner, ELFNetwork):
        diffs = architecture_diff(config.model, inner.cfg, "config", "model")
        if [d for d in diffs if not d.startswith("model.preset")]:
            raise CheckpointError(f"{target}: the config does not describe the model being saved:\n  " + "\n  ".join(diffs))
    if model_state is None and is_sharded(inner):
        raise CheckpointError(f"{target}: the model is FSDP2-sharded; pass model_state= (and optimizer_state=) "
                              "gathered with elf_core.parallel.gather_full_state")
    weights = _tensors_for_file(model_state if model_state is not None else inner.state_dict(), f"{target}/{MODEL_FILE}")
    ema = _tensors_for_file(ema_state, f"{target}/{EMA_FILE}") if ema_state is not None else None
    if ema is not None:
        stray = [k for k in ema if k not in weights]
        if stray:
            raise CheckpointError(f"{target}/{EMA_FILE}: EMA entries that are not model parameters: {stray[:8]}")

    position = dict(data_position or {})
    for k, v in position.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"data_position[{k!r}] = {v!r}: expected str keys and int values")
    state = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "epoch": int(epoch),
        "data_position": position,
        "optimizer": (dict(optimizer_state) if optimizer_state is not None
                      else optimizer.state_dict() if optimizer is not None else None),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": {
            "torch_cpu": torch.get_rng_state(),
            "generators": {name: g.get_state() for name, g in (generators or {}).items()},
            "generator_devices": {name: str(g.device) for name, g in (generators or {}).items()},
        },
        "extra": dict(extra or {}),
    }
    _check_plain(state, STATE_FILE)

    latent_dim = getattr(inner, "latent_dim", None)
    vocab_size = getattr(inner, "vocab_size", None)
    tmp = parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        _st_save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        if ema is not None:
            _st_save_file(ema, str(tmp / EMA_FILE), metadata={"format": "pt"})
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
        (tmp / CONFIG_FILE).write_text(to_yaml(config))
        files = [MODEL_FILE, STATE_FILE, CONFIG_FILE] + ([EMA_FILE] if ema is not None else [])
        for name in files:
            _fsync_file(tmp / name)
        meta = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "epoch": int(epoch),
            "param_count": count_parameters(inner),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "latent_dim": None if latent_dim is None else int(latent_dim),
            "vocab_size": None if vocab_size is None else int(vocab_size),
            "has_ema": ema is not None,
            "file_sizes": {name: (tmp / name).stat().st_size for name in files},
        }
        if run:
            meta["run"] = {str(k): str(v) for k, v in run.items()}
        with open(tmp / META_FILE, "w") as f:  # written last: its presence marks a complete checkpoint
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _move_into_place(tmp: Path, target: Path) -> None:
    """rename(tmp -> target); an existing target is moved aside first and deleted only afterwards."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:  # put the previous checkpoint back
            os.replace(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` read. ``model`` is the model the weights were loaded into (or built)."""

    path: Path
    config: ExperimentConfig
    step: int
    epoch: int
    data_position: dict[str, int]
    meta: dict[str, Any]
    model: Optional[nn.Module] = None
    ema_state: Optional[dict[str, torch.Tensor]] = None
    optimizer_state: Optional[dict[str, Any]] = None
    scheduler_state: Optional[dict[str, Any]] = None
    generator_states: dict[str, torch.Tensor] = field(default_factory=dict)
    global_rng_state: Optional[torch.Tensor] = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_meta(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata: {e}") from None
    return parse_meta(text, str(path))


def parse_meta(text: str, origin: str) -> dict[str, Any]:
    """The ``meta.json`` text of a checkpoint, checked (integer step, known format version);
    ``origin`` (a path or URI) names the file in errors. Shared with remote-storage listings."""
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{origin}: cannot read checkpoint metadata: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{origin}: not ELF Lab checkpoint metadata (no integer 'step')")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{origin}: format_version {meta['format_version']} is newer than this "
                              f"elf_core understands ({FORMAT_VERSION}); upgrade elf_core")
    return meta


def _check_size(path: Path, meta: dict[str, Any]) -> None:
    expected = (meta.get("file_sizes") or {}).get(path.name)
    actual = path.stat().st_size
    if expected is not None and actual != expected:
        raise CheckpointError(f"{path}: file is {actual} bytes but {META_FILE} recorded {expected} "
                              "(truncated or corrupt; the checkpoint cannot be used)")


def _read_safetensors(path: Path, meta: dict[str, Any], map_location: Any) -> dict[str, torch.Tensor]:
    _check_size(path, meta)
    try:
        return _st_load_file(str(path), device=str(map_location))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt): {e}") from None


def _read_state(path: Path, meta: dict[str, Any], map_location: Any) -> dict[str, Any]:
    _check_size(path, meta)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read training state (truncated, corrupt, or holds objects "
                              f"that weights_only=True refuses): {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not an ELF Lab training state (expected a dict with 'step')")
    return state


def _mismatch_hint(model: nn.Module, config: ExperimentConfig, meta: dict[str, Any]) -> str:
    if not isinstance(model, ELFNetwork):
        return "(the target model is not an ELFNetwork, so its config cannot be compared)"
    diffs = architecture_diff(config.model, model.cfg)
    for key in ("latent_dim", "vocab_size"):
        if meta.get(key) is not None and meta[key] != getattr(model, key):
            diffs.append(f"{key} (encoder width D / decode classes): {meta[key]} (checkpoint) vs {getattr(model, key)} (model)")
    if not diffs:
        return "(no architecture field of the configs differs)"
    return "config values that differ:\n  " + "\n  ".join(diffs)


def load_checkpoint(
    directory: str | Path,
    *,
    model: Optional[nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    generators: Optional[Mapping[str, torch.Generator]] = None,
    map_location: Any = "cpu",
    restore_global_rng: bool = False,
) -> LoadedCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, restoring into whatever is passed.

    ``model=None`` builds the ELFNetwork from the checkpoint's config and meta. ``generators`` are
    restored by name (each must be in the checkpoint). ``restore_global_rng`` also restores the global
    torch CPU RNG (off by default: a library call should not reseed the process unasked).
    """
    root = Path(directory)
    if root.is_file():
        raise CheckpointError(f"{root} is a file, not an ELF Lab checkpoint directory (a single-file checkpoint "
                              "of the official port loads with elf_core.load_official_checkpoint)")
    if not root.is_dir():
        aside = sorted(root.parent.glob(f".{root.name}.old-*")) if root.parent.is_dir() else []
        hint = f" (a crash while replacing it left the previous version at {aside[-1]})" if aside else ""
        raise CheckpointError(f"checkpoint directory not found: {root}{hint}")
    meta_path = root / META_FILE
    for name in (META_FILE, MODEL_FILE, STATE_FILE, CONFIG_FILE):
        if not (root / name).is_file():
            raise CheckpointError(f"{root / name}: missing from the checkpoint (incomplete or not an ELF Lab checkpoint)")
    meta = read_meta(meta_path)
    if meta.get("has_ema") and not (root / EMA_FILE).is_file():
        raise CheckpointError(f"{root / EMA_FILE}: missing, but {META_FILE} says the checkpoint has EMA weights")

    cfg_path = root / CONFIG_FILE
    try:
        config = from_yaml_text(cfg_path.read_text(), origin=str(cfg_path))
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: config does not parse: {e}") from None

    weights = _read_safetensors(root / MODEL_FILE, meta, map_location)
    if model is None:
        if meta.get("latent_dim") is None or meta.get("vocab_size") is None:
            raise CheckpointError(f"{meta_path}: no latent_dim/vocab_size recorded, so the model cannot be "
                                  "built from the checkpoint; pass model=")
        target = build_network(config.model, meta["latent_dim"], meta["vocab_size"], weights,
                               f"{root / MODEL_FILE}").to(map_location)
    else:
        target = unwrap_model(model)
        check_shapes(target, weights, str(root / MODEL_FILE), _mismatch_hint(target, config, meta))
        if is_sharded(target):  # FSDP2: keep this rank's shard of each full tensor
            load_full_model_state(target, weights, str(root / MODEL_FILE))
        else:
            target.load_state_dict(weights, strict=True)

    ema = None
    if (root / EMA_FILE).is_file():
        ema = _read_safetensors(root / EMA_FILE, meta, map_location)
        check_shapes(target, ema, str(root / EMA_FILE), _mismatch_hint(target, config, meta), allow_missing=True)

    state = _read_state(root / STATE_FILE, meta, map_location)
    if state["step"] != meta["step"]:
        raise CheckpointError(f"{root}: {STATE_FILE} says step {state['step']} but {META_FILE} says {meta['step']}")
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise CheckpointError(f"{root / STATE_FILE}: holds no optimizer state, but an optimizer was passed")
        try:
            opt_state = state["optimizer"]
            if model is not None and is_sharded(model):
                opt_state = shard_optimizer_state(optimizer, opt_state)
            optimizer.load_state_dict(opt_state)
        except Exception as e:
            raise CheckpointError(f"{root / STATE_FILE}: optimizer state does not fit this optimizer: {e}") from None
    if scheduler is not None:
        if state.get("scheduler") is None:
            raise CheckpointError(f"{root / STATE_FILE}: holds no lr-scheduler state, but a scheduler was passed")
        scheduler.load_state_dict(state["scheduler"])
    rng = state.get("rng") or {}
    saved_gens: dict[str, torch.Tensor] = {k: v.cpu() for k, v in (rng.get("generators") or {}).items()}
    for name, gen in (generators or {}).items():
        if name not in saved_gens:
            raise CheckpointError(f"{root / STATE_FILE}: no state for generator '{name}' "
                                  f"(saved generators: {sorted(saved_gens)})")
        gen.set_state(saved_gens[name])
    global_rng = rng.get("torch_cpu")
    if restore_global_rng:
        if global_rng is None:
            raise CheckpointError(f"{root / STATE_FILE}: no global RNG state saved")
        torch.set_rng_state(global_rng.cpu())

    return LoadedCheckpoint(
        path=root, config=config, step=int(state["step"]), epoch=int(state["epoch"]),
        data_position=dict(state.get("data_position") or {}), meta=meta, model=target, ema_state=ema,
        optimizer_state=state.get("optimizer"), scheduler_state=state.get("scheduler"),
        generator_states=saved_gens, global_rng_state=None if global_rng is None else global_rng.cpu(),
        extra=dict(state.get("extra") or {}),
    )


__all__ = [
    "CheckpointError", "LoadedCheckpoint", "save_checkpoint", "load_checkpoint", "checkpoint_path",
    "unwrap_model", "strip_prefixes", "parse_meta", "read_meta",
]
