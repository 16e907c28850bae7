"""Importing official-port checkpoints (elf_core.official).

The reference here is ``official_oracle_forward``: a compact functional re-statement of the official
forward (pt:modules/model.py:142-230, pt:modules/layers.py), written against a state dict in the
official key layout, computed in float64 with an explicit softmax (no SDPA, no ELFNetwork code).
State dicts are built from the official module names and shapes, not from ELFNetwork.state_dict().
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import elf_core
from elf_core.checkpoint import CheckpointError, save_checkpoint
from elf_core.config import ExperimentConfig, ModelConfig, resolve
from elf_core.network import ELFNetwork, count_parameters
from elf_core.official import infer_architecture, infer_mlp_ratio, load_official_checkpoint

TINY = dict(D=32, H=64, depth=2, heads=4, V=100, bottleneck=16, tokens=(4, 4, 4), freq=256)



# ----------------------------------------------------------------------------------------------
def official_layout(D, H, depth, heads, V, bottleneck=128, F_inner=None, tokens=(4, 4, 4), freq=256,
                    meta=False, seed=0) -> dict[str, torch.Tensor]:
    """A state dict with the official port's parameter names and shapes (pt:modules/model.py:88-140)."""
    F_inner = F_inner if F_inner is not None else int(int(H * 4.0) * 2 / 3)
    hd = H // heads
    shapes: dict[str, tuple[int, ...]] = {
        "self_cond_proj.weight": (D, 2 * D), "self_cond_proj.bias": (D,),
        "text_proj.proj1.weight": (bottleneck, D),  # no bias
        "text_proj.proj2.weight": (H, bottleneck), "text_proj.proj2.bias": (H,),
        "t_emb_tokens": (1, tokens[0], H),
        "self_cond_cfg_tokens": (1, tokens[1], H),
        "mode_tokens": (1, tokens[2], H),
        "final_layer.norm_final.weight": (H,),
        "final_layer.linear.weight": (D, H), "final_layer.linear.bias": (D,),
        "proj_kernel": (H, D), "proj_bias": (D,), "unembed_kernel": (D, V), "unembed_bias": (V,),
    }
    for emb in ("t_embedder", "self_cond_cfg_embedder"):
        shapes.update({f"{emb}.mlp_0.weight": (H, freq), f"{emb}.mlp_0.bias": (H,),
                       f"{emb}.mlp_2.weight": (H, H), f"{emb}.mlp_2.bias": (H,)})
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (H,), b + "norm2.weight": (H,),
            b + "attn.qkv.weight": (3 * H, H), b + "attn.qkv.bias": (3 * H,),
            b + "attn.q_norm.weight": (hd,), b + "attn.k_norm.weight": (hd,),
            b + "attn.proj.weight": (H, H), b + "attn.proj.bias": (H,),
            b + "mlp.w12.weight": (2 * F_inner, H), b + "mlp.w12.bias": (2 * F_inner,),
            b + "mlp.w3.weight": (H, F_inner), b + "mlp.w3.bias": (H,),
        })
    if meta:
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        r = torch.randn(s, generator=g)
        if "norm" in k:  # RMSNorm gains around 1
            out[k] = 1.0 + 0.1 * r
        elif len(s) == 2:  # kernels: 1/sqrt(fan_in) scale ((out, in) for Linear, (in, out) for bare kernels)
            fan_in = s[0] if k in ("proj_kernel", "unembed_kernel") else s[1]
            out[k] = r / math.sqrt(fan_in)
        else:  # biases and learned tokens
            out[k] = 0.1 * r
    return out


