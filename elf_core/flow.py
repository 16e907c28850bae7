"""The ELF flow-matching objective: one training step's loss (spec §3, reference §2.4).

Formulas live here as small pure functions (time sampling, noising, x→v, SC-CFG target, the masked
combined loss) and :func:`flow_loss` composes them into the step the official port runs — with the
same numbers but only the compute each row needs: the no-grad self-conditioning pass A runs on
denoise rows only, pass B on denoise rows that self-condition, and the 32k-way decode head on decode
rows only (the official port runs all three on every row). All randomness comes from explicit
``torch.Generator`` objects in a fixed draw order, so a step is reproducible and resumable.

**No host↔device sync inside a step.** The per-row branch coins (label drop, decode, self-cond)
live on the host (:class:`StepNoise`), so which rows each pass runs on is known without reading
the device; row indices are built with numpy and copied to the device without blocking.

**torch.compile.** The row counts of the three passes change from step to step. With
``dynamic_rows=True`` each pass's row dimension is marked dynamic (one graph serves every count)
and a pass on fewer than 2 rows runs on 2 (copies of row 0 pad it; the padded results are
dropped), since dynamo specialises sizes 0 and 1. Padded rows never reach the loss.

Shapes: B batch, S sequence (= max_length), D latent width. ``cond`` masks are (B, S) bool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from elf_core.config import FlowConfig
from elf_core.network import autocast_for


# ----------------------------------------------------------------------------------------------
# Pure formulas
def x_to_v(x_hat: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """Velocity implied by an x-prediction: ``v = (x̂ − z) / max(1 − t, t_eps)``; t is (B,)."""
    return (x_hat - z) / torch.clamp(1.0 - t.view(-1, 1, 1), min=t_eps)


def restore_cond(values: torch.Tensor, clean: torch.Tensor | float, cond: torch.Tensor) -> torch.Tensor:
    """R(·): write ``clean`` at condition positions, keep ``values`` elsewhere."""
    clean_t = clean if isinstance(clean, torch.Tensor) else torch.full_like(values, clean)
    return torch.where(cond.unsqueeze(-1), clean_t, values)


def sample_time(n: int, cfg: FlowConfig, generator: torch.Generator, device) -> torch.Tensor:
    """t ~ sigmoid(N(p_mean, p_std)) (logit-normal) or U[0, 1], shape (n,)."""
    if cfg.time_schedule == "uniform":
        return torch.rand(n, generator=generator, device=device)
    return torch.sigmoid(torch.randn(n, generator=generator, device=device) * cfg.p_std + cfg.p_mean)


def sc_cfg_scale_from_uniform(u: torch.Tensor, w_min: float, w_max: float) -> torch.Tensor:
    """Map u ~ U[0,1] to w with ``1 + w`` log-uniform on [1 + w_min, 1 + w_max] (paper: [1.5, 6])."""
    a, b = 1.0 + w_min, 1.0 + w_max
    return a * (b / a) ** u - 1.0


def noise_latents(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, noise_scale: float,
                  cond: torch.Tensor) -> torch.Tensor:
    """``z = t·x + (1 − t)·noise_scale·ε``, with condition positions kept clean."""
    tt = t.view(-1, 1, 1)
    return restore_cond(tt * x + (1.0 - tt) * noise_scale * eps, x, cond)


def sc_cfg_target(v: torch.Tensor, v_a: torch.Tensor, v_b: torch.Tensor, sc: torch.Tensor,
                  w: torch.Tensor) -> torch.Tensor:
    """Self-conditioning CFG target ``v* = v + sc·(1 − 1/w)·(v_B − v_A)`` (sc is a (B,) 0/1 mask)."""
    guidance = (1.0 - 1.0 / w).view(-1, 1, 1) * (v_b - v_a)
    return v + torch.where(sc.view(-1, 1, 1), guidance, torch.zeros_like(guidance))


def label_drop_encoder_mask(encoder_mask: torch.Tensor, cond: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """For dropped examples, block non-condition rows from condition columns (cond↔cond unchanged)."""
    block = (~cond).unsqueeze(-1) & cond.unsqueeze(1)  # (B, S, S): target row i, condition column j
    return encoder_mask & ~(drop.view(-1, 1, 1) & block)


def combine_losses(ce: torch.Tensor, l2: torch.Tensor, loss_mask: torch.Tensor,
                   decode: torch.Tensor) -> torch.Tensor:
    """``(Σ CE·m over decode rows + Σ L2·m over denoise rows) / max(Σ m, 1)`` — one denominator.

    ce, l2, loss_mask: (B, S); decode: (B,) bool.
    """
    d = decode.view(-1, 1).to(loss_mask.dtype)
    total = (ce * loss_mask * d).sum() + (l2 * loss_mask * (1 - d)).sum()
    return total / torch.clamp(loss_mask.sum(), min=1.0)


# ----------------------------------------------------------------------------------------------
def _on_host(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.cpu()


@dataclass
class StepNoise:
    """Every random draw of one training step, in the fixed order they are taken.

    The three per-row coins ``drop``, ``decode`` and ``sc`` are **CPU** tensors (the branch masks
    are known on the host, so a step never reads the device to find its rows); the rest lives on
    the step's device.
    """

    drop: torch.Tensor  # (B,) bool, CPU — conditional-CFG label drop
    t: torch.Tensor  # (B,) denoise time
    eps: torch.Tensor  # (B, S, D)
    decode: torch.Tensor  # (B,) bool, CPU — decode (CE) branch
    lam: torch.Tensor  # (B, S, 1) decode-branch signal fraction, sigmoid(N(μ_d, σ_d))
    eps_dec: torch.Tensor  # (B, S, D)
    sc: torch.Tensor  # (B,) bool, CPU — self-conditioning used
    w: torch.Tensor  # (B,) SC-CFG scale

    @staticmethod
    def draw(shape: tuple[int, int, int], cfg: FlowConfig, gen: torch.Generator, device,
             coin_gen: Optional[torch.Generator] = None) -> "StepNoise":
        """Draw in the order drop, t, ε, decode, λ, ε', sc, w. The coins come from ``coin_gen``
        (default ``gen``): with one CPU generator for both this is a single stream, drawn exactly as
        it always was; a trainer on a GPU passes a CPU ``coin_gen`` so that the coins are born on
        the host. A coin generator on a device costs one device→host copy (e.g. the quality probe)."""
        B, S, D = shape
        coins = gen if coin_gen is None else coin_gen
        rand = lambda *s: torch.rand(*s, generator=gen, device=device)  # noqa: E731
        randn = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
        coin = lambda p: _on_host(torch.rand(B, generator=coins, device=coins.device) < p)  # noqa: E731
        drop = coin(cfg.label_drop_prob)
        t = sample_time(B, cfg, gen, device)
        eps = randn(B, S, D)
        decode = coin(cfg.decoder_prob)
        lam = torch.sigmoid(randn(B, S, 1) * cfg.decoder_p_std + cfg.decoder_p_mean)
        eps_dec = randn(B, S, D)
        sc = coin(cfg.self_cond_prob)
        w = sc_cfg_scale_from_uniform(rand(B), cfg.sc_cfg_min, cfg.sc_cfg_max)
        return StepNoise(drop, t, eps, decode, lam, eps_dec, sc, w)

    def host_coins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(drop, decode, sc)`` as numpy bool arrays (no device access)."""
        out = []
        for name in ("drop", "decode", "sc"):
            mask = getattr(self, name)
            if mask.device.type != "cpu":
                raise ValueError(f"StepNoise.{name} is on {mask.device}; the branch coins must be CPU tensors "
                                 "(StepNoise.draw puts them there) so that a step needs no device sync")
            out.append(mask.numpy().astype(bool, copy=False))
        return out[0], out[1], out[2]


