"""FLOPs of ELF forward/backward passes, for MFU (reference §6).

Conventions (the reference's): 2 FLOPs per multiply-add; dense matmuls plus attention QKᵀ and AV
over the full ``P + S`` sequence (P = 12 prefix tokens; no masking, so fully quadratic); norms,
softmax and elementwise ops ignored; backward = 2 × forward. ``F_n`` is one forward without the
decode head, per sequence; the decode head adds ``2·S·(H·D + D·V)``. MFU is reported with the FLOPs
ELF Lab's step actually **executes** (it skips rows whose results are masked out — see
:func:`step_flops`), so it is comparable across runs of this code, not with the official port's
all-rows count.
"""

from __future__ import annotations

from dataclasses import dataclass

from elf_core.config import ModelConfig


@dataclass(frozen=True)
class ModelFlops:
    """Per-sequence forward FLOPs of one ELF network at sequence length S."""

    denoise_forward: float  # F_n: input path + blocks + attention + denoise head
    decode_head: float  # extra for the decode head on every position
    encoder_forward: float  # the frozen encoder (no backward)
    seq_len: int

    def per_token(self, value: float) -> float:
        return value / self.seq_len


def model_flops(m: ModelConfig, latent_dim: int, vocab: int, seq_len: int,
                encoder_layers: int = 6, encoder_dim: int = 512, encoder_ff: int = 2048) -> ModelFlops:
    """FLOPs of one sequence's forward passes. Encoder defaults: T5-small (6 × d512 × ff2048)."""
    H, L, D, S = m.hidden_size, m.depth, latent_dim, seq_len
    N = S + m.num_time_tokens + m.num_sc_cfg_tokens + m.num_mode_tokens
    F = int(int(H * m.mlp_ratio) * 2 / 3)
    block_dense = 2 * N * (4 * H * H + 3 * H * F)  # qkv (3H²) + out-proj (H²) + w12 (2HF) + w3 (FH)
    attention = 4 * N * N * H  # QKᵀ and AV, all heads
    input_path = 2 * S * (2 * D * D + D * m.bottleneck_dim + m.bottleneck_dim * H)
    denoise_head = 2 * S * H * D
    f_n = L * (block_dense + attention) + input_path + denoise_head
    decode = 2 * S * (H * D + D * vocab)
    enc = encoder_layers * (2 * S * (4 * encoder_dim ** 2 + 2 * encoder_dim * encoder_ff) + 4 * S * S * encoder_dim)
    return ModelFlops(float(f_n), float(decode), float(enc), S)


def step_flops(mf: ModelFlops, rows: int, pass_a_rows: int, pass_b_rows: int, decode_rows: int) -> float:
    """FLOPs one training step executes: encoder on every row, no-grad pass A / pass B on the rows
    that run them, forward + backward (3×) of the gradient pass on every row, and the decode head
    (3×) on decode rows only."""
    return (rows * mf.encoder_forward + (pass_a_rows + pass_b_rows) * mf.denoise_forward
            + 3 * rows * mf.denoise_forward + 3 * decode_rows * mf.decode_head)


def official_step_flops(mf: ModelFlops, rows: int) -> float:
    """The official port's count: ``enc + 2·F_n + 3·F_d`` on every row (reference §6)."""
    return rows * (mf.encoder_forward + 2 * mf.denoise_forward + 3 * (mf.denoise_forward + mf.decode_head))


# Dense bf16 peak TFLOP/s of common accelerators (for MFU; keys match torch.cuda.get_device_name).
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a CUDA device name, or None when unknown (MFU is then not logged)."""
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None
