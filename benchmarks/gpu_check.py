"""One-command GPU check of ELF Lab: training speed and MFU, compile, memory, sampling, bf16 vs fp32.

    python benchmarks/gpu_check.py --out gpu_check.json          # one H100/H200, < 8 min
    python benchmarks/gpu_check.py --smoke --out smoke.json      # CPU, tiny model, < 1 min (CI)

Needs torch, transformers and omegaconf only (no Ray, no MLflow). Runs the real
``ELFTrainer.step`` (frozen T5-small-shaped encoder with random weights built from a
``T5Config``, :func:`benchmarks.train_throughput.t5_shaped_encoder`; both self-conditioning
passes; backward; clipping; Muon + Adam; EMA) on synthetic token ids and prints ONE markdown
table, also written with every number to ``--out`` (JSON). Rows:

* ``ELF-B eager bs16 / bs32`` and ``ELF-B compile bs16 / bs32`` at S = 1024: tokens/s, step time,
  executed TFLOP/s and MFU (:mod:`elf_core.flops`: the FLOPs the step executes; peak from
  :func:`elf_core.flops.peak_flops`), peak memory, and for compile the number of graphs dynamo built;
* ``ELF-B all_rows bs32``: the official port's compute pattern (every pass on every row) on the
  same data and draws — its step time over the row-skipping step's is the row-skipping gain, and
  its loss must equal the row-skipping loss;
* ``ELF-M bs16`` plain and with activation checkpointing (``model.gradient_checkpointing``): what
  FSDP2's settings change on one GPU, where FSDP2 itself shards nothing (peak memory, step time);
* ``bf16 vs fp32``: 20 steps of ELF-B from the same weights, data and draws with bf16 autocast and
  in strict fp32 (TF32 off); passes when every step's losses agree to ``BF16_REL_TOL`` relative;
* ``sampling``: 1000 unconditional samples, 32-step SDE (γ 1.5, w 3), ELF-B, S = 1024, bf16:
  samples/s and the executed TFLOP/s of the 33 network calls per sample.

Every row runs guarded: an error (compile failing, out of memory) is recorded in its row and the
others still run. ``--budget-s`` (default 420) bounds the wall time: rows not started when it is
spent are marked skipped (a row already running finishes, so the total can exceed the budget by
the longest row — a compile). Rows run cheap-first; the table keeps the order above. ``--only``
runs a subset (e.g. ``--only compile``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model  # noqa: E402
from benchmarks.train_throughput import t5_shaped_encoder  # noqa: E402
from elf_core.config import FlowConfig, SampleConfig, load_config  # noqa: E402
from elf_core.encoder import FrozenEncoder, load_tokenizer  # noqa: E402
from elf_core.flops import model_flops, peak_flops  # noqa: E402
from elf_core.network import ELFNetwork  # noqa: E402
from elf_core.sampling import generate  # noqa: E402
from elf_core.trainer import ELFTrainer  # noqa: E402

BF16_REL_TOL = 2e-2  # |loss_bf16 − loss_fp32| / loss_fp32 allowed at every one of the 20 steps
COLUMNS = ("row", "model", "throughput", "step time (s)", "TFLOP/s", "MFU", "peak mem (GB)", "notes", "status")


@dataclass(frozen=True)
class Scale:
    """Sizes of a run: the real check (GPU) or the smoke test (CPU)."""

    seq_len: int
    batch_sizes: tuple[int, int]
    big: str  # the "ELF-B" preset
    medium: str  # the "ELF-M" preset
    warmup: int
    steps: int
    compare_steps: int
    samples: int
    sample_steps: int
    sample_batch: int
    encoder: dict = field(default_factory=dict)  # t5_shaped_encoder sizes
    overrides: tuple[str, ...] = ()


# sample_batch 125: the final decode materialises fp32 logits of 125 × 1024 × 32100 (16 GB).
FULL = Scale(1024, (16, 32), "ELF-B", "ELF-M", warmup=3, steps=10, compare_steps=20, samples=1000,
             sample_steps=32, sample_batch=125)
SMOKE = Scale(32, (4, 8), "tiny", "tiny", warmup=1, steps=2, compare_steps=20, samples=8, sample_steps=4,
              sample_batch=4, encoder=dict(d_model=64, d_ff=128, num_layers=2, num_heads=4),
              overrides=("optim.adam_params=[unembed_kernel]",))


class CountingBackend:
    """A dynamo backend that counts the graphs it compiles and hands them to ``name``."""

    def __init__(self, name: str) -> None:
        from torch._dynamo import lookup_backend

        self.inner, self.graphs = lookup_backend(name), 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


class Check:
    """Shared state of one run: device, encoder, the sizes, the budget and the finished rows."""

    def __init__(self, scale: Scale, device: torch.device, budget_s: float, compile_backend: str,
                 only: Sequence[str] = ()) -> None:
        self.scale, self.device, self.budget_s, self.compile_backend = scale, device, budget_s, compile_backend
        self.only = tuple(only)
        self.started = time.perf_counter()
        self.peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.tokenizer = load_tokenizer("t5-small")  # vendored: no hub access
        torch.manual_seed(0)
        self.t5 = t5_shaped_encoder(device, **scale.encoder)
        self.rows: dict[str, dict[str, Any]] = {}

    def encoder(self, fp32: bool = False) -> FrozenEncoder:
        return FrozenEncoder(self.t5, self.tokenizer, 0.0, 0.2, dtype="float32" if fp32 else "auto", name="t5-shaped")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fresh_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gb(self) -> Optional[float]:
        return torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else None

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Run one row guarded: errors are recorded in the row, the budget skips rows not started."""
        row: dict[str, Any] = {"row": name}
        if self.only and not any(part in name for part in self.only):
            row["status"] = "skipped: not selected (--only)"
        elif self.elapsed() >= self.budget_s:
            row["status"] = f"skipped: budget of {self.budget_s:g} s spent ({self.elapsed():.0f} s elapsed)"
        else:
            t0 = time.perf_counter()
            try:
                self.fresh_memory()
                row.update(fn())
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 — any failure belongs in the table, not a traceback
                first = (str(e).strip().splitlines() or [""])[0][:200]
                row["status"] = f"error: {type(e).__name__}: {first}"
            row["wall_s"] = time.perf_counter() - t0
        self.rows[name] = row


