"""Tests for elf_core.sampling: grid, guided field, ODE/SDE steps, decode, generate, NFE, conditions.

Numbers are checked against hand computations and against a test-local reference sampler written
straight from reference §2.7 (explicit net calls, fp32 time tensors like the official ``t_batch``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from elf_core.config import FlowConfig, SampleConfig, load_config
from elf_core.network import ELFNetwork
from elf_core.sampling import (GuidedField, batch_bounds, batch_generator, batch_seed, cut_at_eos, decode_latents,
                               encode_condition, generate, integrate, nfe, num_batches, ode_step, sample_latents,
                               sde_step, step_plan, target_window, time_grid)

B, S, D, V = 3, 12, 16, 50
EOS, PAD = 1, 0
FLOW = FlowConfig()  # p_mean −1.5, p_std 0.8, noise_scale 2.0, t_eps 0.05



@pytest.fixture(scope="module")
def net() -> ELFNetwork:
    torch.manual_seed(0)
    cfg = load_config(overrides=["model.preset=tiny"])
    model = ELFNetwork(cfg.model, latent_dim=D, vocab_size=V)
    with torch.no_grad():  # the denoise head is zero-init: perturb everything so outputs are non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def scfg(**kw) -> SampleConfig:
    base = dict(sampler="sde", steps=4, gamma=1.5, sc_cfg=3.0, cfg=1.0, grid="logit_normal", batch_size=2)
    base.update(kw)
    return SampleConfig(**base)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cond_setup(seed: int = 5):
    g = gen(seed)
    lengths = torch.tensor([3, 5, 0])
    mask = torch.arange(S)[None] < lengths[:, None]
    lat = torch.randn(B, S, D, generator=g)
    lat = torch.where(mask[..., None], lat, torch.zeros_like(lat))
    return lat, mask


# ----------------------------------------------------------------------------------------------
# Reference: reference §2.7 transcribed with explicit net calls.
def ref_field(net, z, t, xp, w, c, t_eps, clean, mask):
    Bn = z.shape[0]
    tb = torch.full((Bn,), t, dtype=torch.float32)
    R = (lambda a, cl: a) if mask is None else (lambda a, cl: torch.where(mask[..., None], cl, a))

    def one(zz, xx, cl):
        xh, logits = net(torch.cat([zz, xx], -1), tb, torch.full((Bn,), float(w)))
        assert logits is None  # denoise mode
        v = (xh - zz) / torch.clamp(1.0 - tb.view(-1, 1, 1), min=t_eps)
        return R(v, torch.zeros_like(v)), R(xh, cl)

    v_c, x_c = one(z, xp, clean)
    if c == 1.0:
        return v_c, x_c
    zero = torch.zeros_like(z)
    v_u, x_u = one(R(z, zero), R(xp, zero), zero)
    return R(v_u + c * (v_c - v_u), zero), R(x_u + c * (x_c - x_u), clean)


def ref_sample(net, cfg: SampleConfig, g, shape, clean=None, mask=None):
    """Grid → z → steps (SDE noise from g when α < 1) → last ODE; returns z."""
    n = cfg.steps
    if cfg.grid == "uniform":
        ts = torch.linspace(0, 1, n + 1)
    else:
        inner = torch.sigmoid(torch.randn(n - 1, generator=g) * FLOW.p_std + FLOW.p_mean)
        ts = torch.cat([torch.zeros(1), torch.sort(inner).values, torch.ones(1)])
    ts = ts.tolist()
    R = (lambda a: a) if mask is None else (lambda a: torch.where(mask[..., None], clean, a))
    z = R(torch.randn(shape, generator=g) * FLOW.noise_scale)
    xp = R(torch.zeros(shape))
    F = lambda zz, t, x: ref_field(net, zz, t, x, cfg.sc_cfg, cfg.cfg, FLOW.t_eps, clean, mask)  # noqa: E731
    for i in range(n):
        t, t1 = ts[i], ts[i + 1]
        alpha = max(0.0, min(1.0, 1.0 - cfg.gamma * (t1 - t)))
        if cfg.sampler == "sde" and i < n - 1 and alpha < 1.0:
            eps = torch.randn(shape, generator=g) * FLOW.noise_scale
            zb, tb = R(alpha * z + (1 - alpha) * eps), alpha * t
            v, xp = F(zb, tb, xp)
            z = zb + (t1 - tb) * v
        else:
            v, xp = F(z, t, xp)
            z = z + (t1 - t) * v
    return z


# ----------------------------------------------------------------------------------------------
# Grid
def test_uniform_grid_exact():
    grid = time_grid(5, "uniform", -1.5, 0.8, None, "cpu")
    assert torch.equal(grid, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float32))
    assert torch.equal(grid, torch.linspace(0, 1, 6))
    assert grid.dtype == torch.float32


@pytest.mark.parametrize("steps", [1, 2, 7, 32])
def test_logit_normal_grid(steps):
    grid = time_grid(steps, "logit_normal", -1.5, 0.8, gen(3), "cpu")
    assert grid.shape == (steps + 1,)
    assert grid[0].item() == 0.0 and grid[-1].item() == 1.0
    assert torch.all(grid[1:] >= grid[:-1])
    inner = torch.sigmoid(torch.randn(steps - 1, generator=gen(3)) * 0.8 - 1.5)
    assert torch.equal(grid[1:-1], torch.sort(inner).values)


def test_grid_errors():
    with pytest.raises(ValueError, match="sample.steps"):
        time_grid(0, "uniform", -1.5, 0.8, None, "cpu")
    with pytest.raises(ValueError, match="sample.grid"):
        time_grid(3, "cosine", -1.5, 0.8, gen(0), "cpu")


# ----------------------------------------------------------------------------------------------
# One step by hand
def test_ode_step_by_hand(net):
    g = gen(1)
    z, xp = torch.randn(B, S, D, generator=g), torch.randn(B, S, D, generator=g)
    t, t1, w = 0.3, 0.55, 2.5
    field = GuidedField(net, w, t_eps=0.05)
    with torch.no_grad():
        z1, x1 = ode_step(field, z, t, t1, xp)
        xh, _ = net(torch.cat([z, xp], -1), torch.full((B,), t), torch.full((B,), w))
    expected = z + (t1 - t) * ((xh - z) / (1.0 - torch.tensor(t)))
    assert torch.allclose(z1, expected, atol=1e-6, rtol=0)
    assert torch.equal(x1, xh)
    assert not torch.allclose(z1, z)


def test_ode_step_clamps_denominator(net):
    z, xp = torch.randn(B, S, D, generator=gen(2)), torch.zeros(B, S, D)
    field = GuidedField(net, 1.0, t_eps=0.05)
    with torch.no_grad():
        z1, _ = ode_step(field, z, 0.99, 1.0, xp)
        xh, _ = net(torch.cat([z, xp], -1), torch.full((B,), 0.99), torch.ones(B))
    assert torch.allclose(z1, z + 0.01 * (xh - z) / 0.05, atol=1e-5, rtol=0)


def test_sde_step_by_hand(net):
    g = gen(4)
    z, xp = torch.randn(B, S, D, generator=g), torch.randn(B, S, D, generator=g)
    t, t1, gamma, w = 0.3, 0.5, 1.5, 3.0
    field = GuidedField(net, w, t_eps=0.05)
    g_step, g_hand = gen(9), gen(9)
    with torch.no_grad():
        z1, x1 = sde_step(field, z, t, t1, xp, gamma=gamma, noise_scale=2.0, generator=g_step)
        alpha = 1.0 - gamma * (t1 - t)  # 0.7
        t_b = alpha * t  # 0.21
        z_b = alpha * z + (1 - alpha) * 2.0 * torch.randn(B, S, D, generator=g_hand)
        xh, _ = net(torch.cat([z_b, xp], -1), torch.full((B,), t_b), torch.full((B,), w))
    expected = z_b + (t1 - t_b) * (xh - z_b) / (1.0 - t_b)
    assert torch.allclose(z1, expected, atol=1e-5, rtol=0)
    assert torch.allclose(x1, xh, atol=1e-5, rtol=0)
    assert torch.equal(g_step.get_state(), g_hand.get_state())  # exactly one (B,S,D) draw


def test_sde_step_full_restart_when_alpha_zero(net):
    """γ(t' − t) ≥ 1: α = 0, t_b = 0, z_b = R_c(noise_scale·ε') — the old z is forgotten."""
    lat, mask = cond_setup()
    field = GuidedField(net, 3.0, t_eps=0.05, cond_latents=lat, cond_mask=mask)
    xp = field.restore(torch.zeros(B, S, D))
    with torch.no_grad():
        a, _ = sde_step(field, torch.randn(B, S, D), 0.4, 0.6, xp, gamma=10.0, noise_scale=2.0, generator=gen(7))
        b, _ = sde_step(field, torch.randn(B, S, D), 0.4, 0.6, xp, gamma=10.0, noise_scale=2.0, generator=gen(7))
        zb = field.restore(2.0 * torch.randn(B, S, D, generator=gen(7)))
        v, _ = field(zb, 0.0, xp)
    assert torch.equal(a, b)
    assert torch.allclose(a, zb + 0.6 * v, atol=1e-6, rtol=0)


def test_conditional_cfg_by_hand(net):
    lat, mask = cond_setup()
    g = gen(6)
    z, xp = torch.randn(B, S, D, generator=g), torch.randn(B, S, D, generator=g)
    z = torch.where(mask[..., None], lat, z)
    t, w, c = 0.4, 2.0, 2.0
    field = GuidedField(net, w, t_eps=0.05, cfg_scale=c, cond_latents=lat, cond_mask=mask)
    m = mask[..., None]
    tt, ww = torch.full((B,), t), torch.full((B,), w)
    with torch.no_grad():
        v, x = field(z, t, xp)
        xc, _ = net(torch.cat([z, xp], -1), tt, ww)
        xu, _ = net(torch.cat([z.masked_fill(m, 0), xp.masked_fill(m, 0)], -1), tt, ww)
    vc, vu = (xc - z) / (1 - t), (xu - z.masked_fill(m, 0)) / (1 - t)
    v_exp = vu + c * (vc - vu)
    x_exp = xu + c * (xc - xu)
    off = ~m.expand_as(v)
    assert torch.allclose(v[off], v_exp[off], atol=1e-5, rtol=0)
    assert torch.allclose(x[off], x_exp[off], atol=1e-5, rtol=0)
    assert torch.all(v[m.expand_as(v)] == 0)
    assert torch.equal(x[m.expand_as(x)], lat[m.expand_as(lat)])
    # c = 1 is the single conditional call, restored.
    v1, x1 = GuidedField(net, w, t_eps=0.05, cond_latents=lat, cond_mask=mask)(z, t, xp)
    assert torch.allclose(v1[off], vc[off], atol=1e-5, rtol=0)
    assert torch.equal(x1[m.expand_as(x1)], lat[m.expand_as(lat)])


# ----------------------------------------------------------------------------------------------
# Whole trajectories
@pytest.mark.parametrize("kw, conditional", [
    (dict(sampler="sde", gamma=1.5), False),
    (dict(sampler="ode", grid="uniform"), False),
    (dict(sampler="sde", gamma=1e6, steps=3), False),  # every SDE step a full restart
    (dict(sampler="ode", cfg=2.0, sc_cfg=1.0), True),
    (dict(sampler="sde", gamma=2.0, cfg=2.0), True),
])
def test_trajectory_matches_reference(net, kw, conditional):
    cfg = scfg(**kw)
    lat, mask = cond_setup() if conditional else (None, None)
    z = sample_latents(net, (B, S, D), cfg, FLOW, gen(11), cond_latents=lat, cond_mask=mask)
    with torch.no_grad():
        z_ref = ref_sample(net, cfg, gen(11), (B, S, D), lat, mask)
    assert torch.allclose(z, z_ref, atol=1e-5, rtol=0)


def test_sde_gamma_zero_equals_ode(net):
    lat, mask = cond_setup()
    for c_lat, c_mask, c in ((None, None, 1.0), (lat, mask, 2.0)):
        g1, g2 = gen(21), gen(21)
        a = sample_latents(net, (B, S, D), scfg(sampler="sde", gamma=0.0, cfg=c), FLOW, g1,
                           cond_latents=c_lat, cond_mask=c_mask)
        b = sample_latents(net, (B, S, D), scfg(sampler="ode", gamma=0.0, cfg=c), FLOW, g2,
                           cond_latents=c_lat, cond_mask=c_mask)
        assert torch.equal(a, b)
        assert torch.equal(g1.get_state(), g2.get_state())


def test_last_interval_is_ode(net):
    # One step: the only interval is the last, so a huge γ changes nothing.
    a = sample_latents(net, (B, S, D), scfg(sampler="sde", gamma=1e6, steps=1), FLOW, gen(5))
    b = sample_latents(net, (B, S, D), scfg(sampler="ode", steps=1), FLOW, gen(5))
    assert torch.equal(a, b)
    # Several steps: the last interval is Euler from the previous state (no noise draw after it).
    cfg = scfg(sampler="sde", gamma=1e6, steps=3, grid="uniform")
    g = gen(5)
    z = sample_latents(net, (B, S, D), cfg, FLOW, g)
    g_ref = gen(5)
    torch.randn(B, S, D, generator=g_ref)  # z
    torch.randn(B, S, D, generator=g_ref)  # SDE noise, step 0
    torch.randn(B, S, D, generator=g_ref)  # SDE noise, step 1 (none for the last interval)
    assert torch.equal(g.get_state(), g_ref.get_state())
    assert torch.allclose(z, ref_sample(net, cfg, gen(5), (B, S, D)), atol=1e-5, rtol=0)


def test_condition_positions_stay_clean(net):
    lat, mask = cond_setup()
    for kw in (dict(sampler="sde", gamma=2.0, cfg=2.0), dict(sampler="ode", cfg=1.0)):
        z = sample_latents(net, (B, S, D), scfg(**kw), FLOW, gen(8), cond_latents=lat, cond_mask=mask)
        assert torch.equal(z[mask], lat[mask])
        assert not torch.equal(z[~mask], lat[~mask])


def test_integrate_restores_cond_in_every_call(net):
    """Every net input has the clean condition at condition positions in z and in x_prev
    (the CFG-uncond call has zeros there)."""
    lat, mask = cond_setup()
    seen = []
    handle = net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        sample_latents(net, (B, S, D), scfg(sampler="sde", gamma=2.0, cfg=2.0, steps=3), FLOW, gen(8),
                       cond_latents=lat, cond_mask=mask)
    finally:
        handle.remove()
    assert len(seen) == 6
    for k, x in enumerate(seen):
        want = lat if k % 2 == 0 else torch.zeros_like(lat)
        assert torch.equal(x[..., :D][mask], want[mask])
        assert torch.equal(x[..., D:][mask], want[mask])


# ----------------------------------------------------------------------------------------------
# Determinism, NFE, decode, generate
def _texts_decode_fn(ids: torch.Tensor) -> list[str]:
    return [" ".join(str(i) for i in row.tolist() if i != PAD) for row in ids]


def test_determinism(net):
    cfg = scfg(steps=3)
    run = lambda seed: generate(net, cfg, FLOW, num_samples=3, seq_len=S, seed=seed,  # noqa: E731
                                decode_fn=lambda ids: [str(r) for r in ids.tolist()], eos_id=-1, pad_id=PAD)
    a, b, c = run(123), run(123), run(124)
    assert a == b
    assert a != c


def test_nfe_counts(net):
    lat, mask = cond_setup()
    calls = []
    handle = net.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        for steps, c, cond in ((5, 1.0, False), (4, 2.0, True), (4, 1.0, True), (1, 2.0, True)):
            calls.clear()
            generate(net, scfg(steps=steps, cfg=c, batch_size=B), FLOW, seq_len=S, seed=0,
                     decode_fn=_texts_decode_fn, eos_id=EOS, pad_id=PAD, num_samples=None if cond else B,
                     cond_latents=lat if cond else None, cond_mask=mask if cond else None)
            assert len(calls) == nfe(steps, c, cond)
    finally:
        handle.remove()
    assert nfe(32, 1.0, False) == 33 and nfe(64, 2.0, True) == 129 and nfe(64, 2.0, False) == 65


def test_decode_latents_by_hand(net):
    z = torch.randn(B, S, D, generator=gen(3))
    ids = decode_latents(net, z, 2.0)
    with torch.no_grad():
        _, logits = net(torch.cat([z, torch.zeros_like(z)], -1), torch.ones(B), torch.full((B,), 2.0), gate=1.0)
    assert torch.equal(ids, logits.argmax(-1))
    assert ids.shape == (B, S) and ids.dtype == torch.long


def test_cut_at_eos():
    ids = torch.tensor([[5, 1, 7, 1], [1, 2, 3, 4], [2, 3, 4, 5]])
    assert cut_at_eos(ids, EOS, PAD).tolist() == [[5, 0, 0, 0], [0, 0, 0, 0], [2, 3, 4, 5]]
    assert cut_at_eos(ids, EOS, EOS).tolist() == [[5, 1, 1, 1], [1, 1, 1, 1], [2, 3, 4, 5]]


def test_target_window():
    ids = torch.arange(10, 10 + 2 * 6).view(2, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert target_window(ids, mask, 3, PAD).tolist() == [[12, 13, 14], [21, 0, 0]]
    with pytest.raises(ValueError, match="prefix"):
        target_window(ids, torch.tensor([[0, 1, 0, 0, 0, 0]] * 2, dtype=torch.bool), 3, PAD)


def test_generate_pipeline_and_eos_cut(net):
    """generate = sample_latents → decode → (target window) → cut at EOS → decode_fn, batch by batch."""
    # The random net emits no designated EOS, so EOS := the id it emits at (row 0, position 4).
    cfg = scfg(steps=2, batch_size=2)
    progress = []
    got_ids = []

    def grab(ids):
        got_ids.append(ids.clone())
        return _texts_decode_fn(ids)

    texts = generate(net, cfg, FLOW, num_samples=5, seq_len=S, seed=31, decode_fn=grab,
                     eos_id=-1, pad_id=PAD, progress=lambda d, n: progress.append((d, n)))
    assert progress == [(2, 5), (4, 5), (5, 5)]
    assert len(texts) == 5 and [x.shape[0] for x in got_ids] == [2, 2, 1]
    # Batch k draws from its own generator seeded batch_seed(31, k).
    raw = torch.cat([decode_latents(net, sample_latents(net, (b, S, D), cfg, FLOW, batch_generator(31, k, "cpu")),
                                    cfg.sc_cfg) for k, b in enumerate((2, 2, 1))])
    assert torch.equal(torch.cat(got_ids), raw)  # eos_id −1: nothing cut
    eos = int(raw[0, 4])
    texts_cut = generate(net, cfg, FLOW, num_samples=5, seq_len=S, seed=31,
                         decode_fn=_texts_decode_fn, eos_id=eos, pad_id=PAD)
    assert texts_cut == _texts_decode_fn(cut_at_eos(raw, eos, PAD))
    assert len(texts_cut[0].split()) <= 4


def test_generate_conditional_window(net):
    lat, mask = cond_setup()
    cfg = scfg(steps=2, cfg=2.0, sampler="ode", batch_size=2)
    got = []
    generate(net, cfg, FLOW, seq_len=S, seed=2, decode_fn=lambda ids: got.append(ids) or [""] * len(ids),
             eos_id=-1, pad_id=PAD, cond_latents=lat, cond_mask=mask, target_len=8)
    full = torch.cat([decode_latents(net, sample_latents(net, (b, S, D), cfg, FLOW, batch_generator(2, k, "cpu"),
                                                         cond_latents=lat[s], cond_mask=mask[s]), cfg.sc_cfg)
                      for k, (b, s) in enumerate(((2, slice(0, 2)), (1, slice(2, 3))))])
    out = torch.cat(got)
    assert out.shape == (B, 8)
    assert out[0].tolist() == full[0, 3:11].tolist()
    assert out[1].tolist() == full[1, 5:12].tolist() + [PAD]  # past the row end: pad
    assert out[2].tolist() == full[2, 0:8].tolist()


def test_batch_seed_by_hand():
    """The counter-based seed: two golden-ratio multiply-adds (tag, then batch), a xor-shift finaliser."""
    M = (1 << 63) - 1

    def hand(seed, k):
        h = ((seed & M) * 0x9E3779B97F4A7C15 + 0x5EED5A3F + 1) & M
        h = (h * 0x9E3779B97F4A7C15 + k + 1) & M
        h ^= h >> 31
        h = (h * 0xBF58476D1CE4E5B9) & M
        return h ^ (h >> 29)

    assert [batch_seed(s, k) for s, k in ((0, 0), (42, 3), (-1, 7))] == [hand(0, 0), hand(42, 3), hand(-1, 7)]
    seeds = {batch_seed(s, k) for s in range(20) for k in range(200)}
    assert len(seeds) == 20 * 200 and all(0 <= x < 2**63 for x in seeds)
    assert torch.equal(torch.randn(4, generator=batch_generator(5, 2, "cpu")),
                       torch.randn(4, generator=gen(batch_seed(5, 2))))
    with pytest.raises(ValueError, match="batch index"):
        batch_seed(0, -1)
    assert [num_batches(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert batch_bounds(2, 9, 4) == (8, 9) and batch_bounds(0, 9, 4) == (0, 4)


@pytest.mark.parametrize("conditional", [False, True])
def test_generate_batch_subsets_equal_full_run(net, conditional):
    """Generating batches [k] alone gives exactly the k-th batch of a full run, in any order and any
    subset: what lets Ray workers each take a share of one evaluation's batches."""
    lat, mask = cond_setup() if conditional else (None, None)
    cfg = scfg(steps=2, batch_size=1, **(dict(cfg=2.0) if conditional else {}))
    kw = dict(seq_len=S, seed=77, decode_fn=_texts_decode_fn, eos_id=-1, pad_id=PAD)
    kw.update(dict(cond_latents=lat, cond_mask=mask) if conditional else dict(num_samples=B))
    full = generate(net, cfg, FLOW, **kw)
    assert len(full) == B and len(set(full)) == B  # batches draw different noise
    for k in range(B):
        assert generate(net, cfg, FLOW, batches=[k], **kw) == [full[k]]
    assert generate(net, cfg, FLOW, batches=[2, 0], **kw) == [full[2], full[0]]
    assert generate(net, cfg, FLOW, batches=[], **kw) == []
    if not conditional:  # more samples keep the earlier (complete) batches: batch k depends on (seed, k) only
        assert generate(net, cfg, FLOW, **{**kw, "num_samples": B + 2})[:B] == full


