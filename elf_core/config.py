"""Typed experiment configuration: structured OmegaConf dataclasses, presets, strict YAML loading.

An experiment is one YAML file plus dot-list overrides (``model.depth=2 optim.blr=1e-3``). The
dataclass defaults are the paper's OpenWebText ELF-B settings (reference §3.1, the YAML columns —
not the official ``config.py`` defaults, which train to word salad); task YAMLs change what their
task changes. Unknown keys and wrong types are errors that name the key and the file.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from elf_core.errors import ElfError
from elf_core.validation import check_values, ranged


class ConfigError(ElfError, ValueError):
    """A config that cannot be used; the message names the key and where it came from."""


# ----------------------------------------------------------------------------------------------
# Architecture presets: (depth, hidden_size, num_heads). Counts in reference §5.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "ELF-B": dict(depth=12, hidden_size=768, num_heads=12),
    "ELF-M": dict(depth=24, hidden_size=1056, num_heads=16),
    "ELF-L": dict(depth=32, hidden_size=1280, num_heads=16),
    # CPU-sized: trains in minutes on 2 cores, same architecture otherwise.
    "tiny": dict(depth=2, hidden_size=128, num_heads=4),
}


PRESET_NAMES = tuple(MODEL_PRESETS)
_POS = dict(ge=1)  # a count: at least 1
_PROB = dict(ge=0.0, le=1.0)


@dataclass
class ModelConfig:
    """The ELF transformer. ``depth``/``hidden_size``/``num_heads`` default to the preset's."""

    preset: str = ranged("ELF-B", choices=PRESET_NAMES)
    depth: Optional[int] = ranged(None, **_POS)
    hidden_size: Optional[int] = ranged(None, **_POS)
    num_heads: Optional[int] = ranged(None, **_POS)
    mlp_ratio: float = ranged(4.0, gt=0)  # SwiGLU hidden F = int(H * mlp_ratio * 2/3)
    bottleneck_dim: int = ranged(128, **_POS)
    num_time_tokens: int = ranged(4, ge=0)
    num_sc_cfg_tokens: int = ranged(4, ge=0)
    num_mode_tokens: int = ranged(4, ge=0)
    freq_embed_dim: int = ranged(256, ge=2)  # sinusoidal features fed to the time / SC-CFG MLPs
    rope_theta: float = ranged(10000.0, gt=0)
    norm_eps: float = ranged(1e-6, gt=0)
    gradient_checkpointing: bool = False


@dataclass
class EncoderConfig:
    """The frozen encoder that defines the latent space (and the tokenizer)."""

    name: str = "t5-small"  # HF hub name or local directory; T5 -> T5EncoderModel, else AutoModel
    tokenizer: Optional[str] = None  # None: the encoder's own (t5-small resolves to the vendored copy)
    latent_mean: float = 0.0
    latent_std: float = ranged(0.2, gt=0)
    dtype: str = ranged("auto", choices=("auto", "float32", "bfloat16"))  # auto: bf16 on CUDA, fp32 on CPU


@dataclass
class DataConfig:
    """Where training text comes from and how rows are built (reference §2.1)."""

    task: str = ranged("unconditional", choices=("unconditional", "conditional"))
    source: str = "bundled:sotu"  # bundled:sotu | HF hub name | load_from_disk dir | .jsonl | .txt
    eval_source: Optional[str] = None
    split: str = "train"
    eval_split: str = "validation"
    text_field: str = "text"  # unconditional raw text
    input_field: str = "input"  # conditional raw source text
    target_field: str = "target"  # conditional raw target text
    max_length: int = ranged(1024, **_POS)
    max_input_length: Optional[int] = ranged(None, **_POS)  # conditional: condition truncated to this
    pad_token: str = ranged("pad", choices=("pad", "eos"))  # pad (masked from the loss) | eos (supervised EOS tail)
    cache_dir: str = ".cache/elf_lab/data"
    max_rows: Optional[int] = ranged(None, **_POS)  # keep only the first N rows (quick experiments)
    # Encode the training rows once with the frozen encoder and reuse the latents (elf_core/latent_cache.py);
    # label-dropped rows are still encoded live. Refused when the cache would not fit on disk or in memory.
    cache_latents: bool = False
    latent_cache_dtype: str = ranged("float16", choices=("float16", "bfloat16", "float32"))  # storage dtype


