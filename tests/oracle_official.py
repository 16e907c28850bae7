"""TEST ORACLE — an independent, compact re-statement of the official ELF forward and training step.

Written from the semantics of the official PyTorch port (github.com/lillian039/ELF, branch
``pytorch_elf``: src/modules/model.py, src/modules/layers.py, src/train_step.py,
src/utils/sampling_utils.py), for the tests only. It deliberately shares no code with ``elf_core``:
the network is written with explicit attention math (softmax(QKᵀ/√hd)V instead of SDPA), the RoPE
table is built the official way (``pos = arange(L)/L·L``, prefix rows identity), and the step runs
every pass on every row exactly like ``train_step``. Randomness is not drawn here: every draw of
the step is read from a ``StepNoise``-like object (fields drop, t, eps, decode, lam, eps_dec, sc, w),
standing in for the official global-RNG / CPU-generator draws.

Parameter names are the official ones, so ``elf_core.network.ELFNetwork`` state dicts load 1:1.
Only the configuration the paper trains is covered: self-conditioning on (self_cond_prob > 0) and
SC-CFG tokens present; dropout 0; fp32 on CPU (autocast regions of the official code are no-ops).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Network (pt:modules/layers.py, pt:modules/model.py)
class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(n))

    def forward(self, h):
        var = h.float().pow(2).mean(-1, keepdim=True)
        return self.weight.to(h.dtype) * (h * torch.rsqrt(var + self.eps).to(h.dtype))


def rotate_pairs(x):
    """(..., 2k) -> pairs (a, b) become (−b, a) (layers.py rotate_half, '(d r) -> d r', r=2)."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((-b, a), -1).flatten(-2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq: int = 256):
        super().__init__()
        self.freq = freq
        self.mlp_0, self.mlp_2 = nn.Linear(freq, hidden), nn.Linear(hidden, hidden)

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        f = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
        args = t[:, None].float() * f[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
        return torch.cat([emb, torch.zeros_like(emb[:, :1])], -1) if dim % 2 else emb

    def forward(self, t):
        return self.mlp_2(F.silu(self.mlp_0(self.timestep_embedding(t, self.freq))))


class BottleneckTextProj(nn.Module):
    def __init__(self, d: int, hidden: int, bn: int):
        super().__init__()
        self.proj1, self.proj2 = nn.Linear(d, bn, bias=False), nn.Linear(bn, hidden)

    def forward(self, x):
        return self.proj2(self.proj1(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = RMSNorm(self.hd), RMSNorm(self.hd)

    def forward(self, x, cos, sin):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_pairs(q) * sin
        k = k * cos + rotate_pairs(k) * sin
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd), dim=-1)  # no mask
        return self.proj((att @ v).permute(0, 2, 1, 3).reshape(B, N, C))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        eff = int(hidden * 2 / 3)
        self.w12, self.w3 = nn.Linear(dim, 2 * eff), nn.Linear(eff, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, -1)
        return self.w3(F.silu(x1) * x2)


class ELFBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(hidden), RMSNorm(hidden)
        self.attn = Attention(hidden, heads)
        self.mlp = SwiGLUFFN(hidden, int(hidden * mlp_ratio))

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.norm_final, self.linear = RMSNorm(hidden), nn.Linear(hidden, out)

    def forward(self, x):
        return self.linear(self.norm_final(x))


class ELF(nn.Module):
    """Official ``ELF`` (self-cond input, 4+4+4 prefix tokens), parameter names as in the port."""

    def __init__(self, d: int, max_length: int, hidden: int, depth: int, heads: int, vocab: int,
                 bottleneck: int = 128, n_time: int = 4, n_sc: int = 4, n_mode: int = 4):
        super().__init__()
        self.d = d
        self.self_cond_proj = nn.Linear(2 * d, d)
        self.text_proj = BottleneckTextProj(d, hidden, bottleneck)
        self.t_embedder = TimestepEmbedder(hidden)
        self.t_emb_tokens = nn.Parameter(torch.zeros(1, n_time, hidden))
        self.self_cond_cfg_embedder = TimestepEmbedder(hidden)
        self.self_cond_cfg_tokens = nn.Parameter(torch.zeros(1, n_sc, hidden))
        self.mode_tokens = nn.Parameter(torch.zeros(1, n_mode, hidden))
        self.blocks = nn.ModuleList(ELFBlock(hidden, heads) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, d)
        self.proj_kernel = nn.Parameter(torch.zeros(hidden, d))
        self.proj_bias = nn.Parameter(torch.zeros(d))
        self.unembed_kernel = nn.Parameter(torch.zeros(d, vocab))
        self.unembed_bias = nn.Parameter(torch.zeros(vocab))
        # TextRotaryEmbeddingFast(dim=hd, pt_seq_len=max_length, num_empty_token=12), non-persistent.
        hd, L, n_pre = hidden // heads, max_length, n_time + n_sc + n_mode
        freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32)[: hd // 2] / hd))
        pos = torch.arange(L, dtype=torch.float32) / L * L
        ang = torch.repeat_interleave(pos[:, None] * freqs[None], 2, dim=-1)
        self.register_buffer("freqs_cos", torch.cat([torch.ones(n_pre, hd), ang.cos()]), persistent=False)
        self.register_buffer("freqs_sin", torch.cat([torch.zeros(n_pre, hd), ang.sin()]), persistent=False)
        self.n_prefix = n_pre

    def forward(self, x, t, self_cond_cfg_scale, decoder_step_active=None):
        B = x.shape[0]
        if x.shape[-1] == 2 * self.d:
            x = self.self_cond_proj(x.float())
        x = self.text_proj(x.float())
        mode = self.mode_tokens.expand(B, -1, -1)
        if decoder_step_active is None:
            gate = 0.0
        elif isinstance(decoder_step_active, torch.Tensor) and decoder_step_active.dim() > 0:
            gate = decoder_step_active.to(mode.dtype).view(-1, 1, 1)
        else:
            gate = float(decoder_step_active)
        x = torch.cat([mode * gate, x], 1)  # mode tokens first, then the context prefix in front
        ctx = [self.t_emb_tokens.expand(B, -1, -1) + self.t_embedder(t)[:, None],
               self.self_cond_cfg_tokens.expand(B, -1, -1) + self.self_cond_cfg_embedder(self_cond_cfg_scale)[:, None]]
        x = torch.cat([torch.cat(ctx, 1), x], 1)  # -> [time, sc-cfg, mode, text]
        for blk in self.blocks:
            x = blk(x, self.freqs_cos, self.freqs_sin)
        x = x[:, self.n_prefix:]
        logits = None
        if decoder_step_active is not None:
            logits = F.gelu(x.float() @ self.proj_kernel + self.proj_bias, approximate="tanh") @ self.unembed_kernel + self.unembed_bias
        return self.final_layer(x.float()), logits


# ---------------------------------------------------------------------------------------------
# Training step (pt:train_step.py, pt:utils/sampling_utils.py), every pass on every row.
def official_config(flow_cfg, pad_token: str = "pad", latent_mean: float = 0.0, latent_std: float = 1.0):
    """The official ``Config`` field names, filled from an ELF Lab FlowConfig-like object."""
    f = flow_cfg
    return SimpleNamespace(
        denoiser_p_mean=f.p_mean, denoiser_p_std=f.p_std, denoiser_noise_scale=f.noise_scale,
        t_eps=f.t_eps, time_schedule=f.time_schedule, decoder_prob=f.decoder_prob,
        decoder_noise_scale=f.decoder_noise_scale, decoder_p_mean=f.decoder_p_mean,
        decoder_p_std=f.decoder_p_std, self_cond_prob=f.self_cond_prob,
        self_cond_cfg_min=f.sc_cfg_min, self_cond_cfg_max=f.sc_cfg_max,
        label_drop_prob=f.label_drop_prob, num_self_cond_cfg_tokens=4, pad_token=pad_token,
        latent_mean=latent_mean, latent_std=latent_std,
    )


def _restore_cond(z_updated, cond_seq, mask):
    while mask.dim() < max(z_updated.dim(), cond_seq.dim()):
        mask = mask.unsqueeze(-1)
    return torch.where(mask > 0, cond_seq, z_updated)


def _to_v(x, z, t, t_eps):
    return (x - z) / torch.clamp(1.0 - t.reshape(-1, 1, 1), min=t_eps)


def official_x0(encode: Callable, batch: dict, noise, config) -> torch.Tensor:
    """Label-drop block mask on the pairwise encoder mask, then the normalised encoder latents."""
    enc_mask = batch["encoder_attention_mask"].float()
    cond = batch["cond_seq_mask"].float()
    if config.label_drop_prob > 0:
        drop = noise.drop.float().reshape(-1, 1, 1)
        block = (1 - cond).unsqueeze(-1) * cond.unsqueeze(1)
        enc_mask = enc_mask * (1 - drop * block)
    with torch.no_grad():
        return (encode(batch["input_ids"], enc_mask) - config.latent_mean) / config.latent_std


def official_loss(model: ELF, x0: torch.Tensor, batch: dict, noise, config) -> tuple[torch.Tensor, dict]:
    """(loss, {"loss", "l2_loss", "ce_loss"}) as ``train_step`` computes them, before backward."""
    assert config.self_cond_prob > 0 and config.num_self_cond_cfg_tokens > 0, "oracle covers the paper setting"
    input_ids = batch["input_ids"].long()
    cond_seq_mask = batch["cond_seq_mask"].float()
    attention_mask = batch["attention_mask"].float()
    B, S = x0.shape[:2]
    t, t_eps = noise.t, config.t_eps

    loss_mask = attention_mask if config.pad_token == "pad" else torch.ones_like(attention_mask)
    loss_mask = loss_mask * (1 - cond_seq_mask)
    cond3 = cond_seq_mask.unsqueeze(-1)

    denoiser_z = t.reshape(-1, 1, 1) * x0 + (1 - t.reshape(-1, 1, 1)) * noise.eps * config.denoiser_noise_scale
    denoiser_z = cond3 * x0 + (1 - cond3) * denoiser_z
    drop = noise.drop.unsqueeze(1)
    if config.label_drop_prob > 0:
        m = drop.unsqueeze(-1) & (cond3 > 0)
        denoiser_z = torch.where(m, torch.zeros_like(denoiser_z), denoiser_z)
        x0 = torch.where(m, torch.zeros_like(x0), x0)

    dec = noise.decode.float()  # (B,) 1 = decoder row
    dec11, dec1 = dec.view(-1, 1, 1), dec.view(-1, 1)
    decoder_noise = noise.eps_dec * config.decoder_noise_scale
    decoder_z = noise.lam * x0 + (1 - noise.lam) * decoder_noise
    v_target = (x0 - denoiser_z) / torch.clamp(1 - t.reshape(-1, 1, 1), min=t_eps)
    use_sc = noise.sc.float().reshape(-1, 1, 1)
    w = noise.w

    t_mixed = dec * torch.ones_like(t) + (1.0 - dec) * t
    z_mixed = dec11 * decoder_z + (1.0 - dec11) * denoiser_z

    with torch.no_grad():  # shared "uncond" pass A: [z, R(0)], no decoder gate
        out_a = model(torch.cat([denoiser_z, _restore_cond(torch.zeros_like(denoiser_z), x0, cond3)], -1), t, w)
    x_init = _restore_cond(out_a[0], x0, cond3)
    sc_half = _restore_cond(x_init * use_sc, x0, cond3) * (1.0 - dec11)

    net_out, logits = model(torch.cat([z_mixed, sc_half], -1), t_mixed, w, decoder_step_active=dec)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    ce = -log_probs.gather(-1, input_ids.unsqueeze(-1)).squeeze(-1)

    v_pred = _to_v(net_out, denoiser_z, t, t_eps)
    v_uncond = _to_v(out_a[0], denoiser_z, t, t_eps)
    x_uncond = _restore_cond(out_a[0], x0, cond3)
    with torch.no_grad():  # pass B: [z, R(x̂_A)]
        out_b = model(torch.cat([denoiser_z, x_uncond], -1), t, w)
    v_cond = _to_v(out_b[0], denoiser_z, t, t_eps)
    guidance = (1 - 1 / w.reshape(B, 1, 1)) * (v_cond - v_uncond)
    guidance = torch.where(use_sc.bool(), guidance, torch.zeros_like(guidance))
    v_final = (v_target + guidance).detach()
    l2 = ((v_pred - v_final) ** 2).mean(-1)

    lm = loss_mask.to(ce.dtype)
    ce_mask, l2_mask = lm * dec1, lm * (1.0 - dec1)
    loss = ((ce * ce_mask).sum() + (l2 * l2_mask).sum()) / torch.clamp(lm.sum(), min=1.0)
    metrics = {
        "loss": loss.detach(),
        "ce_loss": ((ce * ce_mask).sum() / torch.clamp(ce_mask.sum(), min=1.0)).detach(),
        "l2_loss": ((l2 * l2_mask).sum() / torch.clamp(l2_mask.sum(), min=1.0)).detach(),
    }
    return loss, metrics


def sample_cfg_scale_from_u(u: torch.Tensor, cfg_min: float, cfg_max: float) -> torch.Tensor:
    """pt:utils/sampling_utils.py sample_cfg_scale with the uniform draw given."""
    a, b = float(1.0 + cfg_min), float(1.0 + cfg_max)
    return a * torch.exp(u * torch.tensor(b / a).log()) - 1.0


def official_pairwise_masks(cond_len: list[int], total_len: list[int], S: int):
    """pt:utils/encoder_utils.py build_self_attn_cond_masks for given lengths: (enc (B,S,S), valid, cond)."""
    j = torch.arange(S)
    is_cond = j[None] < torch.tensor(cond_len)[:, None]
    is_valid = j[None] < torch.tensor(total_len)[:, None]
    enc = (is_cond[:, :, None] & is_cond[:, None, :]) | (~is_cond[:, :, None] & is_valid[:, None, :])
    return enc.float(), is_valid.float(), is_cond.float()


def load_from(oracle: ELF, state_dict: dict, strict: bool = True) -> Optional[list]:
    """Load an ELFNetwork state dict; the keys must match 1:1 (strict)."""
    return oracle.load_state_dict(state_dict, strict=strict)