def official_oracle_forward(P, x, t, w, gate, heads, theta=10000.0):
    """ORACLE: the official ELF forward in float64, from a state dict in the official layout."""
    P = {k: v.double() for k, v in P.items()}
    x, t, w = x.double(), t.double(), w.double()
    D = P["self_cond_proj.bias"].shape[0]

    def lin(h, name, bias=True):
        return h @ P[name + ".weight"].T + (P[name + ".bias"] if bias else 0.0)

    def rms(h, weight):
        return weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)

    def time_mlp(s, name, dim=256):  # TimestepEmbedder: sincos(s) -> Linear -> SiLU -> Linear
        freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
        args = s[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
        return lin(F.silu(lin(emb, name + ".mlp_0")), name + ".mlp_2")

    h = lin(x, "self_cond_proj") if x.shape[-1] == 2 * D else x
    h = lin(lin(h, "text_proj.proj1", bias=False), "text_proj.proj2")
    B, S, H = h.shape
    T = P["t_emb_tokens"] + time_mlp(t, "t_embedder")[:, None]
    C = P["self_cond_cfg_tokens"] + time_mlp(w, "self_cond_cfg_embedder")[:, None]
    g = 0.0 if gate is None else (gate.double().view(-1, 1, 1) if isinstance(gate, torch.Tensor) else float(gate))
    M = P["mode_tokens"].expand(B, -1, -1) * g
    seq = torch.cat([T, C, M, h], 1)
    n_prefix = T.shape[1] + C.shape[1] + M.shape[1]

    # RoPE (TextRotaryEmbeddingFast): prefix rows identity; text position j angle j * theta^(-2i/hd),
    # each angle repeated for the two members of an adjacent pair; rotate_half (a, b) -> (-b, a).
    hd = H // heads
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = (torch.arange(S, dtype=torch.float64)[:, None] * freqs[None]).repeat_interleave(2, -1)
    cos = torch.cat([torch.ones(n_prefix, hd, dtype=torch.float64), ang.cos()])
    sin = torch.cat([torch.zeros(n_prefix, hd, dtype=torch.float64), ang.sin()])

    def rope(u):
        a, b = u[..., 0::2], u[..., 1::2]
        rot = torch.stack([-b, a], -1).flatten(-2)
        return u * cos + rot * sin

    N = seq.shape[1]
    for i in range(sum(1 for k in P if k.endswith(".norm1.weight"))):
        b = f"blocks.{i}."
        qkv = lin(rms(seq, P[b + "norm1.weight"]), b + "attn.qkv").reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q = rope(rms(qkv[0], P[b + "attn.q_norm.weight"]))
        k = rope(rms(qkv[1], P[b + "attn.k_norm.weight"]))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ qkv[2]
        seq = seq + lin(att.permute(0, 2, 1, 3).reshape(B, N, H), b + "attn.proj")
        x1, x2 = lin(rms(seq, P[b + "norm2.weight"]), b + "mlp.w12").chunk(2, -1)
        seq = seq + lin(F.silu(x1) * x2, b + "mlp.w3")
    y = seq[:, n_prefix:]
    x_hat = lin(rms(y, P["final_layer.norm_final.weight"]), "final_layer.linear")
    logits = None
    if gate is not None:
        hidden = F.gelu(y @ P["proj_kernel"] + P["proj_bias"], approximate="tanh")
        logits = hidden @ P["unembed_kernel"] + P["unembed_bias"]
    return x_hat, logits


def tiny_payload(seed=0, ema_seed=1, V=TINY["V"]) -> dict:
    c = dict(TINY, V=V)
    params = official_layout(c["D"], c["H"], c["depth"], c["heads"], V, c["bottleneck"], tokens=c["tokens"], seed=seed)
    ema = official_layout(c["D"], c["H"], c["depth"], c["heads"], V, c["bottleneck"], tokens=c["tokens"], seed=ema_seed)
    return {"params": params, "ema_params1": ema, "step": 7, "epoch": 0}


def _inputs(B=3, S=8, D=TINY["D"], width=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, width * D, generator=g)
    t = torch.rand(B, generator=g)
    w = 1.0 + 4.0 * torch.rand(B, generator=g)
    return x, t, w


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", [None, 1.0, "per-example"])
@pytest.mark.parametrize("width", [2, 1])  # [z ; x_sc] input, or z alone (self_cond_proj skipped)
def test_forward_matches_official_oracle(gate, width):
    payload = tiny_payload()
    model, cfg = load_official_checkpoint(payload, use_ema=False)
    x, t, w = _inputs(width=width)
    g = torch.tensor([0.0, 1.0, 1.0]) if gate == "per-example" else gate
    with torch.no_grad():
        x_hat, logits = model(x, t, w, g)
    ref_x, ref_logits = official_oracle_forward(payload["params"], x, t, w, g, heads=TINY["heads"])
    assert ref_x.abs().max() > 0.1  # a non-degenerate comparison
    torch.testing.assert_close(x_hat.double(), ref_x, atol=1e-5, rtol=1e-5)
    if gate is None:
        assert logits is None
    else:
        assert logits.shape == (3, 8, TINY["V"])
        torch.testing.assert_close(logits.double(), ref_logits, atol=1e-5, rtol=1e-5)


def test_inferred_config_of_tiny_checkpoint():
    model, cfg = load_official_checkpoint(tiny_payload())
    m = cfg.model
    assert (m.depth, m.hidden_size, m.num_heads, m.bottleneck_dim) == (2, 64, 4, 16)
    assert (m.num_time_tokens, m.num_sc_cfg_tokens, m.num_mode_tokens, m.freq_embed_dim) == (4, 4, 4, 256)
    assert m.mlp_ratio == 4.0 and model.blocks[0].mlp.w3.in_features == 170
    assert (model.latent_dim, model.vocab_size) == (32, 100)
    assert cfg.encoder.name == "t5-small"
    assert cfg.flow.noise_scale == 2.0 and cfg.sample.steps == 32  # the paper's settings (config defaults)
    assert not model.training
    assert count_parameters(model) == sum(v.numel() for v in tiny_payload()["params"].values())


def test_ema_vs_raw_selection_and_missing_ema():
    payload = tiny_payload(seed=0, ema_seed=1)
    ema_model, _ = load_official_checkpoint(payload)  # use_ema=True by default
    raw_model, _ = load_official_checkpoint(payload, use_ema=False)
    for name, p in ema_model.state_dict().items():
        assert torch.equal(p, payload["ema_params1"][name]), name
    for name, p in raw_model.state_dict().items():
        assert torch.equal(p, payload["params"][name]), name
    del payload["ema_params1"]
    with pytest.raises(CheckpointError, match=r"no 'ema_params1'.*use_ema=False"):
        load_official_checkpoint(payload)
    payload["ema_params1"] = list(payload["params"].values())
    with pytest.raises(CheckpointError, match=r"'ema_params1' is a list"):
        load_official_checkpoint(payload)


def test_wrapper_prefixes_are_stripped():
    payload = tiny_payload()
    ref, _ = load_official_checkpoint(payload, use_ema=False)
    for prefix in ("_orig_mod.", "module.", "module._orig_mod."):
        wrapped = dict(payload, params={prefix + k: v for k, v in payload["params"].items()})
        model, _ = load_official_checkpoint(wrapped, use_ema=False)
        for name, p in model.state_dict().items():
            assert torch.equal(p, ref.state_dict()[name]), (prefix, name)


def test_vocab_size_is_read_from_the_checkpoint():
    model, _ = load_official_checkpoint(tiny_payload(V=37))
    x, t, w = _inputs()
    with torch.no_grad():
        _, logits = model(x, t, w, 1.0)
    assert model.vocab_size == 37 and logits.shape[-1] == 37


def _full_official_file(path, payload):
    """The whole dict the official save_checkpoint writes (checkpoint_utils.py:62-72), with a real
    optimizer / LambdaLR (lambda lr_fn) / generator state, to prove weights_only=True reads it."""
    net = ELFNetwork(resolve(ExperimentConfig(model=ModelConfig(preset="tiny", depth=1, hidden_size=16, num_heads=2))).model, 8, 11)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda s: min(1.0, s / 10))
    x = torch.randn(2, 3, 16)
    net(x, torch.rand(2), torch.rand(2), 1.0)[1].sum().backward()
    opt.step()
    sched.step()
    full = dict(payload, opt_state=opt.state_dict(), lr_scheduler=sched.state_dict(),
                dropout_rng=torch.Generator().manual_seed(3).get_state(), grad_accum_buffers={})
    torch.save(full, path)