@dataclass
class FlowConfig:
    """The flow-matching objective (spec §3, reference §2.4)."""

    time_schedule: str = ranged("logit_normal", choices=("logit_normal", "uniform"))
    p_mean: float = -1.5  # t = sigmoid(N(p_mean, p_std))
    p_std: float = ranged(0.8, gt=0)
    noise_scale: float = ranged(2.0, gt=0)  # z = t x + (1 - t) noise_scale eps
    t_eps: float = ranged(0.05, gt=0, le=1)  # v = (x - z) / max(1 - t, t_eps)
    decoder_prob: float = ranged(0.2, **_PROB)
    decoder_noise_scale: float = ranged(5.0, ge=0)
    decoder_p_mean: float = 0.8
    decoder_p_std: float = ranged(0.8, gt=0)
    self_cond_prob: float = ranged(0.5, **_PROB)
    sc_cfg_min: float = ranged(0.5, gt=-1)  # 1 + w log-uniform on [1 + min, 1 + max]
    sc_cfg_max: float = ranged(5.0, gt=-1)
    label_drop_prob: float = ranged(0.0, **_PROB)  # conditional CFG training


@dataclass
class OptimConfig:
    """Muon (2-D params) + Nesterov-Adam (the rest), warmup, clipping, EMA (reference §2.6)."""

    blr: float = ranged(1e-3, gt=0)  # lr = blr * global_batch_size / 256 unless lr is set
    lr: Optional[float] = ranged(None, gt=0)
    warmup_steps: int = ranged(5000, ge=0)
    warmup_epochs: Optional[float] = ranged(0.5, ge=0)  # when set, overrides warmup_steps
    muon_momentum: float = ranged(0.95, ge=0, lt=1)
    muon_ns_steps: int = ranged(5, **_POS)
    adam_b1: float = ranged(0.9, ge=0, lt=1)
    adam_b2: float = ranged(0.999, ge=0, lt=1)
    adam_eps: float = ranged(1e-8, gt=0)
    weight_decay: float = ranged(0.0, ge=0, le=0)  # the paper uses none; the optimizer has none
    grad_clip: float = ranged(1.0, gt=0)
    ema_decay: float = ranged(0.9999, ge=0, lt=1)
    # Names of 2-D parameters to put on Adam instead of Muon. The paper: none (Muon for every 2-D
    # parameter). The CPU default lists the 30k-way ``unembed_kernel``: Newton–Schulz on it costs
    # ~90 GFLOP per step, ~4 s on one core, more than the rest of a tiny step.
    adam_params: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """Run length, batching, precision, logging and checkpoint cadence."""

    global_batch_size: int = ranged(512, **_POS)
    epochs: float = ranged(5.0, gt=0)
    max_steps: Optional[int] = ranged(None, **_POS)  # when set, overrides epochs
    grad_accum_steps: int = ranged(1, **_POS)
    seed: int = ranged(42, ge=0)
    bf16: bool = True  # autocast on CUDA only
    compile: bool = False
    log_every: int = ranged(100, **_POS)
    checkpoint_every: int = ranged(1000, **_POS)
    keep_checkpoints: int = ranged(3, **_POS)  # complete checkpoints kept over all attempts of a run
    output_dir: str = "outputs"
    # Evaluation beside training (pipelines/training/evaluator.py): every N steps (a multiple of
    # checkpoint_every), or every E epochs (rounded to the nearest multiple of checkpoint_every).
    eval_every: Optional[int] = ranged(None, **_POS)
    eval_every_epochs: Optional[float] = ranged(None, gt=0)


@dataclass
class SampleConfig:
    """One sampling operating point (spec §4). gamma = 0 or sampler = ode is the ODE."""

    sampler: str = ranged("sde", choices=("ode", "sde"))
    steps: int = ranged(32, **_POS)
    gamma: float = ranged(1.5, ge=0)
    sc_cfg: float = ranged(3.0, ge=0)  # self-conditioning CFG scale w
    cfg: float = ranged(1.0, ge=0)  # conditional CFG scale c
    grid: str = ranged("logit_normal", choices=("logit_normal", "uniform"))
    num_samples: int = ranged(1000, **_POS)
    batch_size: int = ranged(64, **_POS)
    seed: int = ranged(0, ge=0)


