"""The Zen 1 stand-in of ``benchmarks/machine.py`` really limits the kernels a fresh process uses:
MKL reports SSE4.2 GEMM kernels and ATen dispatches AVX2 at most; ``embedded_default.py
--zen1-proxy`` gives each run those variables and records them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import embedded_default  # noqa: E402
from benchmarks.machine import ZEN1_PROXY_ENV, isa_limits  # noqa: E402

PROBE = "import torch; a = torch.randn(64, 64); a @ a; print('capability', torch.backends.cpu.get_cpu_capability())"


def _intel() -> bool:
    try:
        return "GenuineIntel" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch has no MKL")
@pytest.mark.skipif(not _intel(), reason="the stand-in is calibrated on Intel CPUs only (benchmarks/machine.py)")
def test_the_zen1_proxy_limits_mkl_and_aten_in_a_fresh_process():
    env = {**os.environ, **ZEN1_PROXY_ENV, "MKL_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120).stdout
    mkl = next((line for line in out.splitlines() if line.startswith("MKL_VERBOSE oneMKL")), "")
    assert "SSE4.2" in mkl and "AVX-512" not in mkl, mkl
    assert "capability AVX2" in out
    assert "SGEMM" in out  # the matmul went through MKL, the library the limit applies to


def test_isa_limits_and_the_benchmarks_run_env(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # run_env's fresh ELF_LAB_ROOTs land here
    assert isa_limits({"PATH": "/bin"}) == {}
    assert isa_limits({**ZEN1_PROXY_ENV, "PATH": "/bin"}) == ZEN1_PROXY_ENV
    env = embedded_default.run_env("this checkout", Path("/code"), zen1_proxy=True)
    assert isa_limits(env) == ZEN1_PROXY_ENV and env["PYTHONPATH"] == "/code"
    assert Path(env["ELF_LAB_ROOT"]).is_dir() and not any(Path(env["ELF_LAB_ROOT"]).iterdir())
    plain = embedded_default.run_env("this checkout", Path("/code"))
    assert {k: plain.get(k) for k in ZEN1_PROXY_ENV} == {k: os.environ.get(k) for k in ZEN1_PROXY_ENV}
    assert Path(env["ELF_LAB_ROOT"]).parent == tmp_path and Path(plain["ELF_LAB_ROOT"]).parent == tmp_path
