"""Muon + Nesterov-Adam (elf_core.optim) and the warmup schedule (elf_core.schedule).

Every update is checked against a plain float64 re-statement of the reference formulas (§2.6),
written independently of the implementation (explicit loops over steps, explicit transposes).
"""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from elf_core.config import OptimConfig, load_config
from elf_core.network import ELFNetwork
from elf_core.optim import (
    ADAM, IN_OUT, MUON, OUT_IN, MuonAdam, build_optimizer, muon_shape_scale, newton_schulz5,
    partition_parameters,
)
from elf_core.schedule import LinearWarmup, build_lr_scheduler, resolve_warmup_steps, warmup_lr_lambda



# ----------------------------------------------------------------------------------------------
# Reference implementations (float64, obviously-correct transcriptions of reference §2.6)


def ref_newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double()
    transposed = False
    if X.shape[0] > X.shape[1]:  # tall: iterate on the transpose (rows <= cols)
        X = X.T
        transposed = True
    X = X / (torch.sqrt((X * X).sum()) + 1e-8)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.T if transposed else X


def ref_muon(p0: torch.Tensor, grads: list, lr: float, in_out: bool, beta: float = 0.95) -> torch.Tensor:
    p = p0.double().clone()
    m = torch.zeros_like(p)
    rows, cols = p.shape
    fan_in, fan_out = (rows, cols) if in_out else (cols, rows)
    scale = math.sqrt(max(1.0, fan_out / fan_in))
    for k, g in enumerate(grads, start=1):
        g = torch.zeros_like(p) if g is None else g.double()
        m = beta * m + (1 - beta) * g
        u = beta * m / (1 - beta ** (k + 1)) + (1 - beta) * g / (1 - beta ** k)
        p = p - lr * scale * ref_newton_schulz(u)
    return p


def ref_adam(p0: torch.Tensor, grads: list, lr: float, b1=0.9, b2=0.999, eps=1e-8) -> torch.Tensor:
    p = p0.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for k, g in enumerate(grads, start=1):
        g = torch.zeros_like(p) if g is None else g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = b1 * m / (1 - b1 ** (k + 1)) + (1 - b1) * g / (1 - b1 ** k)
        v_hat = v / (1 - b2 ** k)
        p = p - lr * m_hat / (torch.sqrt(v_hat) + eps)
    return p


def run_opt(p0: torch.Tensor, grads: list, group: dict) -> torch.Tensor:
    p = nn.Parameter(p0.clone())
    opt = MuonAdam([dict(group, params=[p])])
    for g in grads:
        p.grad = None if g is None else g.clone()
        opt.step()
    return p.detach()


MUON_GROUP = dict(lr=0.02, algo=MUON, momentum=0.95, ns_steps=5)
ADAM_GROUP = dict(lr=0.01, algo=ADAM, betas=(0.9, 0.999), eps=1e-8)


def tiny_net(vocab: int = 40, latent: int = 16) -> ELFNetwork:
    torch.manual_seed(0)
    cfg = load_config(overrides=["model.preset=tiny", "model.depth=1", "model.hidden_size=32", "model.num_heads=2"])
    return ELFNetwork(cfg.model, latent, vocab)


# ----------------------------------------------------------------------------------------------
# Partition


def test_partition_elf_b_counts():
    cfg = load_config(overrides=["model.preset=ELF-B"])
    with torch.device("meta"):
        net = ELFNetwork(cfg.model, 512, 32100)
    specs = {sp.name: sp for sp in partition_parameters(net)}
    for algo, tensors, params in ((MUON, 58, 104_417_280), (ADAM, 109, 162_660)):  # reference §5
        group = [sp.param for sp in specs.values() if sp.algo == algo]
        assert (len(group), sum(p.numel() for p in group)) == (tensors, params)
    assert specs["unembed_kernel"].layout == IN_OUT and specs["proj_kernel"].layout == IN_OUT
    assert specs["blocks.0.mlp.w12.weight"].layout == OUT_IN
    assert specs["t_emb_tokens"].algo == ADAM  # (1, 4, H)
    # Fan scale: unembedding (512, 32100) stored (in, out) -> sqrt(32100/512) ~ 7.92;
    # proj_kernel (768, 512) stored (in, out) -> 1; qkv (2304, 768) stored (out, in) -> sqrt(3).
    assert muon_shape_scale((512, 32100), IN_OUT) == pytest.approx(7.9181, abs=1e-4)
    assert muon_shape_scale((768, 512), IN_OUT) == 1.0
    assert muon_shape_scale((2304, 768), OUT_IN) == pytest.approx(math.sqrt(3))
    assert muon_shape_scale((768, 2048), OUT_IN) == 1.0