def test_mode_and_grad_state_restored(net):
    net.train()
    try:
        generate(net, scfg(steps=1), FLOW, num_samples=1, seq_len=S, seed=0,
                 decode_fn=_texts_decode_fn, eos_id=EOS, pad_id=PAD)
        assert net.training
        assert all(p.grad is None for p in net.parameters())
    finally:
        net.eval()
    generate(net, scfg(steps=1), FLOW, num_samples=1, seq_len=S, seed=0,
             decode_fn=_texts_decode_fn, eos_id=EOS, pad_id=PAD)
    assert not net.training
    # The RoPE cache built while sampling is an ordinary tensor: training afterwards still backprops.
    x_hat, _ = net(torch.randn(1, S, 2 * D), torch.rand(1), torch.ones(1))
    x_hat.sum().backward()
    net.zero_grad(set_to_none=True)


def test_input_errors(net):
    lat, mask = cond_setup()
    with pytest.raises(ValueError, match="sample.cfg"):
        sample_latents(net, (B, S, D), scfg(cfg=2.0), FLOW, gen(0))
    with pytest.raises(TypeError, match="cond_mask"):
        sample_latents(net, (B, S, D), scfg(), FLOW, gen(0), cond_latents=lat, cond_mask=mask.float())
    with pytest.raises(ValueError, match="latent_dim"):
        sample_latents(net, (B, S, D + 1), scfg(), FLOW, gen(0))
    with pytest.raises(ValueError, match="sample.sampler"):
        sample_latents(net, (B, S, D), dataclasses.replace(scfg(), sampler="heun"), FLOW, gen(0))
    with pytest.raises(ValueError, match="must be"):
        sample_latents(net, (B, S, D), scfg(), FLOW, gen(0), cond_latents=lat, cond_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="together"):
        sample_latents(net, (B, S, D), scfg(), FLOW, gen(0), cond_mask=mask)
    with pytest.raises(ValueError, match="num_samples"):
        generate(net, scfg(), FLOW, seq_len=S, seed=0, decode_fn=_texts_decode_fn, eos_id=EOS,
                 pad_id=PAD, num_samples=2, cond_latents=lat, cond_mask=mask)
    with pytest.raises(ValueError, match=r"batch 3 is out of range: 5 samples in batches of 2 make 3 batches"):
        generate(net, scfg(), FLOW, seq_len=S, seed=0, decode_fn=_texts_decode_fn, eos_id=EOS, pad_id=PAD,
                 num_samples=5, batches=[0, 3])


