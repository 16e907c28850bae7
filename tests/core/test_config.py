"""Experiment configuration: strict loading, precedence, round-trip, and the paper's defaults.

Every experiment YAML in ``experiments/`` is picked up by glob and must load; the paper-run YAMLs are checked
against reference §3.1 (the per-YAML columns) when present. Error messages must name the key, the
file and, for typos, the close key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from elf_core.config import (
    ConfigError, ExperimentConfig, MODEL_PRESETS, from_yaml_text, learning_rate, load_config, resolve,
    to_flat_dict, to_yaml,
)

ROOT = Path(__file__).resolve().parents[2]
# Experiment configs are the top-level YAMLs; sampling/ and sweeps/ hold other schemas (tested elsewhere).
YAMLS = sorted([*ROOT.glob("experiments/*.yaml"), *ROOT.glob("experiments/*.yml")])


def _write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------------------------------------
# Every experiment YAML in the repository
@pytest.mark.parametrize(
    "path", YAMLS or [pytest.param(None, marks=pytest.mark.skip(reason="no experiments/*.yaml yet"))],
    ids=lambda p: p.relative_to(ROOT).as_posix() if isinstance(p, Path) else "none",
)
def test_every_experiment_yaml_loads_and_round_trips(path):
    cfg = load_config(path)
    assert cfg.model.depth and cfg.model.hidden_size and cfg.model.num_heads  # preset resolved
    assert from_yaml_text(to_yaml(cfg), origin=str(path)) == cfg


# Reference §3.1, one column per paper YAML (training keys that differ between columns, plus the
# shared paper settings). Keys: ELF Lab flat keys.
_PAPER_SHARED = {
    "encoder.latent_mean": 0.0, "encoder.latent_std": 0.2, "flow.p_mean": -1.5, "flow.p_std": 0.8,
    "flow.noise_scale": 2.0, "flow.t_eps": 0.05, "flow.time_schedule": "logit_normal",
    "flow.decoder_prob": 0.2, "flow.decoder_p_mean": 0.8, "flow.decoder_p_std": 0.8,
    "flow.self_cond_prob": 0.5, "flow.sc_cfg_min": 0.5, "flow.sc_cfg_max": 5.0, "optim.blr": 1e-3,
    "optim.weight_decay": 0.0, "optim.ema_decay": 0.9999, "train.global_batch_size": 512,
    "train.seed": 42, "model.bottleneck_dim": 128, "model.num_time_tokens": 4,
    "model.num_sc_cfg_tokens": 4, "model.num_mode_tokens": 4,
}
_OWT = {"data.max_length": 1024, "data.pad_token": "pad", "flow.decoder_noise_scale": 5.0,
        "flow.label_drop_prob": 0.0, "optim.warmup_epochs": 0.5, "sample.sampler": "sde",
        "sample.sc_cfg": 3.0}
# uncond_sampling_configs.yml has two operating points; a YAML holds one of them (reference §3.2).
_OWT_SAMPLING = {(32, 1.5), (64, 1.0)}
_TASK = {"data.task": "conditional", "data.pad_token": "eos", "flow.decoder_noise_scale": 1.0,
         "flow.label_drop_prob": 0.1, "optim.warmup_epochs": None, "optim.warmup_steps": 5000,
         "train.epochs": 100, "sample.sampler": "ode", "sample.steps": 64, "sample.cfg": 2.0,
         "sample.sc_cfg": 1.0}
PAPER_COLUMNS = {
    "owt_elf_b": {**_OWT, "model.preset": "ELF-B", "train.epochs": 5},
    "owt_elf_m": {**_OWT, "model.preset": "ELF-M", "train.epochs": 4},
    "owt_elf_l": {**_OWT, "model.preset": "ELF-L", "train.epochs": 3},
    "wmt14_de_en_elf_b": {**_TASK, "model.preset": "ELF-B", "data.max_length": 128, "data.max_input_length": 64},
    "xsum_elf_b": {**_TASK, "model.preset": "ELF-B", "data.max_length": 1088, "data.max_input_length": 1024},
}


@pytest.mark.parametrize("stem", sorted(PAPER_COLUMNS))
def test_paper_yamls_match_reference_columns(stem):
    path = ROOT / "experiments" / f"{stem}.yaml"
    if not path.is_file():
        pytest.skip(f"{path.name} not in experiments/")
    flat = to_flat_dict(load_config(path))
    expect = {**_PAPER_SHARED, **PAPER_COLUMNS[stem]}
    wrong = {k: (flat[k], v) for k, v in expect.items() if flat[k] != v}
    assert not wrong, f"{path.name}: (got, reference) {wrong}"
    if stem.startswith("owt"):
        assert (flat["sample.steps"], flat["sample.gamma"]) in _OWT_SAMPLING


# ---------------------------------------------------------------------------------------------
# Errors name the key and the file
def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    p = _write(tmp_path, "flow:\n  p_meen: -1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "flow.p_meen" in msg and str(p) in msg and "flow.p_mean" in msg


def test_unknown_section_is_an_error(tmp_path):
    p = _write(tmp_path, "flwo:\n  p_mean: -1.0\n")
    with pytest.raises(ConfigError, match="flwo") as e:
        load_config(p)
    assert str(p) in str(e.value) and "'flow'" in str(e.value)


def test_unknown_override_key_names_the_override():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.bllr=1e-3"])
    assert "optim.bllr" in str(e.value) and "optim.blr" in str(e.value)


def test_wrong_type_names_the_key(tmp_path):
    p = _write(tmp_path, "model:\n  depth: twelve\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "model.depth" in str(e.value) and str(p) in str(e.value)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        load_config(None, ["train.global_batch_size=lots"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.preset=ELF-XL"])
    msg = str(e.value)
    assert "ELF-XL" in msg and all(name in msg for name in MODEL_PRESETS)


def test_bad_choice_and_range_name_the_key():
    with pytest.raises(ConfigError, match="flow.time_schedule"):
        load_config(None, ["flow.time_schedule=cosine"])
    with pytest.raises(ConfigError, match="flow.decoder_prob"):
        load_config(None, ["flow.decoder_prob=1.5"])


# ---------------------------------------------------------------------------------------------
# Precedence, round trip, lr
def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    p = _write(tmp_path, "flow:\n  p_mean: -1.0\noptim:\n  blr: 5.0e-4\nmodel:\n  preset: tiny\n")
    cfg = load_config(p, ["flow.p_mean=-0.5", "model.depth=3"])
    assert cfg.flow.p_mean == -0.5  # override beats YAML
    assert cfg.optim.blr == 5e-4  # YAML beats default
    assert cfg.flow.p_std == 0.8  # default where nobody says otherwise
    assert cfg.model.depth == 3  # override beats the preset
    assert cfg.model.hidden_size == MODEL_PRESETS["tiny"]["hidden_size"]  # preset fills the rest
    assert load_config(p).flow.p_mean == -1.0


def test_to_yaml_from_yaml_text_round_trip():
    cfg = load_config(None, ["model.preset=tiny", "flow.label_drop_prob=0.1", "data.max_length=64",
                             "optim.lr=3e-4", "sample.sampler=ode", "name=round-trip"])
    back = from_yaml_text(to_yaml(cfg))
    assert back == cfg
    assert to_flat_dict(back) == to_flat_dict(cfg)


def test_learning_rate_scales_with_batch():
    cfg = load_config()
    assert cfg.optim.blr == 1e-3 and cfg.train.global_batch_size == 512
    assert learning_rate(cfg) == pytest.approx(2e-3)
    assert learning_rate(load_config(None, ["train.global_batch_size=128"])) == pytest.approx(5e-4)
    assert learning_rate(load_config(None, ["optim.lr=1e-4"])) == 1e-4  # explicit lr wins


def test_defaults_are_the_paper_owt_column():
    flat = to_flat_dict(resolve(ExperimentConfig()))
    expect = {**_PAPER_SHARED, **_OWT, "model.preset": "ELF-B", "model.depth": 12, "model.hidden_size": 768,
              "model.num_heads": 12, "train.epochs": 5, "encoder.name": "t5-small",
              "optim.muon_momentum": 0.95, "optim.muon_ns_steps": 5, "optim.adam_b1": 0.9,
              "optim.adam_b2": 0.999, "optim.adam_eps": 1e-8, "optim.grad_clip": 1.0,
              "model.mlp_ratio": 4.0, "model.rope_theta": 10000.0, "model.norm_eps": 1e-6,
              "model.freq_embed_dim": 256, "sample.steps": 32, "sample.gamma": 1.5}
    wrong = {k: (flat[k], v) for k, v in expect.items() if flat[k] != v}
    assert not wrong, f"(got, reference) {wrong}"


def test_every_declared_range_is_checked_naming_key_value_and_range():
    """Each numeric field's valid range and each string field's choices live next to its definition
    (elf_core.validation.ranged) and are checked in one place, for the experiment config and for the
    sampling configs of lists and sweeps alike."""
    from elf_core.config import ExperimentConfig, SampleConfig
    from elf_core.validation import RULE, check_values, violations

    cases = {"optim.lr=-1": "optim.lr=-1.0 is not in (0, inf)",
             "optim.ema_decay=1.0": "optim.ema_decay=1.0 is not in [0, 1)",
             "sample.gamma=-0.5": "sample.gamma=-0.5 is not in [0, inf)",
             "train.keep_checkpoints=0": "train.keep_checkpoints=0 is not in [1, inf)",
             "flow.self_cond_prob=1.5": "flow.self_cond_prob=1.5 is not in [0, 1]",
             "data.pad_token=zero": "data.pad_token='zero' is not one of ['pad', 'eos']",
             "ray.eval_cpus=-1": "ray.eval_cpus=-1.0 is not in [0, inf)"}
    for override, message in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert message in str(e.value) and override in str(e.value)  # the key, the value, the range, the origin
    # Every field that has a range has one rule object, and the defaults satisfy all of them.
    assert violations(ExperimentConfig()) == []
    ruled = [f.name for f in dataclasses.fields(SampleConfig) if RULE in f.metadata]
    assert set(ruled) == {"sampler", "steps", "gamma", "sc_cfg", "cfg", "grid", "num_samples", "batch_size", "seed"}
    with pytest.raises(ValueError, match=r"x: sample\.steps=0 is not in \[1, inf\)"):
        check_values(SampleConfig(steps=0), "x", ValueError, prefix="sample.")