def test_partition_names_unknown_2d_parameter():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.table = nn.Parameter(torch.zeros(5, 6))

    with pytest.raises(ValueError, match="'table'"):
        partition_parameters(Odd(), in_out_names=())
    specs = partition_parameters(Odd(), in_out_names=("table",))
    assert [(s.name, s.algo, s.layout) for s in specs] == [
        ("table", MUON, IN_OUT), ("lin.weight", MUON, OUT_IN), ("lin.bias", ADAM, None)]
    with pytest.raises(ValueError, match="no parameter 'nope'"):
        partition_parameters(Odd(), in_out_names=("table", "nope"))


def test_build_optimizer_groups_and_errors():
    net = tiny_net()
    opt = build_optimizer(net, OptimConfig(), lr=2e-3)
    assert [(g["algo"], g.get("layout")) for g in opt.param_groups] == [(MUON, OUT_IN), (MUON, IN_OUT), (ADAM, None)]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(net.proj_kernel), id(net.unembed_kernel)}
    assert all(g["lr"] == 2e-3 for g in opt.param_groups)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in net.parameters())
    with pytest.raises(ValueError, match="weight_decay"):
        build_optimizer(net, OptimConfig(weight_decay=0.1), lr=2e-3)
    with pytest.raises(RuntimeError, match="process group"):
        build_optimizer(net, OptimConfig(), lr=2e-3, distributed=True)
    with pytest.raises(ValueError, match="2-D"):
        MuonAdam([dict(MUON_GROUP, layout=OUT_IN, params=[nn.Parameter(torch.zeros(3))])])


# ----------------------------------------------------------------------------------------------
# Newton–Schulz


