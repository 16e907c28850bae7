"""The ELF transformer (spec §2, reference §2.3): x-prediction over encoder latents.

``net([z ; x_sc], t, w, gate) -> (x_hat, logits)``. Prefix control tokens, in the official order:
4 time tokens, 4 SC-CFG tokens, 4 mode tokens, then the S text positions. The input path and both
heads run in fp32 with autocast off; the blocks run under whatever autocast the caller sets (bf16 on
GPU). Attention is full and bidirectional with **no mask** (pads included), through
``F.scaled_dot_product_attention``. Parameter names follow the official PyTorch port so that its
checkpoints load key-for-key (see :mod:`elf_core.checkpoint`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from elf_core.config import ModelConfig

Gate = Optional[torch.Tensor | bool | float]


def autocast_for(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; a no-op elsewhere (CPU runs stay fp32 and deterministic)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _fp32_region(device: torch.device):
    return torch.autocast(device.type, enabled=False)


def _linear(fan_in: int, fan_out: int, bias: bool = True, std: float | None = None) -> nn.Linear:
    """Linear with the official init: xavier-uniform (or N(0, std)) weight, zero bias."""
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    if std is None:
        nn.init.xavier_uniform_(layer.weight)
    else:
        nn.init.normal_(layer.weight, std=std)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class RMSNorm(nn.Module):
    """``w · h · rsqrt(mean(h²) + eps)``; variance in fp32, ``inv_std`` cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        inv_std = torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + self.eps).to(h.dtype)
        return self.weight.to(h.dtype) * (h * inv_std)


def sincos_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) scalars -> (B, dim) ``[cos(t f_i), sin(t f_i)]`` with f_i = max_period^(-i/half). Raw t, no ×1000."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ScalarEmbedder(nn.Module):
    """MLP(sincos(s)): 256 -> H -> SiLU -> H, weights N(0, 0.02) (used for t and for w)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp_0 = _linear(freq_dim, hidden, std=0.02)
        self.mlp_2 = _linear(hidden, hidden, std=0.02)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mlp_2(F.silu(self.mlp_0(sincos_features(s, self.freq_dim))))


class BottleneckProj(nn.Module):
    """D -> 128 (no bias) -> H: the text input projection."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int):
        super().__init__()
        self.proj1 = _linear(in_dim, bottleneck, bias=False)
        self.proj2 = _linear(bottleneck, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj1(x))


def rope_tables(num_prefix: int, seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (num_prefix + seq_len, head_dim) for interleaved-pair (GPT-J) RoPE.

    Text position j (0-based) rotates pair i = (2i, 2i+1) by angle ``j · theta^(-2i/head_dim)``;
    the prefix control tokens get the identity (cos 1, sin 0).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq[None]
    angles = angles.repeat_interleave(2, dim=-1)  # (S, hd): each angle twice, once per pair member
    cos = torch.cat([torch.ones(num_prefix, head_dim, device=device), angles.cos()])
    sin = torch.cat([torch.zeros(num_prefix, head_dim, device=device), angles.sin()])
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., N, hd): ``x·cos + rot(x)·sin`` with rot(a, b) = (−b, a) on each interleaved pair."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Fused qkv (bias), qk-RMSNorm over head_dim, RoPE, SDPA without a mask, out-proj (bias)."""

    def __init__(self, hidden: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.qkv = _linear(hidden, 3 * hidden)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.proj = _linear(hidden, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, N, H = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, hd), scale 1/sqrt(hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, H))


class SwiGLU(nn.Module):
    """``w3(silu(a) * b)`` with ``[a, b] = w12(x)``; F = int(mlp_hidden · 2/3)."""

    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        inner = int(mlp_hidden * 2 / 3)
        self.w12 = _linear(hidden, 2 * inner)
        self.w3 = _linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = RMSNorm(hidden, eps)
        self.attn = Attention(hidden, num_heads, eps)
        self.norm2 = RMSNorm(hidden, eps)
        self.mlp = SwiGLU(hidden, int(hidden * mlp_ratio))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class DenoiseHead(nn.Module):
    """RMSNorm + zero-initialised Linear H -> D: the x-prediction."""

    def __init__(self, hidden: int, latent_dim: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden, 1e-6)
        self.linear = nn.Linear(hidden, latent_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(y))


