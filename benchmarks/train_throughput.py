"""Training throughput and MFU of one ELF preset on the device this runs on (needs torch + elf_core only).

    python benchmarks/train_throughput.py --preset ELF-B --batch-size 32 --seq-len 1024 --steps 20
    python benchmarks/train_throughput.py --preset tiny --batch-size 8 --seq-len 64 --device cpu

Runs the real training step — frozen T5-small-shaped encoder (random weights, built from a config:
no download), the ELF loss with both self-conditioning passes, backward, clipping, Muon + Adam and
EMA — on synthetic token ids, and reports tokens/s, step time, executed TFLOP/s and MFU (FLOPs the
step executes, :mod:`elf_core.flops`; dense bf16 peak of the GPU). GPU boxes often lack Ray and
MLflow: this script needs neither. Figures are recorded in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elf_core.config import load_config  # noqa: E402
from elf_core.ema import EMA  # noqa: E402
from elf_core.flops import model_flops, peak_flops, step_flops  # noqa: E402
from elf_core.flow import StepNoise, flow_loss  # noqa: E402
from elf_core.network import ELFNetwork, autocast_for, count_parameters  # noqa: E402
from elf_core.optim import build_optimizer  # noqa: E402


def t5_shaped_encoder(device: torch.device, *, d_model: int = 512, d_ff: int = 2048, num_layers: int = 6,
                      num_heads: int = 8) -> torch.nn.Module:
    """A T5 encoder with random weights built from a config (no download); defaults: T5-small's shape."""
    from transformers import T5Config, T5EncoderModel
    cfg = T5Config(vocab_size=32128, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff, num_layers=num_layers,
                   num_heads=num_heads)
    return T5EncoderModel(cfg).to(device).eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ELF-B", help="ELF-B | ELF-M | ELF-L | tiny")
    p.add_argument("--batch-size", type=int, default=32, help="rows per device per step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, compile)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", action="store_true", help="fp32 everywhere (bf16 autocast is CUDA-only anyway)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--no-encoder", action="store_true", help="skip the frozen encoder (random latents)")
    p.add_argument("--vocab", type=int, default=32100)
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides (key=value)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = load_config(overrides=[f"model.preset={args.preset}", f"data.max_length={args.seq_len}", *args.override])
    bf16 = not args.no_bf16
    D, V, B, S = 512, args.vocab, args.batch_size, args.seq_len
    torch.manual_seed(0)
    net = ELFNetwork(cfg.model, D, V).to(device)
    model = torch.compile(net) if args.compile else net
    opt = build_optimizer(net, cfg.optim, 2e-3)
    ema = EMA(net, cfg.optim.ema_decay)
    encoder = None if args.no_encoder else t5_shaped_encoder(device)
    mf = model_flops(cfg.model, D, V, S)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(2, V, (B, S), device=device, generator=gen)
    cond = torch.zeros(B, S, dtype=torch.bool, device=device)
    loss_mask = torch.ones(B, S, device=device)

    def step() -> float:
        noise = StepNoise.draw((B, S, D), cfg.flow, gen, device)
        if encoder is not None:
            with torch.no_grad(), autocast_for(device, bf16):
                x0 = encoder(input_ids=ids).last_hidden_state.float() / cfg.encoder.latent_std
        else:
            x0 = torch.randn(B, S, D, device=device, generator=gen)
        out = flow_loss(model, x0, ids, cond, loss_mask, noise, cfg.flow, bf16=bf16)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip)
        opt.step()
        ema.update(net)
        opt.zero_grad(set_to_none=True)
        _, dec, sc = noise.host_coins()
        flops = step_flops(mf, B, int((~dec).sum()), int((~dec & sc).sum()), int(dec.sum()))
        return flops if encoder is not None else flops - B * mf.encoder_forward

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    t0, flops = time.perf_counter(), 0.0
    for _ in range(args.steps):
        flops += step()
    sync()
    dt = time.perf_counter() - t0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak = peak_flops(name) if device.type == "cuda" else None
    result = {
        "preset": args.preset, "params": count_parameters(net), "device": name, "batch_size": B, "seq_len": S,
        "bf16": bf16 and device.type == "cuda", "compile": args.compile, "encoder": encoder is not None,
        "steps": args.steps, "step_time_s": dt / args.steps, "tokens_per_s": B * S * args.steps / dt,
        "tflops_per_s": flops / dt / 1e12, "mfu": (flops / dt / peak) if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