@dataclass
class RayConfig:
    """How ``pipelines/train.py`` runs on Ray Train (ignored by elf_core itself)."""

    num_workers: int = ranged(2, **_POS)
    use_gpu: str = ranged("auto", choices=("auto", "true", "false"))  # auto: GPU when the cluster has one
    cpus_per_worker: int = ranged(1, **_POS)
    strategy: str = ranged("ddp", choices=("ddp", "fsdp2"))  # fsdp2: sharded params/grads/optimizer state
    storage_path: str = "outputs/ray"  # local dir, NFS mount or s3://… ; relative = under the project
    max_failures: int = ranged(2, ge=0)  # Ray Train restarts from the latest checkpoint this many times
    eval_cpus: float = ranged(1.0, ge=0)  # the evaluator beside training (train.eval_every): its own resources
    eval_gpus: float = ranged(0.0, ge=0)  # a fraction of a GPU is fine
    address: Optional[str] = None  # None: RAY_ADDRESS if set, else a local Ray instance


@dataclass
class TrackingConfig:
    """MLflow: where runs go and what the trained model is registered as."""

    uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<project>/mlruns/mlflow.db
    experiment: str = "elf/local"
    registered_model: Optional[str] = None  # None: "elf-" + name
    log_samples: int = ranged(8, ge=0)  # samples generated and logged at the start and the end of training


@dataclass
class EvalConfig:
    """What the evaluator beside training measures at each due checkpoint (``train.eval_every``)."""

    evaluator: str = "auto"  # Gen-PPL model: auto = gpt2-large when loadable, else the offline smollm2 proxy
    evaluator_dtype: str = ranged("float32", choices=("float32", "bfloat16", "float16"))
    num_samples: Optional[int] = ranged(None, **_POS)  # None: sample.num_samples
    sampling: Optional[str] = None  # a sampling-list YAML (experiments/sampling/); None: the `sample` section
    references: Optional[str] = None  # conditional tasks: None = data.eval_source


@dataclass
class ExperimentConfig:
    """The root: one experiment."""

    name: str = "elf"
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------------------------
def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        if f.default_factory is not MISSING and is_dataclass(f.default_factory):
            keys.extend(_all_keys(f.default_factory, full + "."))
    return keys


def _suggest(schema: type, bad_key: str) -> str:
    close = difflib.get_close_matches(bad_key, _all_keys(schema), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _merge(base: DictConfig, other: Any, origin: str, schema: type, error: type[Exception]) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise error(f"{origin}: unknown config key '{key}'{_suggest(schema, key)}") from None
    except ValidationError as e:
        raise error(f"{origin}: bad value for '{e.full_key}': {e.msg}") from None
    except (OmegaConfBaseException, TypeError) as e:
        raise error(f"{origin}: {str(e).splitlines()[0]}") from None


def _override(cfg: DictConfig, item: str, schema: type, error: type[Exception]) -> DictConfig:
    """Apply one ``key=value`` (the value parsed as YAML, as OmegaConf dot-lists are); a key with a
    list index (``rungs.0.max_steps``) updates that element."""
    if "=" not in item:
        raise error(f"override '{item}': expected key=value (e.g. model.depth=2)")
    key = item.split("=", 1)[0]
    if not any(part.isdigit() for part in key.split(".")):
        return _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'", schema, error)
    value = OmegaConf.from_dotlist([f"v={item.split('=', 1)[1]}"])["v"]
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except (OmegaConfBaseException, TypeError, IndexError) as e:
        raise error(f"override '{item}': {str(e).splitlines()[0]}") from None
    return cfg


def load_structured(schema: type, path: str | Path | None, overrides: list[str] | None,
                    error: type[Exception] = None) -> Any:  # type: ignore[assignment]
    """Defaults of the dataclass ``schema`` <- a YAML file <- dot-list overrides, as an instance of
    ``schema``. Unknown keys and wrong types raise ``error`` (default ConfigError) naming the key and
    where it came from. Value ranges are checked by the caller (:mod:`elf_core.validation`)."""
    error = error or ConfigError
    cfg = OmegaConf.structured(schema)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(Path(path), error), str(path), schema, error)
    for item in overrides or ():
        cfg = _override(cfg, item, schema, error)
    return OmegaConf.to_object(cfg)