class ELFNetwork(nn.Module):
    """The ELF denoiser/decoder. ``latent_dim`` = encoder width D, ``vocab_size`` = decode classes."""

    def __init__(self, cfg: ModelConfig, latent_dim: int, vocab_size: int):
        super().__init__()
        if cfg.depth is None or cfg.hidden_size is None or cfg.num_heads is None:
            raise ValueError("ModelConfig is not resolved (run elf_core.config.resolve first)")
        H = cfg.hidden_size
        self.cfg = cfg
        self.latent_dim = latent_dim
        self.vocab_size = vocab_size
        self.num_prefix = cfg.num_time_tokens + cfg.num_sc_cfg_tokens + cfg.num_mode_tokens

        self.self_cond_proj = _linear(2 * latent_dim, latent_dim)
        self.text_proj = BottleneckProj(latent_dim, H, cfg.bottleneck_dim)
        self.t_embedder = ScalarEmbedder(H, cfg.freq_embed_dim)
        self.t_emb_tokens = nn.Parameter(torch.randn(1, cfg.num_time_tokens, H) * 0.02)
        self.self_cond_cfg_embedder = ScalarEmbedder(H, cfg.freq_embed_dim)
        self.self_cond_cfg_tokens = nn.Parameter(torch.randn(1, cfg.num_sc_cfg_tokens, H) * 0.02)
        self.mode_tokens = nn.Parameter(torch.randn(1, cfg.num_mode_tokens, H) * 0.02)
        self.blocks = nn.ModuleList(Block(H, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps) for _ in range(cfg.depth))
        self.final_layer = DenoiseHead(H, latent_dim)
        # Factored decode head, stored as bare (in, out) kernels like the official port.
        self.proj_kernel = nn.Parameter(nn.init.xavier_uniform_(torch.empty(H, latent_dim)))
        self.proj_bias = nn.Parameter(torch.zeros(latent_dim))
        self.unembed_kernel = nn.Parameter(nn.init.xavier_uniform_(torch.empty(latent_dim, vocab_size)))
        self.unembed_bias = nn.Parameter(torch.zeros(vocab_size))
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------
    def _rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, str(device))
        if key not in self._rope_cache:
            hd = self.cfg.hidden_size // self.cfg.num_heads
            self._rope_cache[key] = rope_tables(self.num_prefix, seq_len, hd, self.cfg.rope_theta, device)
        return self._rope_cache[key]

    @staticmethod
    def _per_example(value: torch.Tensor | float | bool | None, batch: int, device) -> torch.Tensor:
        if value is None:
            return torch.zeros(batch, device=device)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.to(device=device, dtype=torch.float32)
        return torch.full((batch,), float(value), device=device)

    def features(self, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor | float, gate: Gate = None) -> torch.Tensor:
        """Final hidden states of the S text positions, (B, S, H), before either head.

        x: (B, S, 2D) = [z ; x_sc] (or (B, S, D): no self-conditioning half). t, w: (B,) or scalars.
        gate: mode-token gate — None/0 denoise, 1 decode, or a (B,) tensor (per-example branching).
        """
        B, S, _ = x.shape
        dev = x.device
        with _fp32_region(dev):
            h = x.float()
            if h.shape[-1] == 2 * self.latent_dim:
                h = self.self_cond_proj(h)
            h = self.text_proj(h)
            t_tok = self.t_emb_tokens + self.t_embedder(self._per_example(t, B, dev))[:, None]
            w_tok = self.self_cond_cfg_tokens + self.self_cond_cfg_embedder(self._per_example(w, B, dev))[:, None]
            m_tok = self.mode_tokens * self._per_example(gate, B, dev).view(B, 1, 1)
            seq = torch.cat([t_tok, w_tok, m_tok, h], dim=1)  # (B, 12 + S, H)
        cos, sin = self._rope(S, dev)
        ckpt = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if ckpt:
                seq = torch.utils.checkpoint.checkpoint(block, seq, cos, sin, use_reentrant=False)
            else:
                seq = block(seq, cos, sin)
        return seq[:, self.num_prefix:]

    def denoise(self, y: torch.Tensor) -> torch.Tensor:
        """x-prediction (B, S, D) from hidden states, in fp32."""
        with _fp32_region(y.device):
            return self.final_layer(y.float())

    def decode_logits(self, y: torch.Tensor) -> torch.Tensor:
        """Token logits (..., V) from hidden states: ``gelu_tanh(y P + b) U + c``, in fp32."""
        with _fp32_region(y.device):
            hidden = F.gelu(y.float() @ self.proj_kernel + self.proj_bias, approximate="tanh")
            return hidden @ self.unembed_kernel + self.unembed_bias

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, w: torch.Tensor | float,
                gate: Gate = None, logits_rows: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(x_hat, logits)``; logits only when a gate is given (the official contract).

        ``logits_rows`` (1-D row indices) restricts the decode head to those rows — logits then have
        shape (len(rows), S, V). An empty index still runs the head on zero rows, so every parameter
        takes part in the graph (DDP needs that without ``find_unused_parameters``).
        """
        y = self.features(x, t, w, gate)
        if gate is None:
            return self.denoise(y), None
        return self.denoise(y), self.decode_logits(y if logits_rows is None else y[logits_rows])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