def test_newton_schulz_singular_values_and_orientation():
    gen = torch.Generator().manual_seed(0)
    # Rectangular Gaussian inputs: after 5 quintic steps every singular value lies in ~[0.68, 1.135]
    # (measured: 0.6818 .. 1.1344 over 20 draws per shape) — not 1: the coefficients trade exact
    # convergence for speed.
    for shape in [(64, 256), (256, 64), (48, 64), (96, 80), (20, 300)]:
        for _ in range(5):
            G = torch.randn(*shape, generator=gen)
            O = newton_schulz5(G)
            assert O.dtype == torch.float32 and O.shape == G.shape
            S = torch.linalg.svdvals(O)
            assert 0.67 < S.min() and S.max() < 1.15, (shape, S.min(), S.max())
            # Same left/right singular vectors as the polar factor U Vᵀ: high cosine similarity.
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            polar = U @ Vh
            assert (polar * O).sum() / (polar.norm() * O.norm()) > 0.97
            # Tall inputs are iterated on the transpose: NS(Gᵀ) = NS(G)ᵀ exactly.
            assert torch.equal(newton_schulz5(G.T), O.T)
    # Square inputs have near-zero singular values that 5 steps cannot lift: bulk in range, max < 1.21.
    for _ in range(5):
        S = torch.linalg.svdvals(newton_schulz5(torch.randn(64, 64, generator=gen)))
        assert S.max() < 1.21 and ((S > 0.67).float().mean() > 0.9)
    # bf16 input is orthogonalised in fp32 and agrees with the fp32 path on the same values.
    G = torch.randn(32, 48, generator=gen).bfloat16()
    assert torch.equal(newton_schulz5(G), newton_schulz5(G.float()))
    # Against the float64 reference.
    G = torch.randn(24, 40, generator=gen)
    torch.testing.assert_close(newton_schulz5(G).double(), ref_newton_schulz(G), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Update rules against the references


@pytest.mark.parametrize("shape,layout", [
    ((12, 30), OUT_IN),  # wide nn.Linear-like: scale 1
    ((30, 12), OUT_IN),  # tall (rows > cols), (out, in): scale sqrt(30/12)
    ((12, 30), IN_OUT),  # wide (in, out) like unembed_kernel: scale sqrt(30/12)
    ((30, 12), IN_OUT),  # tall (in, out) like proj_kernel: scale 1
])
def test_muon_matches_reference(shape, layout):
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(*shape, generator=gen) * 0.1
    grads = [torch.randn(*shape, generator=gen) * (0.5 + i) for i in range(5)]
    grads[3] = None  # a missing grad counts as zero: moments decay, the step counter advances
    got = run_opt(p0, grads, dict(MUON_GROUP, layout=layout))
    want = ref_muon(p0, grads, lr=0.02, in_out=layout == IN_OUT)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    # The update is not trivially small: 5 steps at lr 0.02 moved the parameter by O(lr).
    assert (want - p0.double()).abs().max() > 0.01


def test_muon_first_step_is_bias_corrected():
    # k = 1: u = β·(1−β)g/(1−β²) + (1−β)g/(1−β) = g·(β/(1+β) + 1) — a positive multiple of g,
    # so the first update is exactly −lr·scale·NS(g) (NS is invariant to the scale of its input).
    gen = torch.Generator().manual_seed(2)
    p0, g = torch.randn(10, 20, generator=gen), torch.randn(10, 20, generator=gen)
    got = run_opt(p0, [g], dict(MUON_GROUP, layout=IN_OUT))
    torch.testing.assert_close(got, p0 - 0.02 * math.sqrt(2) * newton_schulz5(g), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(7,), (1, 4, 6)])
