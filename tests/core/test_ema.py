"""Parameter EMA (elf_core.ema): hand-computed updates, swapping, state round-trip, wrapped models."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from elf_core.ema import EMA, unwrap_model



def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1, bias=False))


def set_params(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_ema_three_updates_by_hand():
    model = small_model()
    set_params(model, 1.0)
    ema = EMA(model, decay=0.9)
    # Parameters go 1 -> 2 -> 4 -> 0 (one value per update); by hand with d = 0.9:
    #   e0 = 1
    #   e1 = 0.9·1    + 0.1·2 = 1.1
    #   e2 = 0.9·1.1  + 0.1·4 = 1.39
    #   e3 = 0.9·1.39 + 0.1·0 = 1.251
    for value, expect in [(2.0, 1.1), (4.0, 1.39), (0.0, 1.251)]:
        set_params(model, value)
        ema.update(model)
        for name, t in ema.state_dict().items():
            assert t.dtype == torch.float32
            torch.testing.assert_close(t, torch.full_like(t, expect), atol=1e-6, rtol=0, msg=name)
    # Live weights are untouched by update().
    assert all(torch.all(p == 0.0) for p in model.parameters())


def test_ema_per_element_matches_formula():
    model = small_model()
    ema = EMA(model, decay=0.99)
    init = {k: v.double().clone() for k, v in model.state_dict().items()}
    want = dict(init)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        ema.update(model)
        want = {k: 0.99 * want[k] + 0.01 * dict(model.named_parameters())[k].double() for k in want}
    for k, t in ema.state_dict().items():
        torch.testing.assert_close(t.double(), want[k], atol=1e-6, rtol=0)


def test_bf16_model_keeps_fp32_shadow():
    model = small_model().to(torch.bfloat16)
    set_params(model, 1.0)
    ema = EMA(model, decay=0.9999)
    set_params(model, 2.0)
    ema.update(model)
    # 1 + 1e-4·(2 − 1) = 1.0001: below bf16 resolution near 1 (2^-7), kept by the fp32 shadow.
    for t in ema.state_dict().values():
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, torch.full_like(t, 1.0001), atol=1e-7, rtol=0)
    ema.copy_to(model)  # cast back to the parameter dtype
    assert all(p.dtype == torch.bfloat16 and torch.all(p == 1.0) for p in model.parameters())


def test_copy_to_and_swapped_in():
    model = small_model()
    ema = EMA(model, decay=0.5)
    live0 = {k: v.clone() for k, v in model.state_dict().items()}
    set_params(model, 3.0)
    ema.update(model)  # shadow = (live0 + 3) / 2
    with ema.swapped_in(model) as m:
        assert m is model
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, (live0[k] + 3.0) / 2)
    assert all(torch.all(p == 3.0) for p in model.parameters())  # restored
    # Restored even when the body raises.
    with pytest.raises(RuntimeError):
        with ema.swapped_in(model):
            raise RuntimeError("boom")
    assert all(torch.all(p == 3.0) for p in model.parameters())
    ema.copy_to(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, (live0[k] + 3.0) / 2)


def test_state_dict_round_trip():
    straight = small_model()
    ema = EMA(straight, decay=0.9)
    for value in (1.0, 2.0, 3.0):
        set_params(straight, value)
        ema.update(straight)

    model = small_model()
    first = EMA(model, decay=0.9)
    for value in (1.0, 2.0):
        set_params(model, value)
        first.update(model)
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    other = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1, bias=False))  # different init
    resumed = EMA(other, decay=0.9)
    resumed.load_state_dict(saved)
    set_params(other, 3.0)
    resumed.update(other)
    for k, v in ema.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k

    with pytest.raises(KeyError, match="missing"):
        resumed.load_state_dict({"0.weight": saved["0.weight"]})
    bad = dict(saved, **{"0.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="'0.bias'"):
        resumed.load_state_dict(bad)
    with pytest.raises(KeyError, match="differ"):
        resumed.update(nn.Linear(3, 2))


def test_wrapped_models(tmp_path):
    model = small_model()
    compiled = torch.compile(model)  # an OptimizedModule; never called, so nothing is compiled
    assert unwrap_model(compiled) is model
    ema = EMA(compiled, decay=0.5)
    assert set(ema.state_dict()) == {"0.weight", "0.bias", "1.weight"}  # no "_orig_mod." prefix

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(compiled)
        assert unwrap_model(ddp) is model
        set_params(model, 2.0)
        ema.update(ddp)
        ema.copy_to(ddp)
        for p, p0 in zip(model.parameters(), small_model().parameters()):
            torch.testing.assert_close(p.detach(), (p0.detach() + 2.0) / 2, atol=1e-6, rtol=0)
    finally:
        dist.destroy_process_group()

    # A model whose submodule happens to be called `module` is not a wrapper.
    holder = nn.Module()
    holder.module = nn.Linear(2, 2)
    assert unwrap_model(holder) is holder