# ----------------------------------------------------------------------------------------------
def _config(check: Check, preset: str, batch: int, *extra: str):
    return load_config(overrides=[f"model.preset={preset}", f"data.max_length={check.scale.seq_len}",
                                  f"train.global_batch_size={batch}", "optim.warmup_epochs=null",
                                  "optim.warmup_steps=2", *check.scale.overrides, *extra])


def _batch(check: Check, batch: int, step: int, vocab: int) -> dict[str, torch.Tensor]:
    """Synthetic unconditional full rows (no pad), different per step, identical across rows."""
    S, dev = check.scale.seq_len, check.device
    gen = torch.Generator(device=dev).manual_seed(1000 + step)
    return dict(input_ids=torch.randint(2, vocab, (batch, S), generator=gen, device=dev),
                encoder_mask=torch.ones(batch, S, S, dtype=torch.bool, device=dev),
                cond_mask=torch.zeros(batch, S, dtype=torch.bool, device=dev),
                loss_mask=torch.ones(batch, S, device=dev))


def _trainer(check: Check, cfg, encoder: FrozenEncoder, *, all_rows: bool = False,
             backend: Optional[CountingBackend] = None) -> ELFTrainer:
    torch.manual_seed(0)
    net = ELFNetwork(cfg.model, encoder.dim, encoder.vocab_size)
    mf = model_flops(cfg.model, encoder.dim, encoder.vocab_size, check.scale.seq_len, **_encoder_shape(check))
    # One GPU: wrap_for_training would be torch.compile(net); here with a graph-counting backend.
    wrap = None if backend is None else (lambda m: torch.compile(m, backend=backend))
    return ELFTrainer(cfg, net, encoder, device=check.device, steps_per_epoch=1000, wrap=wrap, model_flops=mf,
                      all_rows=all_rows)


def _encoder_shape(check: Check) -> dict[str, int]:
    c = check.t5.config
    return dict(encoder_layers=c.num_layers, encoder_dim=c.d_model, encoder_ff=c.d_ff)


