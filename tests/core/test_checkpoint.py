"""ELF Lab checkpoints (elf_core.checkpoint): bit-exact round trips, atomicity, corruption. Whether a
crash leaves a directory that the run's checkpoint listing (:mod:`pipelines.checkpoints`, the one
resolver) would pick up is checked here too, with that listing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import elf_core.checkpoint as ck
from elf_core.checkpoint import CheckpointError, checkpoint_path, load_checkpoint, save_checkpoint
from elf_core.config import ExperimentConfig, ModelConfig, resolve
from elf_core.network import ELFNetwork, count_parameters
from pipelines.checkpoints import newest_checkpoint

D, V = 16, 50


def latest_checkpoint(root):
    """The newest complete checkpoint under ``root`` as the run listing finds it (a Path, or None)."""
    found = newest_checkpoint(root)
    return None if found is None else type(root)(found.location)



def make_config(**model) -> ExperimentConfig:
    fields = dict(preset="tiny", depth=2, hidden_size=32, num_heads=2, bottleneck_dim=8)
    fields.update(model)
    return resolve(ExperimentConfig(name="ckpt-test", model=ModelConfig(**fields)))


def make_model(cfg: ExperimentConfig, seed: int = 0, latent_dim: int = D) -> ELFNetwork:
    torch.manual_seed(seed)
    return ELFNetwork(cfg.model, latent_dim, V)


def train_step(model, opt, sched, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 2 * model.latent_dim, generator=g)
    x_hat, logits = model(x, torch.rand(2, generator=g), torch.rand(2, generator=g), 1.0)
    (x_hat.pow(2).mean() + logits.logsumexp(-1).mean()).backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def trained_setup(seed=0):
    cfg = make_config()
    model = make_model(cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    for s in range(3):
        train_step(model, opt, sched, s)
    ema = {n: p.detach().clone() * 0.9 for n, p in model.named_parameters()}
    return cfg, model, opt, sched, ema


def assert_same_tree(a, b, where="root"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def simple_save(directory, step, cfg=None, model=None, **kw):
    cfg = cfg or make_config()
    return save_checkpoint(directory, model=model or make_model(cfg, step), config=cfg, step=step, **kw)


# ----------------------------------------------------------------------------------------------
def test_round_trip_is_bit_exact(tmp_path):
    cfg, model, opt, sched, ema = trained_setup()
    gens = {"data": torch.Generator().manual_seed(1), "noise": torch.Generator().manual_seed(2)}
    for g in gens.values():
        torch.rand(7, generator=g)  # advance: restoring must continue mid-stream, not re-seed
    torch.manual_seed(123)
    torch.rand(3)
    save_checkpoint(tmp_path / "ck", model=model, config=cfg, ema_state=ema, optimizer=opt, scheduler=sched,
                    step=3, epoch=1, data_position={"epoch": 1, "batch": 17}, generators=gens,
                    extra={"best_loss": 0.25, "tags": ["a", "b"]})
    expected_next = {k: torch.rand(5, generator=g) for k, g in gens.items()}
    expected_global = torch.rand(4)

    cfg2 = make_config()
    model2 = make_model(cfg2, seed=99)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: min(1.0, (s + 1) / 4))
    gens2 = {"data": torch.Generator().manual_seed(0), "noise": torch.Generator().manual_seed(0)}
    torch.manual_seed(0)
    loaded = load_checkpoint(tmp_path / "ck", model=model2, optimizer=opt2, scheduler=sched2, generators=gens2,
                             restore_global_rng=True)

    assert_same_tree(model.state_dict(), model2.state_dict(), "model")
    assert_same_tree(ema, loaded.ema_state, "ema")
    assert_same_tree(opt.state_dict(), opt2.state_dict(), "optimizer")
    assert_same_tree(sched.state_dict(), sched2.state_dict(), "scheduler")
    assert (loaded.step, loaded.epoch, loaded.data_position) == (3, 1, {"epoch": 1, "batch": 17})
    assert loaded.extra == {"best_loss": 0.25, "tags": ["a", "b"]}
    assert loaded.config == cfg and loaded.model is model2
    for k, g in gens2.items():
        assert torch.equal(torch.rand(5, generator=g), expected_next[k]), k
    assert torch.equal(torch.rand(4), expected_global)

    # The restored run continues exactly like the original one (optimizer moments, lr schedule).
    train_step(model, opt, sched, 10)
    train_step(model2, opt2, sched2, 10)
    assert_same_tree(model.state_dict(), model2.state_dict(), "after one more step")


def test_model_none_builds_the_network_from_config_and_meta(tmp_path):
    cfg, model, *_ = trained_setup()
    save_checkpoint(tmp_path / "ck", model=model, config=cfg, step=3)
    loaded = load_checkpoint(tmp_path / "ck")
    built = loaded.model
    assert isinstance(built, ELFNetwork) and (built.latent_dim, built.vocab_size) == (D, V)
    assert_same_tree(model.state_dict(), built.state_dict())
    assert loaded.ema_state is None and loaded.optimizer_state is None
    x, t, w = torch.randn(2, 4, 2 * D), torch.rand(2), torch.rand(2)
    with torch.no_grad():
        for a, b in zip(model(x, t, w, 1.0), built(x, t, w, 1.0)):
            assert torch.equal(a, b)


class DDPLike(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile
def test_wrappers_are_unwrapped_and_prefixes_stripped(tmp_path):
    cfg, model, *_ = trained_setup()
    wrapped = DDPLike(torch.compile(model))  # compile is lazy: nothing is compiled until called
    assert next(iter(wrapped.state_dict())).startswith("module._orig_mod.")
    ema = {"module._orig_mod." + n: p.detach().clone() for n, p in model.named_parameters()}
    save_checkpoint(tmp_path / "ck", model=wrapped, config=cfg, ema_state=ema, step=1)
    for name in ("model.safetensors", "ema.safetensors"):
        with safe_open(str(tmp_path / "ck" / name), "pt") as f:
            keys = set(f.keys())
        assert keys <= set(model.state_dict()) and "blocks.0.attn.qkv.weight" in keys, name
    target = DDPLike(torch.compile(make_model(cfg, seed=5)))
    loaded = load_checkpoint(tmp_path / "ck", model=target)
    assert_same_tree(model.state_dict(), target.module._orig_mod.state_dict())
    assert set(loaded.ema_state) == {n for n, _ in model.named_parameters()}


def test_meta_json_contents(tmp_path):
    cfg, model, *_ = trained_setup()
    save_checkpoint(tmp_path / "ck", model=model, config=cfg, step=42, epoch=2, ema_state=None)
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    assert meta["format_version"] == ck.FORMAT_VERSION
    assert (meta["step"], meta["epoch"], meta["latent_dim"], meta["vocab_size"]) == (42, 2, D, V)
    assert meta["param_count"] == count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert meta["has_ema"] is False and "T" in meta["created"]
    assert meta["file_sizes"]["model.safetensors"] == (tmp_path / "ck" / "model.safetensors").stat().st_size
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.yaml", "meta.json", "model.safetensors", "state.pt"]


def test_state_pt_is_weights_only_loadable(tmp_path):
    cfg, model, opt, sched, ema = trained_setup()
    save_checkpoint(tmp_path / "ck", model=model, config=cfg, optimizer=opt, scheduler=sched, step=3,
                    generators={"g": torch.Generator().manual_seed(0)})
    state = torch.load(tmp_path / "ck" / "state.pt", weights_only=True)
    assert state["step"] == 3 and state["scheduler"]["lr_lambdas"] == [None]


# ----------------------------------------------------------------------------------------------
def _no_hidden_leftovers(root):
    return [p.name for p in root.iterdir() if p.name.startswith(".")] == []


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    simple_save(target, step=1)

    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        simple_save(target, step=2)
    monkeypatch.undo()
    assert load_checkpoint(target).step == 1
    assert latest_checkpoint(tmp_path) == target
    assert _no_hidden_leftovers(tmp_path)


def test_crash_at_the_final_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    simple_save(target, step=1)
    real_replace = ck.os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((str(src), str(dst)))
        if ".tmp-" in str(src):
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="power cut"):
        simple_save(target, step=2)
    monkeypatch.undo()
    assert any(".old-" in dst for _, dst in calls)  # the old one was moved aside, then put back
    assert load_checkpoint(target).step == 1 and latest_checkpoint(tmp_path) == target
    assert _no_hidden_leftovers(tmp_path)

    # A new directory whose rename fails is simply absent; the previous step stays the latest.
    monkeypatch.setattr(ck.os, "replace", flaky_replace)
    with pytest.raises(OSError):
        simple_save(checkpoint_path(tmp_path, 5), step=5)
    monkeypatch.undo()
    assert not checkpoint_path(tmp_path, 5).exists() and latest_checkpoint(tmp_path) == target


def test_leftovers_of_a_hard_crash_are_never_picked_up(tmp_path):
    good = simple_save(checkpoint_path(tmp_path, 3), step=3)
    # A kill -9 can leave a complete-looking temp dir, a moved-aside old dir, or a dir without meta.json.
    shutil.copytree(simple_save(tmp_path / "scratch", step=9), tmp_path / ".step_00000009.tmp-abc")
    shutil.rmtree(tmp_path / "scratch")
    shutil.copytree(good, tmp_path / ".step_00000007.old-abc")
    partial = checkpoint_path(tmp_path, 8)
    partial.mkdir()
    shutil.copy(good / "model.safetensors", partial)
    (tmp_path / "samples").mkdir()  # unrelated directories are ignored too
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match=r"step_00000008/meta.json: missing"):
        load_checkpoint(partial)
    with pytest.raises(CheckpointError, match=r"not found: .*step_00000007 \(a crash while replacing it left the previous version at .*\.step_00000007\.old-abc\)"):
        load_checkpoint(checkpoint_path(tmp_path, 7))


def test_save_replaces_an_existing_checkpoint_but_not_other_directories(tmp_path):
    target = tmp_path / "ck"
    simple_save(target, step=1)
    simple_save(target, step=2)
    assert load_checkpoint(target).step == 2 and _no_hidden_leftovers(tmp_path)
    other = tmp_path / "my_data"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match=r"my_data exists and is not an ELF Lab checkpoint"):
        simple_save(other, step=1)
    assert (other / "notes.txt").read_text() == "precious"


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "state.pt"])
@pytest.mark.parametrize("with_size_record", [True, False])
def test_truncated_files_are_clear_errors(tmp_path, name, with_size_record):
    cfg, model, opt, sched, ema = trained_setup()
    target = save_checkpoint(tmp_path / "ck", model=model, config=cfg, ema_state=ema, optimizer=opt, step=3)
    if not with_size_record:  # the file format's own checks must catch it as well
        meta = json.loads((target / "meta.json").read_text())
        meta["file_sizes"] = {}
        (target / "meta.json").write_text(json.dumps(meta))
    data = (target / name).read_bytes()
    (target / name).write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match=rf"ck/{name}: .*(truncated|corrupt)"):
        load_checkpoint(target, model=make_model(cfg, seed=7))


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "config.yaml", "meta.json"])
def test_missing_files_are_named(tmp_path, name):
    target = simple_save(tmp_path / "ck", step=1)
    (target / name).unlink()
    with pytest.raises(CheckpointError, match=rf"ck/{name}: missing"):
        load_checkpoint(target)


def test_missing_ema_file_when_meta_promises_one(tmp_path):
    cfg, model, *_ , ema = trained_setup()
    target = save_checkpoint(tmp_path / "ck", model=model, config=cfg, ema_state=ema, step=1)
    (target / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"ck/ema.safetensors: missing"):
        load_checkpoint(target)


def test_bad_directory_config_and_meta(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint directory not found: .*nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    target = simple_save(tmp_path / "ck", step=1)
    (target / "config.yaml").write_text("model: {depth: [1, 2\n")
    with pytest.raises(CheckpointError, match=r"ck/config.yaml: config does not parse"):
        load_checkpoint(target)
    (target / "config.yaml").write_text("model:\n  dept: 3\n")
    with pytest.raises(CheckpointError, match=r"ck/config.yaml: config does not parse.*'model.dept'"):
        load_checkpoint(target)
    (target / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"ck/meta.json: cannot read checkpoint metadata"):
        load_checkpoint(target)
    with pytest.raises(CheckpointError, match=r"ck/meta.json"):  # a damaged newest checkpoint is not skipped
        latest_checkpoint(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"is a file.*load_official_checkpoint"):
        load_checkpoint(tmp_path / "file")


def test_size_mismatch_names_parameter_shapes_and_config_values(tmp_path):
    small = make_config(preset="ELF-B")  # explicit fields override the preset's sizes
    target = save_checkpoint(tmp_path / "ck", model=make_model(small), config=small, step=1)
    bigger = make_config(preset="ELF-M", hidden_size=48)
    victim = make_model(bigger, seed=3)
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(target, model=victim)
    msg = str(err.value)
    assert "ck/model.safetensors does not fit the model" in msg
    assert "'text_proj.proj2.weight': shape (32, 8) in the checkpoint vs (48, 8) in the model" in msg
    assert "model.hidden_size: 32 (checkpoint) vs 48 (model)" in msg
    assert "model.preset: 'ELF-B' (checkpoint) vs 'ELF-M' (model)" in msg
    assert_same_tree(before, victim.state_dict(), "weights untouched by a failed load")

    other_width = make_model(small, latent_dim=24)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(target, model=other_width)
    msg = str(err.value)
    assert "'self_cond_proj.weight': shape (16, 32) in the checkpoint vs (24, 48) in the model" in msg
    assert "latent_dim (encoder width D / decode classes): 16 (checkpoint) vs 24 (model)" in msg


def test_optimizer_and_generator_mismatches_are_errors(tmp_path):
    cfg, model, opt, sched, ema = trained_setup()
    target = save_checkpoint(tmp_path / "ck", model=model, config=cfg, optimizer=opt, step=3,
                             generators={"data": torch.Generator().manual_seed(0)})
    wrong_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(3))])
    with pytest.raises(CheckpointError, match=r"ck/state.pt: optimizer state does not fit"):
        load_checkpoint(target, optimizer=wrong_opt)
    with pytest.raises(CheckpointError, match=r"no state for generator 'noise' \(saved generators: \['data'\]\)"):
        load_checkpoint(target, generators={"noise": torch.Generator()})
    with pytest.raises(CheckpointError, match=r"holds no lr-scheduler state"):
        load_checkpoint(target, scheduler=sched)


def test_invalid_inputs_to_save(tmp_path):
    cfg = make_config()
    model = make_model(cfg)
    with pytest.raises(TypeError, match=r"state.pt\['extra'\]\['fn'\]: a function cannot be stored"):
        save_checkpoint(tmp_path / "a", model=model, config=cfg, step=1, extra={"fn": lambda: 0})
    with pytest.raises(TypeError, match=r"data_position\['batch'\]"):
        save_checkpoint(tmp_path / "a", model=model, config=cfg, step=1, data_position={"batch": 1.5})
    with pytest.raises(CheckpointError, match=r"(?s)config does not describe the model.*model.depth: 3 \(config\) vs 2 \(model\)"):
        save_checkpoint(tmp_path / "a", model=model, config=make_config(depth=3), step=1)
    with pytest.raises(CheckpointError, match=r"EMA entries that are not model parameters: \['bogus'\]"):
        save_checkpoint(tmp_path / "a", model=model, config=cfg, step=1, ema_state={"bogus": torch.zeros(1)})
    assert not (tmp_path / "a").exists() and _no_hidden_leftovers(tmp_path)