def test_nesterov_adam_matches_reference(shape):
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(*shape, generator=gen)
    grads = [torch.randn(*shape, generator=gen) * 10 ** (i - 2) for i in range(6)]
    grads[2] = None
    got = run_opt(p0, grads, ADAM_GROUP)
    want = ref_adam(p0, grads, lr=0.01)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    # First step by hand: m̂ = 0.9·0.1g/(1−0.81) + 0.1g/0.1 = g·(0.09/0.19 + 1), v̂ = g², so the
    # step is −lr·(1 + 9/19)·sign(g) (up to eps).
    g = grads[0]
    one = run_opt(p0, [g], ADAM_GROUP)
    torch.testing.assert_close(one, p0 - 0.01 * (1 + 9 / 19) * g / (g.abs() + 1e-8), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# Fast paths (foreach elementwise ops, batched Newton–Schulz) against the per-parameter loop


def per_parameter_step(opt: MuonAdam) -> None:
    """The update as one loop over parameters, op for op (what MuonAdam.step computed before it
    used foreach ops and batched Newton–Schulz); state is kept in ``opt.state`` like MuonAdam's."""
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                if not st:
                    st["step"] = 0
                    for k in (("momentum_buffer",) if group["algo"] == MUON else ("exp_avg", "exp_avg_sq")):
                        st[k] = torch.zeros_like(p)
                st["step"] += 1
                k = st["step"]
                if group["algo"] == MUON:
                    beta, m = group["momentum"], st["momentum_buffer"]
                    m.lerp_(g, 1.0 - beta)
                    u = beta * (m / (1.0 - beta ** (k + 1))) + (1.0 - beta) * (g / (1.0 - beta ** k))
                    o = newton_schulz5(u, steps=group["ns_steps"])
                    o.mul_(muon_shape_scale(p.shape, group["layout"]))
                    p.add_(o.to(p.dtype), alpha=-group["lr"])
                else:
                    (b1, b2), m, v = group["betas"], st["exp_avg"], st["exp_avg_sq"]
                    m.lerp_(g, 1.0 - b1)
                    v.lerp_(g.square(), 1.0 - b2)
                    m_hat = b1 * (m / (1.0 - b1 ** (k + 1))) + (1.0 - b1) * (g / (1.0 - b1 ** k))
                    v_hat = v / (1.0 - b2 ** k)
                    p.add_(m_hat / (v_hat.sqrt() + group["eps"]), alpha=-group["lr"])


@pytest.mark.parametrize("batch_ns", [False, True])
def test_fast_paths_are_bit_identical_to_the_per_parameter_loop(batch_ns):
    """Muon + Adam on a tiny ELF network (D = 48: every Muon matrix has both sides ≥ 32; several
    same-shape stacks), 4 steps with a missing gradient: parameters equal bit for bit."""
    def net():
        torch.manual_seed(0)
        cfg = load_config(overrides=["model.preset=tiny"])
        return ELFNetwork(cfg.model, 48, 300)

    fast, loop = net(), net()
    cfg = OptimConfig(adam_params=["unembed_kernel"])
    opt_fast = build_optimizer(fast, cfg, 2e-3)
    opt_fast.batch_newton_schulz = batch_ns
    opt_loop = build_optimizer(loop, cfg, 2e-3)
    shapes = [tuple(p.shape) for g in opt_fast.param_groups if g["algo"] == MUON for p in g["params"]]
    assert len(shapes) - len(set(shapes)) >= 5  # batching has stacks to work on
    for s in range(4):
        _random_grads(fast, s)
        _random_grads(loop, s)
        opt_fast.step()
        per_parameter_step(opt_loop)
    for (name, a), b in zip(fast.named_parameters(), loop.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(fast.blocks[0].attn.qkv.weight, net().blocks[0].attn.qkv.weight)


def test_batched_newton_schulz_is_bit_identical_on_cpu():
    """A (k, m, n) stack gives each matrix's own result bit for bit (CPU, MKL) for ELF shapes:
    the tiny model's (MiniLM D = 384) and an ELF-B one. Tiny matrices (m·m·n < 400 multiply-adds,
    e.g. 6 × 20) take torch's small-matrix batched kernel and differ in the last bits (measured
    ~1e-6), which is why the optimizer batches on CUDA only unless asked."""
    gen = torch.Generator().manual_seed(5)
    for shape in [(384, 128), (128, 384), (128, 128), (682, 128), (128, 341), (384, 768), (768, 768)]:
        stack = torch.randn(2 if shape == (768, 768) else 3, *shape, generator=gen)
        batched = newton_schulz5(stack)
        assert batched.shape == stack.shape
        for i in range(stack.shape[0]):
            assert torch.equal(batched[i], newton_schulz5(stack[i])), shape


# ----------------------------------------------------------------------------------------------
# Resume


def _random_grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(model.parameters()):
        p.grad = None if (step == 1 and i % 7 == 0) else torch.randn(p.shape, generator=gen)


def test_state_dict_round_trip_is_bit_exact():
    lr, warmup = 2e-3, 3
    straight = tiny_net()
    opt = build_optimizer(straight, OptimConfig(), lr)
    sched = build_lr_scheduler(opt, warmup)
    for s in range(5):
        _random_grads(straight, s)
        opt.step()
        sched.step()

    first = tiny_net()
    opt1 = build_optimizer(first, OptimConfig(), lr)
    sched1 = build_lr_scheduler(opt1, warmup)
    for s in range(3):
        _random_grads(first, s)
        opt1.step()
        sched1.step()
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # checkpoints must load with weights_only

    resumed = tiny_net()
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed, OptimConfig(), lr)
    sched2 = build_lr_scheduler(opt2, warmup)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert all(opt2.state[p]["step"] == 3 for g in opt2.param_groups for p in g["params"])
    for s in range(3, 5):
        _random_grads(resumed, s)
        opt2.step()
        sched2.step()

    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == lr
    assert not torch.equal(straight.unembed_kernel, tiny_net().unembed_kernel)  # it did train


# ----------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes must reproduce the single-process result bit for bit


def _dist_model() -> nn.Module:
    torch.manual_seed(0)
    # 5 Muon tensors (uneven over 2 ranks), both orientations, plus Adam tensors.
    m = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 24), nn.Linear(24, 6, bias=False), nn.Linear(6, 6))
    m.register_parameter("kernel", nn.Parameter(torch.randn(6, 20) * 0.1))
    return m