def _timed_steps(check: Check, trainer: ELFTrainer, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """Warm up, then ``steps`` steps without host syncs; one sync at the end. ``losses``: every step's."""
    V = trainer.net.vocab_size
    losses = [trainer.step(_batch(check, batch, s, V))["loss"] for s in range(warmup)]
    check.sync()
    t0 = time.perf_counter()
    pending = [trainer.step(_batch(check, batch, warmup + s, V), sync=False) for s in range(steps)]
    losses += [m.materialize()["loss"] for m in pending]
    check.sync()
    dt = (time.perf_counter() - t0) / steps
    flops = sum(m.flops for m in pending) / steps
    return dict(step_time_s=dt, tokens_per_s=batch * check.scale.seq_len / dt, tflops_per_s=flops / dt / 1e12,
                mfu=flops / dt / check.peak if check.peak else None, peak_mem_gb=check.peak_memory_gb(),
                flops_per_step=flops, loss=losses[-1], losses=losses)


def train_row(check: Check, preset: str, batch: int, *extra: str, all_rows: bool = False,
              compile: bool = False) -> Callable[[], dict[str, Any]]:
    def fn() -> dict[str, Any]:
        cfg = _config(check, preset, batch, f"train.compile={compile}", *extra)
        backend = CountingBackend(check.compile_backend) if compile else None
        if compile:
            torch._dynamo.reset()
        trainer = _trainer(check, cfg, check.encoder(), all_rows=all_rows, backend=backend)
        # Compiled: two more warm-up steps (first calls after compiling are slow: lazy backward, guards).
        warmup = check.scale.warmup + (2 if compile else 0)
        out = dict(model=preset, batch=batch, **_timed_steps(check, trainer, batch, check.scale.steps, warmup))
        if backend is not None:
            out["graphs"] = backend.graphs
        return out
    return fn


def bf16_vs_fp32(check: Check) -> dict[str, Any]:
    """20 steps from the same weights, data and draws: bf16 autocast against strict fp32."""
    preset, batch, n = check.scale.big, check.scale.batch_sizes[0], check.scale.compare_steps
    losses = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for name, bf16 in (("bf16", True), ("fp32", False)):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bf16 and tf32[0]
            trainer = _trainer(check, _config(check, preset, batch, f"train.bf16={bf16}"), check.encoder(fp32=not bf16))
            losses[name] = [trainer.step(_batch(check, batch, s, trainer.net.vocab_size))["loss"] for s in range(n)]
            del trainer
            check.fresh_memory()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    rel = [abs(a - b) / abs(b) for a, b in zip(losses["bf16"], losses["fp32"])]
    ok = max(rel) <= BF16_REL_TOL
    return dict(model=preset, batch=batch, steps=n, max_rel_diff=max(rel), tolerance=BF16_REL_TOL,
                agree=ok, losses_bf16=losses["bf16"], losses_fp32=losses["fp32"], peak_mem_gb=check.peak_memory_gb(),
                bf16_active=check.device.type == "cuda")


def sampling(check: Check) -> dict[str, Any]:
    sc = check.scale
    cfg = _config(check, sc.big, sc.sample_batch)
    enc = check.encoder()
    torch.manual_seed(0)
    net = ELFNetwork(cfg.model, enc.dim, enc.vocab_size).to(check.device)
    scfg = SampleConfig(sampler="sde", steps=sc.sample_steps, gamma=1.5, sc_cfg=3.0, num_samples=sc.samples,
                        batch_size=sc.sample_batch)
    kw = dict(seq_len=sc.seq_len, seed=0, decode_fn=enc.decode_ids, eos_id=enc.eos_id, pad_id=enc.pad_id, bf16=True)
    generate(net, dataclasses.replace(scfg, steps=2), FlowConfig(), num_samples=sc.sample_batch, **kw)  # warm-up
    check.sync()
    t0 = time.perf_counter()
    texts = generate(net, scfg, FlowConfig(), num_samples=sc.samples, **kw)
    check.sync()
    dt = time.perf_counter() - t0
    mf = model_flops(cfg.model, enc.dim, enc.vocab_size, sc.seq_len)
    flops = sc.samples * ((sc.sample_steps + 1) * mf.denoise_forward + mf.decode_head)  # 32 steps + decode
    return dict(model=sc.big, samples=len(texts), steps=sc.sample_steps, samples_per_s=len(texts) / dt, wall_time_s=dt,
                tflops_per_s=flops / dt / 1e12, mfu=flops / dt / check.peak if check.peak else None,
                peak_mem_gb=check.peak_memory_gb())


# ----------------------------------------------------------------------------------------------
def plan(check: Check) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """(row, function) in run order — cheap rows and one compile row first, so a spent budget costs
    the least; the table is printed in :func:`row_order`."""
    big, med = check.scale.big, check.scale.medium
    b1, b2 = check.scale.batch_sizes
    return [
        (f"ELF-B eager bs{b1}", train_row(check, big, b1)),
        (f"ELF-B eager bs{b2}", train_row(check, big, b2)),
        (f"ELF-B all_rows bs{b2}", train_row(check, big, b2, all_rows=True)),
        (f"ELF-B compile bs{b1}", train_row(check, big, b1, compile=True)),
        ("bf16 vs fp32", lambda: bf16_vs_fp32(check)),
        ("sampling", lambda: sampling(check)),
        (f"ELF-M bs{b1}", train_row(check, med, b1)),
        (f"ELF-M bs{b1} activation ckpt", train_row(check, med, b1, "model.gradient_checkpointing=true")),
        (f"ELF-B compile bs{b2}", train_row(check, big, b2, compile=True)),
    ]


def row_order(check: Check) -> list[str]:
    b1, b2 = check.scale.batch_sizes
    return [f"ELF-B eager bs{b1}", f"ELF-B eager bs{b2}", f"ELF-B compile bs{b1}", f"ELF-B compile bs{b2}",
            f"ELF-B all_rows bs{b2}", f"ELF-M bs{b1}", f"ELF-M bs{b1} activation ckpt", "bf16 vs fp32", "sampling"]


def derive(check: Check) -> None:
    """Cross-row figures: the row-skipping gain and loss agreement, activation checkpointing's cost."""
    b1, b2 = check.scale.batch_sizes
    rows = check.rows
    skip, full = rows.get(f"ELF-B eager bs{b2}", {}), rows.get(f"ELF-B all_rows bs{b2}", {})
    if skip.get("status") == "ok" and full.get("status") == "ok":
        full["row_skipping_speedup"] = full["step_time_s"] / skip["step_time_s"]
        full["flops_ratio"] = full["flops_per_step"] / skip["flops_per_step"]
        full["loss_rel_diff_vs_row_skipping"] = max(abs(a - b) / abs(b) for a, b in zip(full["losses"], skip["losses"]))
    plain, ckpt = rows.get(f"ELF-M bs{b1}", {}), rows.get(f"ELF-M bs{b1} activation ckpt", {})
    if plain.get("status") == "ok" and ckpt.get("status") == "ok":
        ckpt["slowdown_vs_plain"] = ckpt["step_time_s"] / plain["step_time_s"]
        ckpt["loss_rel_diff_vs_plain"] = max(abs(a - b) / abs(b) for a, b in zip(ckpt["losses"], plain["losses"]))
        if ckpt.get("peak_mem_gb") is not None:
            ckpt["memory_ratio_vs_plain"] = ckpt["peak_mem_gb"] / plain["peak_mem_gb"]


def _fmt(x: Optional[float], spec: str) -> str:
    return "–" if x is None else format(x, spec)


def notes(row: dict[str, Any]) -> str:
    parts = []
    if "graphs" in row:
        parts.append(f"{row['graphs']} graphs")
    if "row_skipping_speedup" in row:
        parts.append(f"row skipping {row['row_skipping_speedup']:.2f}x faster; FLOPs x{row['flops_ratio']:.2f}; "
                     f"loss rel diff {row['loss_rel_diff_vs_row_skipping']:.1e}")
    if "slowdown_vs_plain" in row:
        parts.append(f"step x{row['slowdown_vs_plain']:.2f} of plain"
                     + (f", memory x{row['memory_ratio_vs_plain']:.2f}" if "memory_ratio_vs_plain" in row else ""))
    if "max_rel_diff" in row:
        parts.append(f"max rel loss diff {row['max_rel_diff']:.1e} over {row['steps']} steps "
                     f"(tol {row['tolerance']:g}): {'agree' if row['agree'] else 'DISAGREE'}"
                     + ("" if row["bf16_active"] else "; CPU: autocast off, both fp32"))
    if "samples" in row:
        parts.append(f"{row['samples']} samples, {row['steps']}-step SDE, {row['wall_time_s']:.1f} s")
    return "; ".join(parts)


def table(check: Check) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for name in row_order(check):
        r = check.rows.get(name, {"row": name, "status": "not run"})
        thr = (f"{r['samples_per_s']:.2f} samples/s" if "samples_per_s" in r else
               f"{r['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in r else "–")
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        cells = [name, r.get("model", "–"), thr, _fmt(r.get("step_time_s"), ".3f"), _fmt(r.get("tflops_per_s"), ".2f"),
                 "–" if mfu is None else f"{mfu:.1f} %", _fmt(r.get("peak_mem_gb"), ".1f"), notes(r), r["status"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="JSON file for the table and every number")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget; later rows are skipped")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, seconds (the CI test)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    p.add_argument("--compile-backend", default=None, help="dynamo backend (default: inductor; smoke: aot_eager)")
    p.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help="run only the rows whose name contains TEXT (repeatable); the others are marked skipped")
    args = p.parse_args(argv)
    scale = SMOKE if args.smoke else FULL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    check = Check(scale, device, args.budget_s, args.compile_backend or ("aot_eager" if args.smoke else "inductor"),
                  args.only)
    for name, fn in plan(check):
        check.run(name, fn)
    derive(check)
    md = table(check)
    print(md)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu_model()}",
        "torch": torch.__version__, "smoke": args.smoke, "budget_s": args.budget_s, "elapsed_s": check.elapsed(),
        "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "compile_backend": check.compile_backend, "bf16_rel_tol": BF16_REL_TOL,
        "rows": [check.rows.get(n, {"row": n, "status": "not run"}) for n in row_order(check)], "table": md,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
