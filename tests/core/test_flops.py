"""FLOPs accounting (reference §6) and the throughput benchmark's arithmetic."""

from __future__ import annotations

import pytest

from elf_core.config import load_config
from elf_core.flops import model_flops, official_step_flops, peak_flops, step_flops

# Reference §6, GFLOP per token at S = 1024: (F_n, decode head extra, T5 encoder forward)
REFERENCE = {"ELF-B": (0.2127, 0.0337, 0.0503), "ELF-M": (0.7586, 0.0340, 0.0503), "ELF-L": (1.4475, 0.0342, 0.0503)}
# Reference §6, the PyTorch step as implemented (enc + 2 F_n + 3 F_d), GFLOP/token at S = 1024 / 128 / 1088
OFFICIAL_STEP = {"ELF-B": (1.215, 1.108, 1.227), "ELF-M": (3.945, 3.744, 3.976), "ELF-L": (7.390, 7.163, 7.439)}


@pytest.mark.parametrize("preset", sorted(REFERENCE))
def test_per_token_flops_match_reference(preset):
    m = load_config(overrides=[f"model.preset={preset}"]).model
    mf = model_flops(m, 512, 32100, 1024)
    got = tuple(round(mf.per_token(x) / 1e9, 4) for x in (mf.denoise_forward, mf.decode_head, mf.encoder_forward))
    assert got == REFERENCE[preset]
    for S, expected in zip((1024, 128, 1088), OFFICIAL_STEP[preset]):
        mf = model_flops(m, 512, 32100, S)
        assert official_step_flops(mf, 1) / S / 1e9 == pytest.approx(expected, abs=1e-3)  # reference rounds to 3 decimals


def test_executed_flops_skip_unneeded_rows():
    m = load_config(overrides=["model.preset=ELF-B"]).model
    mf = model_flops(m, 512, 32100, 1024)
    rows = 10
    # every pass on every row: the official count
    assert step_flops(mf, rows, rows, rows, rows) == pytest.approx(official_step_flops(mf, rows))
    # in expectation (20 % decode, half self-conditioning) ELF Lab executes the reference's "minimum":
    # enc + 0.8 F_n + 0.4 F_n + 3 (0.2 F_d + 0.8 F_n) = 0.964 GF/token for ELF-B
    assert step_flops(mf, 10, 8, 4, 2) / 10 / 1024 / 1e9 == pytest.approx(0.964, abs=1e-3)


def test_peak_flops_lookup():
    assert peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_flops("Some Unknown GPU") is None


def test_benchmark_runs_a_real_step_and_reports_consistent_figures():
    from benchmarks.train_throughput import main
    r = main(["--preset", "tiny", "--batch-size", "2", "--seq-len", "8", "--steps", "1", "--warmup", "0",
              "--device", "cpu", "--no-encoder", "--vocab", "64", "--override", "model.hidden_size=32"])
    assert r["tokens_per_s"] == pytest.approx(16 / r["step_time_s"])
    assert r["tflops_per_s"] > 0 and r["mfu"] is None and r["params"] > 0