def _read_yaml(path: Path, error: type[Exception] = None) -> DictConfig | ListConfig:  # type: ignore[assignment]
    error = error or ConfigError
    if not path.is_file():
        raise error(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError carries line/column in its message
        raise error(f"{path}: not valid YAML: {e}") from None
    if not isinstance(loaded, DictConfig):
        raise error(f"{path}: the top level must be a mapping of sections")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Defaults <- YAML file <- dot-list overrides; then presets are applied and values checked."""
    obj: ExperimentConfig = load_structured(ExperimentConfig, path, overrides)
    origin = str(path) if path else "defaults"
    if overrides:  # a bad value may come from either: name both
        origin += " + overrides [" + " ".join(overrides) + "]"
    return resolve(obj, origin=origin)


def resolve(cfg: ExperimentConfig, origin: str = "config") -> ExperimentConfig:
    """Fill architecture fields from the preset, then check every value against the rule declared
    next to its field (:mod:`elf_core.validation`) and the rules that relate several fields."""
    m = cfg.model
    # `ray.use_gpu=true` on a command line arrives as a YAML boolean, stringified to "True".
    cfg.ray.use_gpu = str(cfg.ray.use_gpu).lower()
    check_values(cfg, origin, ConfigError)
    for k, v in MODEL_PRESETS[m.preset].items():
        if getattr(m, k) is None:
            setattr(m, k, v)
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"{origin}: model.hidden_size {m.hidden_size} is not divisible by model.num_heads {m.num_heads}")
    if (m.hidden_size // m.num_heads) % 2:
        raise ConfigError(f"{origin}: head_dim {m.hidden_size // m.num_heads} must be even for RoPE")
    if cfg.flow.sc_cfg_max < cfg.flow.sc_cfg_min:
        raise ConfigError(f"{origin}: flow.sc_cfg_max ({cfg.flow.sc_cfg_max}) is below flow.sc_cfg_min ({cfg.flow.sc_cfg_min})")
    t = cfg.train
    if t.eval_every is not None and t.eval_every_epochs is not None:
        raise ConfigError(f"{origin}: set train.eval_every or train.eval_every_epochs, not both")
    if t.eval_every is not None and t.eval_every % t.checkpoint_every:
        raise ConfigError(f"{origin}: train.eval_every={t.eval_every} is not a multiple of train.checkpoint_every="
                          f"{t.checkpoint_every} (the evaluator scores checkpoints); use e.g. "
                          f"train.eval_every={max(1, round(t.eval_every / t.checkpoint_every)) * t.checkpoint_every}")
    if cfg.data.task == "conditional" and cfg.data.max_input_length is None:
        raise ConfigError(f"{origin}: data.max_input_length is required for data.task=conditional")
    if cfg.data.max_input_length is not None and cfg.data.max_input_length >= cfg.data.max_length:
        raise ConfigError(f"{origin}: data.max_input_length ({cfg.data.max_input_length}) must be < data.max_length ({cfg.data.max_length})")
    return cfg


def learning_rate(cfg: ExperimentConfig) -> float:
    """Absolute lr: ``optim.lr`` if set, else ``blr * global_batch_size / 256`` (2e-3 at the paper's 512)."""
    return cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * cfg.train.global_batch_size / 256


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str, origin: str = "<yaml>") -> ExperimentConfig:
    """Load a config saved by :func:`to_yaml` (e.g. inside a checkpoint) with the same strictness."""
    base = OmegaConf.structured(ExperimentConfig)
    try:
        loaded = OmegaConf.create(text)
    except Exception as e:
        raise ConfigError(f"{origin}: not valid YAML: {e}") from None
    obj: ExperimentConfig = OmegaConf.to_object(_merge(base, loaded, origin, ExperimentConfig, ConfigError))
    return resolve(obj, origin)


def to_flat_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """``{"model.depth": 12, ...}`` — every resolved value, e.g. for MLflow params."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in fields(obj):
            v = getattr(obj, f.name)
            if is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = v

    walk(cfg, "")
    return out