# ----------------------------------------------------------------------------------------------
# Conditions: encode the condition tokens only
@pytest.fixture(scope="module")
def tiny_t5():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=V, d_model=D, d_kv=4, d_ff=32, num_layers=2, num_heads=4)
    model = transformers.T5EncoderModel(cfg).eval()

    def encode(ids: torch.Tensor, mask3: torch.Tensor) -> torch.Tensor:
        add = torch.zeros(mask3.shape).masked_fill(~mask3, torch.finfo(torch.float32).min)[:, None]
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=add).last_hidden_state / 0.2

    return encode


def _official_masks(cond_len, total_len):
    j = torch.arange(S)
    is_cond = j[None] < torch.tensor(cond_len)[:, None]
    is_valid = j[None] < torch.tensor(total_len)[:, None]
    enc = (is_cond[:, :, None] & is_cond[:, None, :]) | (~is_cond[:, :, None] & is_valid[:, None, :])
    return enc, is_cond


def test_encode_condition_matches_official_full_row(tiny_t5):
    ids = torch.randint(2, V, (B, S), generator=gen(0))
    enc_mask, cond = _official_masks([4, 7, 0], [10, S, 6])
    official = tiny_t5(ids, enc_mask)  # cond ++ ground-truth target, pairwise mask
    mine = encode_condition(tiny_t5, ids, cond, pad_id=PAD)
    assert mine.shape == (B, S, D)
    # Equal up to float rounding: the attention reductions run over L instead of S columns.
    assert torch.allclose(mine[cond], official[cond], atol=1e-5, rtol=1e-6)
    assert torch.all(mine[~cond] == 0)
    # The mask matters: with full attention the condition latents would see the target.
    leaky = tiny_t5(ids, torch.ones(B, S, S, dtype=torch.bool))
    assert not torch.allclose(leaky[cond], official[cond], atol=1e-3)
    # The target tokens do not influence the condition latents at all.
    ids2 = torch.where(cond, ids, torch.randint(2, V, (B, S), generator=gen(1)))
    assert torch.equal(encode_condition(tiny_t5, ids2, cond, pad_id=PAD), mine)


