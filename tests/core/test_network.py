"""ELFNetwork is exactly the official ELF transformer (spec §2, reference §2.3, §5).

Sizes against reference §5, control-token layout, RoPE, no attention mask, init, fp32 heads under
autocast, and a forward-equivalence check against ``tests/oracle_official.py`` (an independent
re-statement of pt:modules/model.py + layers.py) on shared weights.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from elf_core.config import ExperimentConfig, ModelConfig, resolve
from elf_core.network import (
    ELFNetwork, apply_rope, count_parameters, rope_tables, sincos_features,
)

sys.path.insert(0, str(Path(__file__).parent))  # the oracle lives next to the tests
import oracle_official as oracle  # noqa: E402

D, V, S = 16, 50, 16  # latent width, vocab, sequence (a power of two: official RoPE positions are exact)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(preset="tiny", depth=2, hidden_size=64, num_heads=4, bottleneck_dim=8)
    base.update(kw)
    c = ExperimentConfig(model=ModelConfig(**base))
    return resolve(c).model


def randomize(net: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Every parameter random (incl. the zero-init head and unit norm gains) so nothing hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            r = torch.randn(p.shape, generator=g) * scale
            is_gain = name.endswith(".weight") and "norm" in name.split(".")[-2]  # RMSNorm gains
            p.copy_(1.0 + r if is_gain else r)
    return net


def tiny_net(seed: int = 0, **kw) -> ELFNetwork:
    torch.manual_seed(seed)
    return ELFNetwork(tiny_cfg(**kw), D, V)


def oracle_for(net: ELFNetwork, seq_len: int = S) -> oracle.ELF:
    c = net.cfg
    o = oracle.ELF(D, seq_len, c.hidden_size, c.depth, c.num_heads, V, bottleneck=c.bottleneck_dim)
    oracle.load_from(o, net.state_dict(), strict=True)
    return o


def inputs(B: int = 3, width: int = 2 * D, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, width, generator=g)
    t = torch.rand(B, generator=g)
    w = 0.5 + 4.5 * torch.rand(B, generator=g)
    return x, t, w


# ---------------------------------------------------------------------------------------------
# Sizes
@pytest.mark.parametrize("preset,count,ffn", [
    ("ELF-B", 104_579_940, 2048), ("ELF-M", 342_540_036, 2816), ("ELF-L", 652_103_332, 3413),
])
def test_parameter_counts_match_reference(preset, count, ffn):
    cfg = resolve(ExperimentConfig(model=ModelConfig(preset=preset))).model
    with torch.device("meta"):
        net = ELFNetwork(cfg, 512, 32100)
    assert count_parameters(net) == count
    mlp = net.blocks[0].mlp
    assert ffn == int(4 * cfg.hidden_size * 2 / 3)
    assert (mlp.w12.out_features, mlp.w3.in_features, mlp.w3.out_features) == (2 * ffn, ffn, cfg.hidden_size)
    # Reference §5 component rows (ELF-B block 7,087,488; unembedding 16,467,300 at V=32100).
    block = sum(p.numel() for p in net.blocks[0].parameters())
    expect_block = {"ELF-B": 7_087_488, "ELF-M": 13_394_788, "ELF-L": 19_675_466}[preset]
    assert block == expect_block
    assert net.unembed_kernel.numel() + net.unembed_bias.numel() == 16_467_300
    # Muon (2-D) / Adam (rest) split of reference §5.
    muon = sum(p.numel() for p in net.parameters() if p.ndim == 2)
    assert (muon, count - muon) == {"ELF-B": (104_417_280, 162_660), "ELF-M": (342_171_648, 368_388),
                                    "ELF-L": (651_536_384, 566_948)}[preset]


def test_state_dict_keys_match_official_one_to_one():
    net = tiny_net()
    o = oracle.ELF(D, S, 64, 2, 4, V, bottleneck=8)
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in o.state_dict().items()}
    assert ours == theirs


# ---------------------------------------------------------------------------------------------
# Equivalence with the official forward
@pytest.mark.parametrize("gate", ["none", "one", "zero", "true", "per_example"])
@pytest.mark.parametrize("self_cond_half", [True, False])
def test_forward_matches_official(gate, self_cond_half):
    net = randomize(tiny_net())
    o = oracle_for(net)
    x, t, w = inputs(width=2 * D if self_cond_half else D)
    g = {"none": None, "one": 1.0, "zero": 0.0, "true": True,
         "per_example": torch.tensor([1.0, 0.0, 1.0])}[gate]
    with torch.no_grad():
        xh, lg = net(x, t, w, gate=g)
        xh_o, lg_o = o(x, t, w, decoder_step_active=g)
    assert xh.abs().max() > 1e-2  # a real signal, not a zero head
    torch.testing.assert_close(xh, xh_o, rtol=0, atol=1e-5)
    if g is None:
        assert lg is None and lg_o is None
    else:
        torch.testing.assert_close(lg, lg_o, rtol=0, atol=1e-5)


def test_per_example_gate_equals_scalar_gates_rowwise():
    net = randomize(tiny_net())
    x, t, w = inputs()
    with torch.no_grad():
        mixed, _ = net(x, t, w, gate=torch.tensor([1.0, 0.0, 1.0]))
        on, _ = net(x, t, w, gate=True)
        off, _ = net(x, t, w, gate=None)
    torch.testing.assert_close(mixed[[0, 2]], on[[0, 2]], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], off[1], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Control tokens: [4 time, 4 SC-CFG, 4 mode, S text]
def _block0_input(net, x, t, w, gate):
    seen = {}
    h = net.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    with torch.no_grad():
        net.features(x, t, w, gate)
    h.remove()
    return seen["x"]


def _changed_slots(a, b):
    return [i for i in range(a.shape[1]) if not torch.equal(a[:, i], b[:, i])]


def test_control_token_order_time_sccfg_mode_text():
    net = randomize(tiny_net())
    x, t, w = inputs()
    base = _block0_input(net, x, t, w, None)
    assert base.shape == (3, 12 + S, 64)
    text = list(range(12, 12 + S))
    assert _changed_slots(base, _block0_input(net, x, t + 0.1, w, None)) == [0, 1, 2, 3]
    assert _changed_slots(base, _block0_input(net, x, t, w + 1.0, None)) == [4, 5, 6, 7]
    assert _changed_slots(base, _block0_input(net, x, t, w, 1.0)) == [8, 9, 10, 11]
    assert _changed_slots(base, _block0_input(net, x + 0.1, t, w, None)) == text
    # Values: time token k = t_emb_tokens[k] + MLP_t(sincos(t)); mode = mode_tokens × gate.
    with torch.no_grad():
        temb = net.t_embedder.mlp_2(torch.nn.functional.silu(net.t_embedder.mlp_0(sincos_features(t, 256))))
        wemb = net.self_cond_cfg_embedder.mlp_2(
            torch.nn.functional.silu(net.self_cond_cfg_embedder.mlp_0(sincos_features(w, 256))))
    torch.testing.assert_close(base[:, :4], net.t_emb_tokens.detach() + temb[:, None])
    torch.testing.assert_close(base[:, 4:8], net.self_cond_cfg_tokens.detach() + wemb[:, None])
    gated = _block0_input(net, x, t, w, torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(gated[1, 8:12], torch.zeros(4, 64))
    torch.testing.assert_close(gated[0, 8:12], net.mode_tokens.detach()[0])


def test_mode_tokens_are_zero_when_gate_off_but_still_attended():
    net = randomize(tiny_net())
    x, t, w = inputs()
    for g in (None, 0.0, False, torch.zeros(3)):
        assert torch.equal(_block0_input(net, x, t, w, g)[:, 8:12], torch.zeros(3, 4, 64))
    # Same weights without mode tokens: if the zero vectors were masked out the outputs would agree.
    no_mode = tiny_net(num_mode_tokens=0)
    sd = {k: v for k, v in net.state_dict().items() if k != "mode_tokens"}
    no_mode.load_state_dict(sd, strict=False)
    with torch.no_grad():
        with_mode = net.features(x, t, w, None)
        without = no_mode.features(x, t, w, None)
    assert (with_mode - without).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# RoPE
def test_rope_tables_identity_prefix_and_interleaved_pairs():
    hd, theta = 8, 10000.0
    cos, sin = rope_tables(12, 5, hd, theta, "cpu")
    assert cos.shape == sin.shape == (17, hd)
    assert torch.equal(cos[:12], torch.ones(12, hd)) and torch.equal(sin[:12], torch.zeros(12, hd))
    for j in range(5):
        for i in range(hd // 2):
            ang = j * theta ** (-2 * i / hd)
            for c in (2 * i, 2 * i + 1):  # both members of pair i share angle i
                assert cos[12 + j, c].item() == pytest.approx(math.cos(ang), abs=1e-6)
                assert sin[12 + j, c].item() == pytest.approx(math.sin(ang), abs=1e-6)


def test_apply_rope_hand_rotation():
    hd = 4
    cos, sin = rope_tables(12, 4, hd, 10000.0, "cpu")
    x = torch.zeros(1, 16, hd)
    x[0, :] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = apply_rope(x, cos, sin)
    assert torch.equal(out[0, :12], x[0, :12])  # prefix: identity
    j = 3  # text position 3 -> row 15
    a0, a1 = j * 1.0, j * 10000.0 ** (-2 / 4)  # pair 0 angle 3, pair 1 angle 0.03
    expect = [1 * math.cos(a0) - 2 * math.sin(a0), 1 * math.sin(a0) + 2 * math.cos(a0),
              3 * math.cos(a1) - 4 * math.sin(a1), 3 * math.sin(a1) + 4 * math.cos(a1)]
    torch.testing.assert_close(out[0, 12 + j], torch.tensor(expect), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 12], x[0, 12])  # text position 0: angle 0


def test_rope_tables_equal_official_buffers():
    o = oracle.ELF(D, S, 64, 2, 4, V, bottleneck=8)
    cos, sin = rope_tables(12, S, 16, 10000.0, "cpu")
    assert torch.equal(cos, o.freqs_cos) and torch.equal(sin, o.freqs_sin)


# ---------------------------------------------------------------------------------------------
# Attention has no mask
def test_attention_is_unmasked_pad_positions_influence_everything():
    net = randomize(tiny_net())
    x, t, w = inputs()
    x2 = x.clone()
    x2[:, -1] += 1.0  # perturb only the last ("pad") position
    with torch.no_grad():
        a = net.features(x, t, w, None)
        b = net.features(x2, t, w, None)
    assert ((a[:, :-1] - b[:, :-1]).abs().amax(dim=(0, 2)) > 1e-5).all()  # every other position moved


# ---------------------------------------------------------------------------------------------
# Heads, dtypes, features
def test_denoise_head_zero_init_gives_zero_x_hat():
    net = tiny_net()
    assert torch.equal(net.final_layer.linear.weight, torch.zeros_like(net.final_layer.linear.weight))
    assert torch.equal(net.final_layer.linear.bias, torch.zeros_like(net.final_layer.linear.bias))
    x, t, w = inputs()
    with torch.no_grad():
        xh, lg = net(x, t, w, gate=1.0)
    assert torch.equal(xh, torch.zeros_like(xh))
    assert lg.shape == (3, S, V) and lg.abs().max() > 0


def test_fp32_input_path_and_heads_under_bf16_autocast():
    net = randomize(tiny_net())
    x, t, w = inputs()
    dtypes = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: dtypes.__setitem__(n, out.dtype))
             for n, m in [("self_cond_proj", net.self_cond_proj), ("text_proj", net.text_proj),
                          ("t_embedder", net.t_embedder), ("sc_embedder", net.self_cond_cfg_embedder),
                          ("block0_mlp_w12", net.blocks[0].mlp.w12), ("final", net.final_layer)]]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        xh, lg = net(x, t, w, gate=1.0)
    for h in hooks:
        h.remove()
    assert dtypes["block0_mlp_w12"] == torch.bfloat16  # autocast really is on inside the blocks
    for name in ("self_cond_proj", "text_proj", "t_embedder", "sc_embedder", "final"):
        assert dtypes[name] == torch.float32, name
    assert xh.dtype == torch.float32 and lg.dtype == torch.float32


def test_sincos_features_hand_computed():
    t = torch.tensor([0.0, 0.3, 1.0])
    f = torch.tensor([1.0, 0.1, 0.01, 0.001])  # 10000^(-i/4), i = 0..3: raw t, no x1000
    args = t[:, None] * f[None]
    expect = torch.cat([torch.cos(args), torch.sin(args)], -1)  # cos first, then sin
    torch.testing.assert_close(sincos_features(t, 8), expect, rtol=0, atol=1e-6)
    assert sincos_features(torch.tensor([0.3]), 8)[0, 0].item() == pytest.approx(math.cos(0.3), abs=1e-7)
    odd = sincos_features(t, 9)
    assert odd.shape == (3, 9) and torch.equal(odd[:, -1], torch.zeros(3))
    torch.testing.assert_close(sincos_features(t, 256), oracle.TimestepEmbedder.timestep_embedding(t, 256))


def test_swiglu_width():
    net = tiny_net()
    F = int(4 * 64 * 2 / 3)  # 170
    assert net.blocks[0].mlp.w12.weight.shape == (2 * F, 64)
    assert net.blocks[0].mlp.w3.weight.shape == (64, F)


# ---------------------------------------------------------------------------------------------
# Init statistics
def test_init_statistics():
    torch.manual_seed(0)
    cfg = tiny_cfg(hidden_size=128, num_heads=4, bottleneck_dim=32)
    net = ELFNetwork(cfg, 64, 500)
    normal002 = {"t_embedder.mlp_0.weight", "t_embedder.mlp_2.weight", "self_cond_cfg_embedder.mlp_0.weight",
                 "self_cond_cfg_embedder.mlp_2.weight", "t_emb_tokens", "self_cond_cfg_tokens", "mode_tokens"}
    xavier = {"proj_kernel", "unembed_kernel"}
    seen_norms = 0
    for name, p in net.named_parameters():
        p = p.detach()
        if name in normal002:
            assert abs(p.mean().item()) < 0.003 and p.std().item() == pytest.approx(0.02, rel=0.1), name
        elif name.startswith("final_layer.linear"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif name.endswith(".bias") or name in ("proj_bias", "unembed_bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or "_norm." in name or "norm_final" in name:
            assert torch.equal(p, torch.ones_like(p)), name
            seen_norms += 1
        else:
            assert p.ndim == 2, name
            if name not in xavier:
                assert name.endswith(".weight")
            bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))  # xavier-uniform (fused qkv/w12 as one matrix)
            assert p.abs().max().item() <= bound + 1e-7, name
            assert p.abs().max().item() > 0.95 * bound, name
            assert p.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
    assert seen_norms == 2 * 4 + 1  # norm1, norm2, q_norm, k_norm per block + final norm


def test_logits_rows_restricts_decode_head_and_keeps_params_in_graph():
    net = randomize(tiny_net())
    x, t, w = inputs()
    gate = torch.tensor([1.0, 0.0, 1.0])
    with torch.no_grad():
        xh_all, lg_all = net(x, t, w, gate=gate)
        xh_sub, lg_sub = net(x, t, w, gate=gate, logits_rows=torch.tensor([0, 2]))
    assert torch.equal(xh_all, xh_sub)
    torch.testing.assert_close(lg_sub, lg_all[[0, 2]], rtol=0, atol=1e-6)
    # Zero decode rows: the head still runs (on nothing), so its parameters get zero grads, not None.
    xh, lg = net(x, t, w, gate=torch.zeros(3), logits_rows=torch.zeros(0, dtype=torch.long))
    assert lg.shape == (0, S, V)
    (xh.sum() + lg.sum()).backward()
    assert net.unembed_kernel.grad is not None and torch.equal(net.unembed_kernel.grad, torch.zeros_like(net.unembed_kernel))
