"""DDP weak scaling of ELF-B/M/L on paper: gradient bytes per step against step time.

    python benchmarks/scaling_calculator.py [--mfu 0.35] [--per-gpu-batch 32] [--seq-len 1024] [--peak-tflops 989.4]

prints the markdown table of cluster/README.md ("Scaling on paper"; tests/cluster/test_cluster_manifests.py
checks the README holds this script's output for the default arguments).

Model, all estimates until measured (benchmarks/README.md holds measured single-GPU figures):

* compute per step and GPU = the FLOPs ELF Lab's step executes (``elf_core.flops.step_flops`` with
  the expected row mix: 20 % decode rows, self-conditioning on half the rest; reference §6) for
  ``per-gpu-batch × seq-len`` tokens, at an assumed MFU of the bf16 dense peak;
* DDP all-reduces fp32 gradients, ``4 × params`` bytes; a ring all-reduce moves
  ``2(n−1)/n × bytes`` through each GPU; ELF Lab's distributed Muon then broadcasts each updated
  2-D parameter from the rank that orthogonalised it: ``(n−1)/n × 4 × params`` more, after backward;
* time = bytes / bus bandwidth: NVLink per GPU inside a node; across nodes NCCL spreads its rings
  over all of a node's NICs, so the node's total NIC bandwidth;
* efficiency = compute / (compute + communication), i.e. **no overlap** — a lower bound: DDP
  overlaps the all-reduce with backward, the Muon broadcasts are not overlapped;
* bandwidth terms only (no per-message latency; NCCL switches to trees at scale).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

PRESETS = ("ELF-B", "ELF-M", "ELF-L")
LATENT_DIM, VOCAB = 512, 32100  # T5-small (reference §5)
# (label, GPUs, bus bandwidth in bytes/s)
SETUPS: tuple[tuple[str, int, float], ...] = (
    ("8 GPUs, 1 node, NVLink 450 GB/s/GPU", 8, 450e9),
    ("16 GPUs, 2 nodes, IB 400 Gb/s per GPU (400 GB/s per node)", 16, 8 * 400e9 / 8),
    ("16 GPUs, 2 nodes, 100 Gb/s Ethernet per node", 16, 100e9 / 8),
    ("64 GPUs, 8 nodes, IB 400 Gb/s per GPU", 64, 8 * 400e9 / 8),
    ("64 GPUs, 8 nodes, 100 Gb/s Ethernet per node", 64, 100e9 / 8),
)
DECODE_FRACTION, SELF_COND_FRACTION = 0.2, 0.5  # FlowConfig defaults of the OWT runs


@dataclass(frozen=True)
class ModelCost:
    preset: str
    params: int
    grad_bytes: float
    flops_per_gpu_step: float


def model_cost(preset: str, per_gpu_batch: int, seq_len: int) -> ModelCost:
    """Parameter count (built on the meta device: no memory) and executed FLOPs of one GPU's step."""
    import torch

    from elf_core.config import MODEL_PRESETS, ModelConfig
    from elf_core.flops import model_flops, step_flops
    from elf_core.network import ELFNetwork, count_parameters

    cfg = ModelConfig(preset=preset, **MODEL_PRESETS[preset])
    with torch.device("meta"):
        params = count_parameters(ELFNetwork(cfg, LATENT_DIM, VOCAB))
    mf = model_flops(cfg, LATENT_DIM, VOCAB, seq_len)
    rows = per_gpu_batch
    denoise = rows * (1 - DECODE_FRACTION)
    flops = step_flops(mf, rows, round(denoise), round(denoise * SELF_COND_FRACTION), round(rows * DECODE_FRACTION))
    return ModelCost(preset, params, 4.0 * params, flops)


def comm_seconds(grad_bytes: float, n: int, bus_bw: float) -> float:
    """All-reduce ``2(n−1)/n × bytes`` plus the Muon broadcasts ``(n−1)/n × bytes``, at ``bus_bw``."""
    return 3 * (n - 1) / n * grad_bytes / bus_bw


def table(mfu: float = 0.35, per_gpu_batch: int = 32, seq_len: int = 1024, peak_tflops: float = 989.4) -> str:
    costs = [model_cost(p, per_gpu_batch, seq_len) for p in PRESETS]
    lines = [
        f"Per GPU: {per_gpu_batch} × {seq_len} tokens per step, assumed MFU {mfu:.0%} of {peak_tflops:g} TFLOP/s "
        f"(bf16 dense, H100/H200). Communication: fp32 gradient all-reduce + Muon broadcasts, "
        f"`3(n−1)/n × 4·params` bytes per GPU. Efficiency = compute / (compute + communication), no overlap.",
        "",
        "| | " + " | ".join(c.preset for c in costs) + " |",
        "| --- | " + " | ".join("---:" for _ in costs) + " |",
        "| parameters | " + " | ".join(f"{c.params / 1e6:.1f} M" for c in costs) + " |",
        "| fp32 gradient bytes per step | " + " | ".join(f"{c.grad_bytes / 1e6:,.0f} MB" for c in costs) + " |",
        "| executed TFLOP per GPU step | " + " | ".join(f"{c.flops_per_gpu_step / 1e12:.1f}" for c in costs) + " |",
        "| compute time per step | " + " | ".join(
            f"{c.flops_per_gpu_step / (mfu * peak_tflops * 1e12) * 1e3:,.0f} ms" for c in costs) + " |",
    ]
    for label, n, bw in SETUPS:
        cells = []
        for c in costs:
            t = c.flops_per_gpu_step / (mfu * peak_tflops * 1e12)
            comm = comm_seconds(c.grad_bytes, n, bw)
            cells.append(f"{comm * 1e3:,.1f} ms → {t / (t + comm):.0%}")
        lines.append(f"| {label}: communication → efficiency | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mfu", type=float, default=0.35)
    ap.add_argument("--per-gpu-batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--peak-tflops", type=float, default=989.4)
    a = ap.parse_args(argv)
    print(table(a.mfu, a.per_gpu_batch, a.seq_len, a.peak_tflops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