def test_generate_with_cond_ids_equals_precomputed(net, tiny_t5):
    ids = torch.randint(2, V, (B, S), generator=gen(0))
    _, cond = _official_masks([7, 4, 7], [S, S, S])  # every batch has the whole set's L: same shapes
    cfg = scfg(steps=2, cfg=2.0, batch_size=2)
    kw = dict(seq_len=S, decode_fn=_texts_decode_fn, eos_id=EOS, pad_id=PAD, cond_mask=cond, target_len=5)
    a = generate(net, cfg, FLOW, seed=4, cond_ids=ids, encode_fn=tiny_t5, **kw)
    lat = encode_condition(tiny_t5, ids, cond, pad_id=PAD)
    b = generate(net, cfg, FLOW, seed=4, cond_latents=lat, **kw)
    assert a == b and len(a) == B


def test_integrate_is_deterministic_given_grid(net):
    """integrate() itself draws only SDE noise: same z, grid and generator → same result."""
    field = GuidedField(net, 3.0, t_eps=0.05)
    z = 2.0 * torch.randn(B, S, D, generator=gen(0))
    grid = time_grid(3, "uniform", -1.5, 0.8, None, "cpu")
    with torch.no_grad():
        a = integrate(field, z, grid, sampler="sde", gamma=1.0, noise_scale=2.0, generator=gen(1))
        b = integrate(field, z, grid, sampler="sde", gamma=1.0, noise_scale=2.0, generator=gen(1))
    assert torch.equal(a, b)


