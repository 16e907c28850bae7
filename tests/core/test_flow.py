"""The ELF training objective is exactly the official step (spec §3, reference §2.4).

Each formula in ``elf_core.flow`` against a hand computation, then ``flow_loss`` against the
independent oracle of pt:train_step.py (``tests/oracle_official.py``) on shared weights and noise,
and the row-skipping fast path (``all_rows=False``) against the official all-rows pattern.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

from elf_core.config import FlowConfig
from elf_core.flow import (
    StepNoise, combine_losses, encode_for_step, flow_loss, label_drop_encoder_mask, noise_latents,
    sample_time, sc_cfg_scale_from_uniform, sc_cfg_target, x_to_v,
)

sys.path.insert(0, str(Path(__file__).parent))  # the oracle lives next to the tests
import oracle_official as oracle  # noqa: E402
from test_network import D, V, oracle_for, randomize, tiny_net  # noqa: E402

B, S = 8, 16


# ---------------------------------------------------------------------------------------------
# Pure formulas, by hand
def test_x_to_v_clamps_one_minus_t_at_t_eps():
    x_hat, z = torch.full((4, 2, 3), 3.0), torch.full((4, 2, 3), 1.0)
    t = torch.tensor([0.5, 0.97, 1.0, 0.0])
    v = x_to_v(x_hat, z, t, 0.05)
    expect = torch.tensor([2 / 0.5, 2 / 0.05, 2 / 0.05, 2 / 1.0]).view(4, 1, 1).expand(4, 2, 3)
    torch.testing.assert_close(v, expect)


def test_noise_latents_keeps_condition_clean():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    t = torch.tensor([0.25, 0.75])
    cond = torch.tensor([[True, False, False], [True, True, False]])
    z = noise_latents(x, eps, t, 2.0, cond)
    for b in range(2):
        for s in range(3):
            want = x[b, s] if cond[b, s] else t[b] * x[b, s] + (1 - t[b]) * 2.0 * eps[b, s]
            torch.testing.assert_close(z[b, s], want)


def test_sample_time_logit_normal_and_uniform_statistics():
    n = 200_000
    cfg = FlowConfig()
    t = sample_time(n, cfg, torch.Generator().manual_seed(0), "cpu")
    logit = torch.log(t) - torch.log1p(-t)
    assert logit.mean().item() == pytest.approx(-1.5, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)
    u = sample_time(n, dataclasses.replace(cfg, time_schedule="uniform"), torch.Generator().manual_seed(0), "cpu")
    assert 0.0 <= u.min().item() and u.max().item() <= 1.0
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert u.var().item() == pytest.approx(1 / 12, abs=0.002)
    again = sample_time(5, cfg, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(again, sample_time(5, cfg, torch.Generator().manual_seed(3), "cpu"))


def test_sc_cfg_scale_endpoints_and_log_uniformity():
    u = torch.tensor([0.0, 0.5, 1.0])
    w = sc_cfg_scale_from_uniform(u, 0.5, 5.0)
    torch.testing.assert_close(w, torch.tensor([0.5, 2.0, 5.0]))  # 1.5·4^u − 1; u=½ → √(1.5·6) − 1 = 2
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    w = sc_cfg_scale_from_uniform(u, 0.5, 5.0)
    # log(1 + w) is affine in u: uniform on [log 1.5, log 6]
    torch.testing.assert_close(torch.log1p(w), math.log(1.5) + u * math.log(4.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(w, oracle.sample_cfg_scale_from_u(u, 0.5, 5.0), rtol=0, atol=1e-6)


def test_sc_cfg_target_formula():
    g = torch.Generator().manual_seed(0)
    v, va, vb = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    sc, w = torch.tensor([True, False]), torch.tensor([2.0, 4.0])
    out = sc_cfg_target(v, va, vb, sc, w)
    torch.testing.assert_close(out[0], v[0] + 0.5 * (vb[0] - va[0]))  # 1 − 1/2
    assert torch.equal(out[1], v[1])  # no self-conditioning: plain v


def test_combine_losses_single_denominator_hand_example():
    ce = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    l2 = torch.tensor([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    decode = torch.tensor([True, False])
    # row 0 decodes: CE at cols 0,1; row 1 denoises: L2 at cols 1,2; one denominator = 4 tokens
    assert combine_losses(ce, l2, mask, decode).item() == pytest.approx((1 + 2 + 50 + 60) / 4)
    assert combine_losses(ce, l2, mask, ~decode).item() == pytest.approx((10 + 20 + 5 + 6) / 4)
    empty = combine_losses(ce, l2, torch.zeros_like(mask), decode)
    assert empty.item() == 0.0


def test_label_drop_encoder_mask_hand_example():
    enc, _, cond = oracle.official_pairwise_masks([2, 1], [4, 3], 4)
    enc, cond = enc.bool(), cond.bool()
    assert enc[0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    out = label_drop_encoder_mask(enc, cond, torch.tensor([True, False]))
    # dropped: target rows lose the condition columns; condition rows unchanged
    assert out[0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert torch.equal(out[1], enc[1])  # not dropped: unchanged
    assert out[1].int().tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]]


def test_step_noise_reproducible_and_distributed_as_configured():
    cfg = FlowConfig(label_drop_prob=0.1)
    a = StepNoise.draw((4, 5, 6), cfg, torch.Generator().manual_seed(7), "cpu")
    b = StepNoise.draw((4, 5, 6), cfg, torch.Generator().manual_seed(7), "cpu")
    c = StepNoise.draw((4, 5, 6), cfg, torch.Generator().manual_seed(8), "cpu")
    for f in dataclasses.fields(StepNoise):
        assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name
    assert not torch.equal(a.eps, c.eps)
    assert a.eps.shape == a.eps_dec.shape == (4, 5, 6) and a.lam.shape == (4, 5, 1)
    assert a.drop.dtype == a.decode.dtype == a.sc.dtype == torch.bool
    n = StepNoise.draw((50_000, 2, 1), cfg, torch.Generator().manual_seed(0), "cpu")
    assert n.drop.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert n.decode.float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert n.sc.float().mean().item() == pytest.approx(0.5, abs=0.01)
    lam_logit = torch.log(n.lam) - torch.log1p(-n.lam)
    assert lam_logit.mean().item() == pytest.approx(0.8, abs=0.01)
    assert lam_logit.std().item() == pytest.approx(0.8, abs=0.01)
    logw = torch.log1p(n.w)
    assert logw.min().item() >= math.log(1.5) - 1e-6 and logw.max().item() <= math.log(6.0) + 1e-6
    assert logw.mean().item() == pytest.approx((math.log(1.5) + math.log(6.0)) / 2, abs=0.01)


# ---------------------------------------------------------------------------------------------
# The step against the official oracle
COND_LEN = [0, 3, 5, 0, 2, 4, 0, 6]
TOTAL_LEN = [16, 12, 16, 10, 16, 14, 16, 9]


def make_batch(pad_token: str = "pad", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    enc, valid, cond = oracle.official_pairwise_masks(COND_LEN, TOTAL_LEN, S)
    ids = torch.randint(2, V, (B, S), generator=g)
    x0 = torch.randn(B, S, D, generator=g)
    loss_mask = (valid if pad_token == "pad" else torch.ones_like(valid)) * (1 - cond)
    official = {"input_ids": ids, "cond_seq_mask": cond, "attention_mask": valid, "encoder_attention_mask": enc}
    return x0, ids, cond.bool(), loss_mask, official


def make_noise(cfg: FlowConfig, **fixed) -> StepNoise:
    n = StepNoise.draw((B, S, D), cfg, torch.Generator().manual_seed(11), "cpu")
    base = dict(
        decode=torch.tensor([False, True, False, False, True, False, False, False]),
        sc=torch.tensor([True, False, True, False, True, True, False, True]),
        drop=torch.tensor([False, True, True, False, False, True, False, False]),
        t=torch.tensor([0.1, 0.4, 0.99, 0.7, 0.3, 0.5, 0.97, 0.02]),  # 0.99 / 0.97 exercise the clamp
    )
    base.update(fixed)
    return dataclasses.replace(n, **base)


def grads(net) -> dict[str, torch.Tensor]:
    return {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in net.named_parameters()}


def run_flow(net, x0, ids, cond, loss_mask, noise, cfg, all_rows):
    net.zero_grad(set_to_none=True)
    out = flow_loss(net, x0, ids, cond, loss_mask, noise, cfg, all_rows=all_rows)
    out.loss.backward()
    return out, grads(net)


def run_oracle(o, x0, official_batch, noise, cfg, pad_token="pad"):
    o.zero_grad(set_to_none=True)
    loss, metrics = oracle.official_loss(o, x0, official_batch, noise, oracle.official_config(cfg, pad_token))
    loss.backward()
    return loss, metrics, grads(o)


def assert_grads_close(a, b, rel=1e-5):
    for k in a:
        scale = max(a[k].abs().max().item(), b[k].abs().max().item(), 1e-3)
        assert (a[k] - b[k]).abs().max().item() <= rel * scale, k


@pytest.fixture(scope="module")
def nets():
    net = randomize(tiny_net(), scale=0.1)
    return net, oracle_for(net)


@pytest.mark.parametrize("pad_token", ["pad", "eos"])
def test_flow_loss_all_rows_equals_official_step(nets, pad_token):
    net, o = nets
    cfg = FlowConfig(label_drop_prob=0.1)
    x0, ids, cond, loss_mask, official = make_batch(pad_token)
    noise = make_noise(cfg)
    out, g = run_flow(net, x0, ids, cond, loss_mask, noise, cfg, all_rows=True)
    loss, m, g_o = run_oracle(o, x0, official, noise, cfg, pad_token)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert out.metrics["ce"].item() == pytest.approx(m["ce_loss"].item(), rel=1e-6)
    assert out.metrics["l2"].item() == pytest.approx(m["l2_loss"].item(), rel=1e-6)
    assert out.metrics["ce"].item() > 0 and out.metrics["l2"].item() > 0
    assert_grads_close(g, g_o)


def test_self_conditioning_guidance_is_active_in_the_target(nets):
    """Guard against a vacuous equivalence: the SC-CFG term really moves the loss."""
    net, _ = nets
    cfg = FlowConfig()
    x0, ids, cond, loss_mask, _ = make_batch()
    with torch.no_grad():
        on = flow_loss(net, x0, ids, cond, loss_mask, make_noise(cfg, drop=torch.zeros(B, dtype=torch.bool)), cfg).loss
        off = flow_loss(net, x0, ids, cond, loss_mask,
                        make_noise(cfg, drop=torch.zeros(B, dtype=torch.bool), sc=torch.zeros(B, dtype=torch.bool)), cfg).loss
    assert abs(on.item() - off.item()) > 1e-3 * abs(off.item())


def test_flow_loss_skipping_rows_equals_all_rows(nets):
    net, _ = nets
    cfg = FlowConfig(label_drop_prob=0.1)
    x0, ids, cond, loss_mask, _ = make_batch()
    noise = make_noise(cfg)
    fast, g_fast = run_flow(net, x0, ids, cond, loss_mask, noise, cfg, all_rows=False)
    full, g_full = run_flow(net, x0, ids, cond, loss_mask, noise, cfg, all_rows=True)
    assert fast.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
    for k in full.metrics:
        assert fast.metrics[k].item() == pytest.approx(full.metrics[k].item(), rel=1e-6, abs=1e-7), k
    assert_grads_close(g_fast, g_full, rel=1e-6)


@pytest.mark.parametrize("all_rows", [False, True])
@pytest.mark.parametrize("decoder_prob", [0.0, 1.0])
def test_decoder_prob_edge_cases(nets, decoder_prob, all_rows):
    net, o = nets
    cfg = FlowConfig(decoder_prob=decoder_prob, label_drop_prob=0.1)
    x0, ids, cond, loss_mask, official = make_batch()
    noise = StepNoise.draw((B, S, D), cfg, torch.Generator().manual_seed(5), "cpu")
    assert bool(noise.decode.all()) == (decoder_prob == 1.0) and bool(noise.decode.any()) == (decoder_prob == 1.0)
    out, g = run_flow(net, x0, ids, cond, loss_mask, noise, cfg, all_rows=all_rows)
    loss, m, _ = run_oracle(o, x0, official, noise, cfg)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v).all() for v in g.values())
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    if decoder_prob == 1.0:  # CE only: the loss is the CE mean, the denoise head gets no gradient
        assert out.metrics["l2"].item() == 0.0 and out.metrics["denoise_tokens"].item() == 0
        assert out.loss.item() == pytest.approx(out.metrics["ce"].item(), rel=1e-6)
        assert torch.equal(g["final_layer.linear.weight"], torch.zeros_like(g["final_layer.linear.weight"]))
        assert g["unembed_kernel"].abs().max() > 0
    else:  # L2 only: the decode head gets no gradient
        assert out.metrics["ce"].item() == 0.0 and out.metrics["decode_tokens"].item() == 0
        assert out.loss.item() == pytest.approx(out.metrics["l2"].item(), rel=1e-6)
        assert torch.equal(g["unembed_kernel"], torch.zeros_like(g["unembed_kernel"]))
        assert g["final_layer.linear.weight"].abs().max() > 0


@pytest.mark.parametrize("all_rows", [False, True])
def test_empty_loss_mask_gives_zero_loss_not_nan(nets, all_rows):
    net, _ = nets
    cfg = FlowConfig()
    x0, ids, cond, loss_mask, _ = make_batch()
    out, g = run_flow(net, x0, ids, cond, torch.zeros_like(loss_mask), make_noise(cfg), cfg, all_rows=all_rows)
    assert out.loss.item() == 0.0
    assert all(torch.isfinite(v).all() for v in out.metrics.values())
    assert all(torch.equal(v, torch.zeros_like(v)) for v in g.values())


def test_encode_for_step_applies_official_label_drop_mask():
    emb = torch.randn(V, D, generator=torch.Generator().manual_seed(0))

    class FakeEncoder:  # latents depend on the mask, so a wrong mask shows up in x0
        def encode(self, input_ids, mask):
            m = mask.float()
            return emb[input_ids] + m @ emb[input_ids] / m.sum(-1, keepdim=True).clamp(min=1)

    x0_, ids, cond, _, official = make_batch()
    noise = make_noise(FlowConfig(label_drop_prob=0.1))
    batch = {"input_ids": ids, "encoder_mask": official["encoder_attention_mask"].bool(), "cond_mask": cond}
    ours = encode_for_step(FakeEncoder(), batch, noise)
    ref = oracle.official_x0(lambda i, m: FakeEncoder().encode(i, m), official, noise,
                             oracle.official_config(FlowConfig(label_drop_prob=0.1)))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    undropped = oracle.official_x0(lambda i, m: FakeEncoder().encode(i, m), official, noise,
                                   oracle.official_config(FlowConfig(label_drop_prob=0.0)))
    assert not torch.allclose(ours, undropped)  # the drop really changed the dropped rows' latents
