"""``benchmarks/gpu_check.py --smoke``: every row of the GPU check runs on CPU with a tiny model and
gives consistent numbers, so the script cannot rot while no GPU is at hand. Asserts the table's
rows, that each number the row must have is a finite number and consistent with the others
(tokens/s = rows·S / step time, TFLOP/s = FLOPs / step time), and the behaviour behind the rows:
row skipping executes fewer FLOPs for the same loss, activation checkpointing and the compiled
step change no loss, bf16 equals fp32 on CPU (autocast is CUDA-only), a bounded graph count; a
failing row is recorded while the others run; a spent budget skips rows."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import gpu_check  # noqa: E402

TRAIN = ["ELF-B eager bs4", "ELF-B eager bs8", "ELF-B compile bs4", "ELF-B compile bs8", "ELF-B all_rows bs8",
         "ELF-M bs4", "ELF-M bs4 activation ckpt"]
ROWS = TRAIN + ["bf16 vs fp32", "sampling"]


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "smoke.json"
    result = gpu_check.main(["--smoke", "--out", str(out)])
    return result, json.loads(out.read_text())


def test_smoke_table_has_every_row_with_numbers(smoke):
    result, saved = smoke
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))  # the JSON is what was measured
    rows = {r["row"]: r for r in saved["rows"]}
    assert list(rows) == ROWS and all(r["status"] == "ok" for r in rows.values()), \
        {k: r["status"] for k, r in rows.items()}
    lines = saved["table"].splitlines()
    assert len(lines) == 2 + len(ROWS) and all(f"| {name} |" in saved["table"] for name in ROWS)
    S = gpu_check.SMOKE.seq_len
    for name in TRAIN:
        r = rows[name]
        for key in ("tokens_per_s", "step_time_s", "tflops_per_s", "flops_per_step", "loss"):
            assert _num(r[key]) and r[key] > 0, (name, key)
        assert r["mfu"] is None and r["peak_mem_gb"] is None  # CPU: no peak FLOP/s, no CUDA allocator
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * S / r["step_time_s"], rel=1e-9)
        assert r["tflops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_time_s"] / 1e12, rel=1e-9)
        extra = 2 if "compile" in name else 0  # compiled rows warm up two more steps
        assert len(r["losses"]) == gpu_check.SMOKE.warmup + extra + gpu_check.SMOKE.steps
    s = rows["sampling"]
    assert s["samples"] == gpu_check.SMOKE.samples and _num(s["samples_per_s"]) and s["samples_per_s"] > 0
    assert _num(s["tflops_per_s"]) and s["tflops_per_s"] > 0


def test_smoke_rows_show_the_behaviour_they_measure(smoke):
    rows = {r["row"]: r for r in smoke[1]["rows"]}
    full = rows["ELF-B all_rows bs8"]
    assert full["flops_ratio"] > 1.2  # the official pattern runs passes A/B and the decode head on every row
    assert full["loss_rel_diff_vs_row_skipping"] <= 1e-6 and _num(full["row_skipping_speedup"])
    for b in (4, 8):  # compiled: same losses, at most 3 graphs (tests/core/test_compile.py)
        eager, comp = rows[f"ELF-B eager bs{b}"], rows[f"ELF-B compile bs{b}"]
        n = len(eager["losses"])
        assert comp["graphs"] <= 3 and comp["losses"][:n] == pytest.approx(eager["losses"], rel=1e-6)
    assert rows["ELF-M bs4 activation ckpt"]["loss_rel_diff_vs_plain"] <= 1e-6
    cmp = rows["bf16 vs fp32"]
    assert cmp["steps"] == 20 and not cmp["bf16_active"] and cmp["max_rel_diff"] == 0.0 and cmp["agree"]
    assert cmp["tolerance"] == gpu_check.BF16_REL_TOL
    assert cmp["losses_fp32"][0] != cmp["losses_fp32"][-1]  # 20 real steps: the weights moved


def test_failing_row_is_recorded_and_the_rest_run(tmp_path):
    out = tmp_path / "r.json"
    gpu_check.main(["--smoke", "--out", str(out), "--only", "compile", "--only", "eager bs4",
                    "--compile-backend", "no_such_backend"])
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["ELF-B compile bs4"]["status"].startswith("error: ") and "no_such_backend" in \
        rows["ELF-B compile bs4"]["status"]
    assert rows["ELF-B eager bs4"]["status"] == "ok" and rows["ELF-B eager bs4"]["tokens_per_s"] > 0
    assert rows["sampling"]["status"] == "skipped: not selected (--only)"


def test_spent_budget_skips_rows(tmp_path):
    out = tmp_path / "b.json"
    result = gpu_check.main(["--smoke", "--out", str(out), "--budget-s", "0"])
    assert all(r["status"].startswith("skipped: budget of 0 s spent") for r in result["rows"])
    assert "skipped: budget" in result["table"]