@dataclass
class FlowOutput:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, torch.Tensor]  # detached scalars: loss, ce, l2, token counts, decode_acc (if accuracy)


@dataclass(frozen=True)
class _Rows:
    """The rows one pass keeps (``keep``, n of them) and the rows it runs on (``run``: ``keep``,
    padded with row 0 up to ``len(run)`` when compiling with dynamic rows)."""

    keep: torch.Tensor  # (n,) long, on the device
    run: torch.Tensor  # (>= n,) long, on the device
    n: int


MIN_DYNAMIC_ROWS = 2  # dynamo specialises dimensions of size 0 and 1


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without blocking the host (a no-op copy on CPU)."""
    t = torch.from_numpy(a)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _rows(mask: np.ndarray, all_rows: bool, device: torch.device, dynamic: bool) -> Optional[_Rows]:
    """The rows a pass must run on (from a host mask); None = every row (the official behaviour)."""
    if all_rows:
        return None
    keep = np.flatnonzero(mask)
    run = keep
    if dynamic and keep.size < MIN_DYNAMIC_ROWS:
        run = np.concatenate([keep, np.zeros(MIN_DYNAMIC_ROWS - keep.size, dtype=keep.dtype)])
    run_t = _to_device(run, device)
    return _Rows(run_t[:keep.size], run_t, int(keep.size))


def _dynamic(dynamic: bool, *tensors: torch.Tensor) -> None:
    """Mark dim 0 (rows) dynamic for torch.compile, so a new row count reuses the graph."""
    if dynamic:
        for t in tensors:
            torch._dynamo.mark_dynamic(t, 0)


def _denoise_pass(net, z: torch.Tensor, sc_half: torch.Tensor, t: torch.Tensor,
                  w: torch.Tensor, rows: Optional[_Rows], dynamic: bool) -> torch.Tensor:
    """x̂ of ``net([z ; sc_half], t, w)`` in denoise mode on ``rows`` (others left at zero)."""
    if rows is None:
        return net(torch.cat([z, sc_half], -1), t, w)[0]
    out = torch.zeros_like(z)
    # Run even on zero rows: under FSDP2 each forward is a collective (parameter all-gather), so
    # every rank must make the same calls whatever its batch holds. An empty pass costs nothing.
    r = rows.run
    x, t_r, w_r = torch.cat([z[r], sc_half[r]], -1), t[r], w[r]
    _dynamic(dynamic, x, t_r, w_r)
    out[rows.keep] = net(x, t_r, w_r)[0][:rows.n].to(out.dtype)
    return out


def flow_loss(net, x0: torch.Tensor, input_ids: torch.Tensor, cond: torch.Tensor,
              loss_mask: torch.Tensor, noise: StepNoise, cfg: FlowConfig, *, bf16: bool = False,
              all_rows: bool = False, dynamic_rows: bool = False, accuracy: bool = True) -> FlowOutput:
    """The ELF training loss for a batch of clean latents ``x0`` (B, S, D) from the frozen encoder.

    ``x0`` must already be encoded with the label-drop encoder mask (see :func:`encode_for_step`).
    ``all_rows=True`` reproduces the official port's compute pattern (every pass on every row); the
    default skips rows whose results are masked out, which leaves the loss unchanged.
    ``dynamic_rows=True`` prepares the passes for a compiled ``net`` (module docstring).
    ``accuracy=False`` leaves ``decode_acc`` out of the metrics: its argmax is a full pass over the
    (decode tokens × V) logits (15 ms at 410 × 30,522 on 2 CPU threads, against a ~0.38 s step),
    wasted on steps whose metrics nobody reads.
    """
    te = cfg.t_eps
    dev = x0.device
    drop_h, dec_h, sc_h = noise.host_coins()
    drop, dec, sc = (m.to(dev, non_blocking=True) for m in (noise.drop, noise.decode, noise.sc))
    drop_cond = drop.view(-1, 1) & cond  # (B, S)
    z = noise_latents(x0, noise.eps, noise.t, cfg.noise_scale, cond)
    z = restore_cond(z, 0.0, drop_cond)  # dropped examples: condition latents and inputs zeroed
    x0 = restore_cond(x0, 0.0, drop_cond)
    z_dec = noise.lam * x0 + (1.0 - noise.lam) * cfg.decoder_noise_scale * noise.eps_dec  # no restore
    v = x_to_v(x0, z, noise.t, te)
    ctx = autocast_for(x0.device, bf16)

    # Two no-grad self-conditioning passes (denoise mode, gate off).
    with torch.no_grad(), ctx:
        x_a = _denoise_pass(net, z, restore_cond(torch.zeros_like(z), x0, cond), noise.t, noise.w,
                            _rows(~dec_h, all_rows, dev, dynamic_rows), dynamic_rows)
        v_a = x_to_v(x_a, z, noise.t, te)
        x_a = restore_cond(x_a, x0, cond)
        sc_half = restore_cond(x_a * sc.view(-1, 1, 1), x0, cond) * (~dec).view(-1, 1, 1)
        x_b = _denoise_pass(net, z, x_a, noise.t, noise.w, _rows(~dec_h & sc_h, all_rows, dev, dynamic_rows),
                            dynamic_rows)
        v_b = x_to_v(x_b, z, noise.t, te)
        # Skipped rows: decode rows have x_a = x_b = 0 (so v_b − v_a = 0) and are masked from L2 anyway;
        # denoise rows without self-conditioning skip pass B, and the sc mask zeroes their guidance.
        v_target = sc_cfg_target(v, v_a, v_b, sc, noise.w).detach()

    # The gradient pass (through ``net.__call__`` so DDP sees it): decode rows see z_dec at t = 1
    # with the mode gate on and no self-conditioning; the decode head runs on decode rows only.
    d3 = dec.view(-1, 1, 1)
    t_in = torch.where(dec, torch.ones_like(noise.t), noise.t)
    dec_rows = _rows(dec_h, all_rows, dev, dynamic_rows)
    if dec_rows is not None:
        _dynamic(dynamic_rows, dec_rows.run)
    with ctx:
        x_hat, logits = net(torch.cat([torch.where(d3, z_dec, z), sc_half], -1), t_in, noise.w,
                            gate=dec.float(), logits_rows=None if dec_rows is None else dec_rows.run)
    l2 = (x_to_v(x_hat.float(), z, noise.t, te) - v_target).pow(2).mean(-1)  # (B, S)

    ids = input_ids if dec_rows is None else input_ids[dec_rows.keep]
    if dec_rows is not None:
        logits = logits[:dec_rows.n]  # drop the padded rows' logits (they get no gradient)
    # Per-token CE over the vocabulary, with the class dim last and contiguous: (n·S, V) rows. The
    # same numbers as cross_entropy on the (n, V, S) transpose, without its strided log-softmax.
    V = logits.shape[-1]
    ce_rows = F.cross_entropy(logits.float().reshape(-1, V), ids.reshape(-1), reduction="none").view(ids.shape)
    hit = (logits.detach().argmax(-1) == ids).float() if accuracy else None
    if dec_rows is None:
        ce, correct = ce_rows, hit
    else:  # scatter back to (B, S); rows that did not decode stay 0 and are masked out anyway
        ce = torch.zeros_like(l2).index_put((dec_rows.keep,), ce_rows)
        correct = None if hit is None else torch.zeros_like(l2).index_put((dec_rows.keep,), hit)

    m = loss_mask.float()
    loss = combine_losses(ce, l2, m, dec)
    dm = m * dec.view(-1, 1).float()
    nm = m - dm
    metrics = {
        "loss": loss.detach(),
        "ce": (ce.detach() * dm).sum() / dm.sum().clamp(min=1),
        "l2": (l2.detach() * nm).sum() / nm.sum().clamp(min=1),
        "decode_tokens": dm.sum(),
        "denoise_tokens": nm.sum(),
    }
    if correct is not None:
        metrics["decode_acc"] = (correct * dm).sum() / dm.sum().clamp(min=1)
    return FlowOutput(loss, metrics)


def encode_for_step(encoder, batch: dict[str, torch.Tensor], noise: StepNoise) -> torch.Tensor:
    """Clean latents x0 for a step: the frozen encoder under the (label-drop adjusted) pairwise mask.

    With ``batch["latents"]`` (B, S, D) — cached encoder outputs under the row's own mask, see
    :mod:`elf_core.latent_cache` — only the label-dropped rows (whose mask depends on the step's
    draw) are encoded live; the others use the cache, and with none dropped the encoder never runs.
    """
    ids = batch["input_ids"]
    drop = noise.drop.to(ids.device, non_blocking=True)
    if "latents" not in batch:
        mask = label_drop_encoder_mask(batch["encoder_mask"], batch["cond_mask"], drop)
        return encoder.encode(ids, mask)
    cached = batch["latents"]
    if cached.shape[:2] != ids.shape:
        raise ValueError(f"batch['latents'] has shape {tuple(cached.shape)}; input_ids are {tuple(ids.shape)}")
    x0 = cached.to(torch.float32, copy=True)
    drop_h, _, _ = noise.host_coins()
    if drop_h.any():
        live = _to_device(np.flatnonzero(drop_h), ids.device)
        mask = label_drop_encoder_mask(batch["encoder_mask"][live], batch["cond_mask"][live], drop[live])
        x0[live] = encoder.encode(ids[live], mask)
    return x0