def _chained_steps(field, z, grid, *, sampler, gamma, generator):
    """The loop as one call per step with Python-float times (the step functions, by hand)."""
    ts = grid.tolist()
    x_prev = field.restore(torch.zeros_like(z))
    for t, t1 in zip(ts[:-2], ts[1:-1]):
        if sampler == "sde":
            z, x_prev = sde_step(field, z, t, t1, x_prev, gamma=gamma, noise_scale=2.0, generator=generator)
        else:
            z, x_prev = ode_step(field, z, t, t1, x_prev)
    return ode_step(field, z, ts[-2], ts[-1], x_prev)[0]


@pytest.mark.parametrize("sampler,gamma", [("ode", 0.0), ("sde", 1.5), ("sde", 1e6)])
@pytest.mark.parametrize("conditional", [False, True])
def test_fixed_shape_loop_is_bit_identical_to_per_step_calls(net, sampler, gamma, conditional):
    """integrate() reads every per-step scalar from the precomputed device table (step_plan); the
    latents equal chaining the Python-float step functions bit for bit, and so does the RNG state.
    The grid repeats a time, an empty interval where the SDE draws no noise."""
    lat, mask = cond_setup() if conditional else (None, None)
    field = GuidedField(net, 3.0, t_eps=0.05, cfg_scale=2.0 if conditional else 1.0,
                        cond_latents=lat, cond_mask=mask)
    grid = torch.cat([time_grid(6, "logit_normal", -1.5, 0.8, gen(3), "cpu"), torch.ones(1)])
    grid = torch.sort(torch.cat([grid, grid[3:4]])).values  # a tie: t_{i+1} == t_i
    z = field.restore(2.0 * torch.randn(B, S, D, generator=gen(0)))
    g_loop, g_steps = gen(1), gen(1)
    with torch.no_grad():
        a = integrate(field, z, grid, sampler=sampler, gamma=gamma, noise_scale=2.0, generator=g_loop)
        b = _chained_steps(field, z, grid, sampler=sampler, gamma=gamma, generator=g_steps)
    assert torch.equal(a, b)
    assert torch.equal(g_loop.get_state(), g_steps.get_state())
    plan = step_plan(grid, sampler=sampler, gamma=gamma)
    assert plan.coef.shape == (len(grid) - 1, 6) and plan.coef.dtype == torch.float32
    expected_noisy = sampler == "sde"
    assert plan.noisy == tuple(expected_noisy and i < len(grid) - 2 and grid[i + 1] > grid[i]
                               for i in range(len(grid) - 1))