def test_file_and_directory_with_full_official_payload(tmp_path):
    _full_official_file(tmp_path / "checkpoint_9", tiny_payload(seed=9))
    _full_official_file(tmp_path / "checkpoint_12", tiny_payload(seed=12))  # newest by step, not by name
    (tmp_path / "config.yml").write_text("model: ELF-B\n")
    from_dir, _ = load_official_checkpoint(tmp_path, use_ema=False)
    from_file, _ = load_official_checkpoint(str(tmp_path / "checkpoint_9"), use_ema=False)
    assert torch.equal(from_dir.mode_tokens, tiny_payload(seed=12)["params"]["mode_tokens"])
    assert torch.equal(from_file.mode_tokens, tiny_payload(seed=9)["params"]["mode_tokens"])


def test_not_an_official_checkpoint(tmp_path):
    bad = tmp_path / "checkpoint_5"
    torch.save({"model": {"w": torch.zeros(2)}}, bad)
    with pytest.raises(CheckpointError, match=r"checkpoint_5: not an official ELF checkpoint.*'params'.*\['model'\]"):
        load_official_checkpoint(bad)
    payload = tiny_payload()
    del payload["params"]["blocks.0.attn.q_norm.weight"]
    with pytest.raises(CheckpointError, match=r"'blocks.0.attn.q_norm.weight' is missing"):
        load_official_checkpoint(payload, use_ema=False)
    payload = tiny_payload()
    payload["params"]["blocks.1.mlp.w3.weight"] = torch.zeros(64, 99)
    with pytest.raises(CheckpointError, match=r"'blocks.1.mlp.w3.weight': shape \(64, 99\) in the checkpoint vs \(64, 170\)"):
        load_official_checkpoint(payload, use_ema=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no official checkpoint file"):
        load_official_checkpoint(empty)
    with pytest.raises(CheckpointError, match=r"official checkpoint not found: .*nope"):
        load_official_checkpoint(tmp_path / "nope")


def test_elf_lab_directory_gets_a_hint(tmp_path):
    cfg = resolve(ExperimentConfig(model=ModelConfig(preset="tiny", depth=1, hidden_size=16, num_heads=2)))
    save_checkpoint(tmp_path / "ck", model=ELFNetwork(cfg.model, 8, 11), config=cfg, step=1)
    with pytest.raises(CheckpointError, match=r"ELF Lab checkpoint; load it with elf_core.checkpoint.load_checkpoint"):
        load_official_checkpoint(tmp_path / "ck")


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint_3"
    torch.save(tiny_payload(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(CheckpointError, match=r"checkpoint_3: cannot read it as a torch.save file \(truncated or corrupt"):
        load_official_checkpoint(path)


class _Custom:
    pass


def test_arbitrary_pickles_are_refused_with_an_explanation(tmp_path):
    path = tmp_path / "checkpoint_1"
    torch.save({"params": {}, "obj": _Custom()}, path)
    with pytest.raises(CheckpointError, match=r"weights_only=True\) refused this file: it pickles test_official_import._Custom.*torch.load\(path, weights_only=False\)"):
        load_official_checkpoint(path)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"not a local path.*'embedded-language-flows/ELF-B-owt-torch'.*offline"):
        load_official_checkpoint("embedded-language-flows/ELF-B-owt-torch")


def test_hub_id_downloads_newest_checkpoint(monkeypatch, tmp_path):
    import huggingface_hub

    torch.save(tiny_payload(seed=4), tmp_path / "checkpoint_95085")
    calls = {}

    def fake(**kwargs):
        calls.update(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    model, _ = load_official_checkpoint("embedded-language-flows/ELF-B-owt-torch", use_ema=False)
    assert calls["repo_id"] == "embedded-language-flows/ELF-B-owt-torch"
    assert calls["allow_patterns"] == ["checkpoint_*"]
    assert torch.equal(model.t_emb_tokens, tiny_payload(seed=4)["params"]["t_emb_tokens"])


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,dims,F_inner,count", [
    ("ELF-B", (12, 768, 12), 2048, 104_579_940),
    ("ELF-M", (24, 1056, 16), 2816, 342_540_036),
    ("ELF-L", (32, 1280, 16), 3413, 652_103_332),
])
def test_paper_architectures_are_recognised(preset, dims, F_inner, count):
    depth, H, heads = dims
    state = official_layout(512, H, depth, heads, 32100, F_inner=F_inner, meta=True)
    cfg, D, V = infer_architecture(state)
    assert (cfg.preset, cfg.depth, cfg.hidden_size, cfg.num_heads, D, V) == (preset, depth, H, heads, 512, 32100)
    assert cfg.mlp_ratio == 4.0 and cfg.bottleneck_dim == 128
    with torch.device("meta"):
        net = ELFNetwork(cfg, D, V)
    assert count_parameters(net) == count  # reference §5
    assert sum(v.numel() for v in state.values()) == count


def test_unusual_architecture_keeps_explicit_fields():
    state = official_layout(24, 96, 3, 6, 50, bottleneck=8, F_inner=100, tokens=(2, 3, 1), freq=64, meta=True)
    cfg, D, V = infer_architecture(state)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, D, V) == (3, 96, 6, 24, 50)
    assert (cfg.num_time_tokens, cfg.num_sc_cfg_tokens, cfg.num_mode_tokens, cfg.freq_embed_dim) == (2, 3, 1, 64)
    assert int(int(96 * cfg.mlp_ratio) * 2 / 3) == 100


@pytest.mark.parametrize("H,F_inner", [(768, 2048), (1056, 2816), (1280, 3413), (64, 100), (100, 7), (1000, 1), (333, 555)])
def test_infer_mlp_ratio_reproduces_width(H, F_inner):
    r = infer_mlp_ratio(H, F_inner)
    assert int(int(H * r) * 2 / 3) == F_inner


def test_reexported_from_package():
    assert elf_core.load_official_checkpoint is load_official_checkpoint


def test_legacy_torch_save_format_also_loads(tmp_path):
    path = tmp_path / "checkpoint_2"
    torch.save(tiny_payload(seed=6), path, _use_new_zipfile_serialization=False)  # cannot be mmap'ed
    model, _ = load_official_checkpoint(path, use_ema=False)
    assert torch.equal(model.unembed_bias, tiny_payload(seed=6)["params"]["unembed_bias"])