def _dist_steps(model: nn.Module, distributed: bool) -> None:
    opt = build_optimizer(model, OptimConfig(), 0.05, distributed=distributed, in_out_names=("kernel",))
    for s in range(3):
        _random_grads(model, s)
        opt.step()


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _dist_model()
        _dist_steps(model, distributed=True)
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_matches_single_process(tmp_path):
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    # Same thread count (1, see conftest._one_torch_thread) as the workers: BLAS results can depend on how a
    # matmul is split across threads.
    assert torch.get_num_threads() == 1
    single = _dist_model()
    _dist_steps(single, distributed=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, p in single.state_dict().items():
            assert torch.equal(got[name], p), (rank, name)


# ----------------------------------------------------------------------------------------------
# Schedule


def test_warmup_schedule_values():
    assert [warmup_lr_lambda(4)(s) for s in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lr_lambda(0)(0) == 1.0
    with pytest.raises(ValueError):
        LinearWarmup(-1)
    # Through a real optimizer: the first update runs at lr 0 (pt:utils/train_utils.py:102-103).
    p = nn.Parameter(torch.zeros(3))
    opt = MuonAdam([dict(ADAM_GROUP, lr=2e-3, params=[p])])
    sched = build_lr_scheduler(opt, warmup_steps=4)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.0, 5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3], abs=1e-12)
    assert sched.state_dict()["lr_lambdas"] == [{"warmup_steps": 4}]


def test_resolve_warmup_steps():
    assert resolve_warmup_steps(OptimConfig(), 19_017) == 9_508  # OWT: int(0.5 * 19017), truncated
    assert resolve_warmup_steps(OptimConfig(warmup_epochs=None, warmup_steps=5000), 8_806) == 5000
    assert resolve_warmup_steps(OptimConfig(warmup_epochs=0.0), 398) == 0
    with pytest.raises(ValueError, match="optim.warmup_steps"):
        resolve_warmup_steps(OptimConfig(warmup_epochs=None, warmup_steps=-1), 100)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        resolve_warmup_steps(OptimConfig(), 0)


@pytest.mark.parametrize("slice_elements", [1000, 1 << 17])
def test_sliced_adam_is_bit_identical_to_the_per_parameter_loop(monkeypatch, slice_elements):
    """Adam runs its chain on slices of large CPU tensors (optim.ADAM_SLICE_ELEMENTS). With slices
    that do not divide the tensor (1000) and with the default on the embedded default's own
    384 × 30,522 unembedding, 3 steps give the per-parameter loop's parameters and state bit for bit."""
    import elf_core.optim as optim

    monkeypatch.setattr(optim, "ADAM_SLICE_ELEMENTS", slice_elements)
    dim, vocab = (48, 300) if slice_elements == 1000 else (384, 30522)  # the default: 90 slices

    def net():
        torch.manual_seed(0)
        return ELFNetwork(load_config(overrides=["model.preset=tiny"]).model, dim, vocab)

    sliced, loop = net(), net()
    assert sliced.unembed_kernel.numel() > 2 * slice_elements  # several slices, and a ragged last one
    assert sliced.unembed_kernel.numel() % slice_elements
    cfg = OptimConfig(adam_params=["unembed_kernel"])
    opt_sliced, opt_loop = build_optimizer(sliced, cfg, 2e-3), build_optimizer(loop, cfg, 2e-3)
    for s in range(3):
        _random_grads(sliced, s)
        _random_grads(loop, s)
        opt_sliced.step()
        per_parameter_step(opt_loop)
    for (name, a), b in zip(sliced.named_parameters(), loop.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(sliced.parameters(), loop.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            if key in opt_loop.state[b]:
                assert torch.equal(opt_sliced.state[a][key], opt_loop.state[b][key]), key
    assert not torch.equal(sliced.unembed_kernel, net().unembed_kernel)
