"""ELF samplers (spec §4, reference §2.7): time grid, guided field, ODE/SDE steps, decode, generate.

Sampling integrates the learned flow from noise ``z = noise_scale·ε`` at t = 0 to latents at t = 1
on a grid of n steps, then the same network in decode mode turns the latents into token ids. The
numbers follow the official port (pt:utils/sampling_utils.py, pt:utils/generation_utils.py,
pt:generation.py); the differences are in plumbing only:

* every random draw (grid, initial z, SDE noise) of a sampling batch comes from that batch's own
  ``torch.Generator`` on the model's device, in the order grid → z → per-step noise (the official
  mixes the global CUDA RNG and a CPU generator depending on ``is_cuda``);
* an SDE step with α = 1 (γ = 0) draws no noise, so SDE γ = 0 is the ODE including the RNG stream;
* the step loop is fixed before it starts (:func:`step_plan`): every per-step scalar (t, t' − t,
  α, 1 − α, t_b, t' − t_b) is precomputed in float64 from the grid and kept as a float32 device
  table, so the loop does no host reads and every step has the same shapes (CUDA-graph
  capturable); it gives the official's numbers bit for bit (the Python-double arithmetic of the
  official per-step scalars, rounded to float32 exactly as a float32 op rounds a Python scalar).
  The only host read is one (steps,) bool vector per SDE batch: which intervals inject noise;
* conditions are encoded from the condition tokens only (:func:`encode_condition`).

Seeding (:func:`generate`): samples ``0 … N−1`` are cut into batches of ``sample.batch_size``; batch
``k`` holds samples ``[k·bs, min((k+1)·bs, N))`` and draws from a fresh generator seeded with
:func:`batch_seed` ``(seed, k)`` (a counter-based seed, like the trainer's ``noise_seed``). A batch's
samples therefore depend on (seed, k, batch_size, N) only, never on which other batches were
generated before it or in which process: ``generate(..., batches=[k])`` gives exactly batch k of a
full run, which is how ``pipelines/evaluation/shards.py`` splits one evaluation over Ray workers and still
returns the same samples as one process. A sample does depend on the batch size (the time grid is
drawn once per batch and shared by its rows, as in the official, and batched matmuls may round per
batch shape), so ``batch_size`` is part of the sampling provenance.

Shapes: B batch, S sequence, D latent width; condition masks are (B, S) bool prefixes. The
network's x-prediction is turned into a velocity by :func:`elf_core.flow.x_to_v` (the one x→v).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from elf_core.config import FlowConfig, SampleConfig
from elf_core.flow import restore_cond, sample_time, x_to_v
from elf_core.network import ELFNetwork, autocast_for

DecodeFn = Callable[[torch.Tensor], list[str]]
Time = Union[float, torch.Tensor]  # a Python float or a 0-dim float32 tensor
EncodeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Time grid
def time_grid(steps: int, kind: str, p_mean: float, p_std: float, generator: Optional[torch.Generator],
              device: torch.device | str) -> torch.Tensor:
    """(steps + 1,) ascending float32 times from 0 to 1 (pt:utils/sampling_utils.py:51-73).

    ``uniform``: ``linspace(0, 1, steps + 1)`` (no draws). ``logit_normal``: ``[0, sort(steps − 1
    draws of sigmoid(N(p_mean, p_std))), 1]`` from ``generator``; the official passes the training
    time distribution (``denoiser_p_mean/p_std``, i.e. ``flow.p_mean/p_std``; pt:generation.py:154).
    """
    if steps < 1:
        raise ValueError(f"sample.steps must be >= 1, got {steps}")
    if kind == "uniform":
        return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32, device=device)
    if kind != "logit_normal":
        raise ValueError(f"sample.grid='{kind}' is not one of ['logit_normal', 'uniform']")
    if generator is None:
        raise ValueError("a logit_normal grid is random: pass a torch.Generator")
    ln = FlowConfig(time_schedule="logit_normal", p_mean=p_mean, p_std=p_std)
    inner = torch.sort(sample_time(steps - 1, ln, generator, device)).values
    ends = torch.tensor([0.0, 1.0], dtype=torch.float32, device=device)
    return torch.cat([ends[:1], inner, ends[1:]])


def nfe(steps: int, cfg_scale: float, conditional: bool) -> int:
    """Network calls per sample: one (two with conditional CFG c ≠ 1) per step, plus the decode."""
    return steps * (2 if conditional and cfg_scale != 1.0 else 1) + 1


# ----------------------------------------------------------------------------------------------
# The guided field F(z, t, x_prev) -> (v, x)
class GuidedField:
    """One guided evaluation of the flow, with condition positions held clean.

    SC-CFG: the official ``_forward_sample_self_cond`` (pt:utils/sampling_utils.py:141-150) calls
    the model **once** with ``[z, x_prev]`` and the SC-CFG scale w fed as the conditioning tokens
    whenever the model has SC-CFG tokens (always, in ELF). Its explicit uncond/cond extrapolation
    (lines 158-178) only runs for models without those tokens and is not reproduced here.

    Conditional CFG (c ≠ 1, pt:utils/sampling_utils.py:181-208): a second call with z and x_prev
    zeroed at condition positions whose outputs are restored to zero there; then
    ``v = v_u + c(v_c − v_u)``, ``x = x_u + c(x_c − x_u)``, restored (x = clean, v = 0 at cond).
    """

    def __init__(self, net: ELFNetwork, w: float, *, t_eps: float, cfg_scale: float = 1.0,
                 cond_latents: Optional[torch.Tensor] = None, cond_mask: Optional[torch.Tensor] = None,
                 bf16: bool = False):
        if net.cfg.num_sc_cfg_tokens <= 0:
            raise NotImplementedError(
                "sampling needs a network with SC-CFG tokens (model.num_sc_cfg_tokens > 0); the "
                "official explicit SC-CFG extrapolation for token-less models is not implemented")
        if (cond_latents is None) != (cond_mask is None):
            raise ValueError("cond_latents and cond_mask must be given together")
        if cond_mask is None and cfg_scale != 1.0:
            raise ValueError(f"sample.cfg={cfg_scale}: conditional CFG needs a condition "
                             "(unconditional sampling uses cfg 1, as the official hard-codes)")
        if cond_mask is not None and cond_mask.dtype != torch.bool:
            raise TypeError(f"cond_mask must be a bool tensor, got {cond_mask.dtype}")
        self.net, self.w, self.t_eps, self.cfg_scale = net, float(w), t_eps, float(cfg_scale)
        self.cond_latents, self.cond_mask, self.bf16 = cond_latents, cond_mask, bf16

    def restore(self, values: torch.Tensor, clean: torch.Tensor | float | None = None) -> torch.Tensor:
        """R_c: write ``clean`` (default: the clean condition latents) at condition positions."""
        if self.cond_mask is None:
            return values
        return restore_cond(values, self.cond_latents if clean is None else clean, self.cond_mask)

    def _restore_vx(self, v: torch.Tensor, x: torch.Tensor, clean) -> tuple[torch.Tensor, torch.Tensor]:
        return self.restore(v, 0.0), self.restore(x, clean)

    def _w_vector(self, B: int, device: torch.device) -> torch.Tensor:
        """The (B,) per-example SC-CFG scale, built once per batch shape."""
        key = (B, str(device))
        if getattr(self, "_w_key", None) != key:
            self._w_key, self._w_vec = key, torch.full((B,), self.w, dtype=torch.float32, device=device)
        return self._w_vec

    def _one_call(self, z: torch.Tensor, x_prev: torch.Tensor, t: torch.Tensor, clean
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        w = self._w_vector(z.shape[0], z.device)
        with autocast_for(z.device, self.bf16):
            x_hat, _ = self.net(torch.cat([z, x_prev], dim=-1), t, w)  # denoise mode: gate None
        return self._restore_vx(x_to_v(x_hat, z, t, self.t_eps), x_hat, clean)

    def __call__(self, z: torch.Tensor, t: Time, x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v, x̂) at time ``t``: a Python float (stored as float32 like the official ``t_batch``) or a
        0-dim float32 tensor on z's device (broadcast to the batch without a host read)."""
        B = z.shape[0]
        if isinstance(t, torch.Tensor):
            tb = t.to(torch.float32).expand(B)
        else:
            tb = torch.full((B,), t, dtype=torch.float32, device=z.device)
        v_c, x_c = self._one_call(z, x_prev, tb, None)
        if self.cfg_scale == 1.0:
            return v_c, x_c
        v_u, x_u = self._one_call(self.restore(z, 0.0), self.restore(x_prev, 0.0), tb, 0.0)
        c = self.cfg_scale
        return self._restore_vx(v_u + c * (v_c - v_u), x_u + c * (x_c - x_u), None)


# ----------------------------------------------------------------------------------------------
# Steps and the integration loop
def _euler(field: GuidedField, z: torch.Tensor, t: Time, dt: Time, x_prev: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    v, x = field(z, t, x_prev)
    return z + dt * v, x


def _noisy_euler(field: GuidedField, z: torch.Tensor, alpha: Time, one_minus_alpha: Time, t_back: Time,
                 dt_back: Time, x_prev: torch.Tensor, *, noise_scale: float, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    eps = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device) * noise_scale
    z_back = field.restore(alpha * z + one_minus_alpha * eps)
    v, x = field(z_back, t_back, x_prev)
    return z_back + dt_back * v, x


def ode_step(field: GuidedField, z: torch.Tensor, t: float, t_next: float, x_prev: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler: ``z ← z + (t' − t)·v(z, t)``; returns (z', x̂) (x̂ becomes the next x_prev)."""
    return _euler(field, z, t, t_next - t, x_prev)


def sde_step(field: GuidedField, z: torch.Tensor, t: float, t_next: float, x_prev: torch.Tensor, *,
             gamma: float, noise_scale: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise injection then Euler (pt:utils/sampling_utils.py:226-251).

    ``α = clip(1 − γ(t' − t), 0, 1)``, ``t_b = α t``, ``z_b = R_c(α z + (1 − α)·noise_scale·ε')``,
    ``z ← z_b + (t' − t_b)·v(z_b, t_b)``. Scalars are Python floats (double) as in the official.
    With α = 1 no ε' is drawn, so the step is exactly :func:`ode_step` (z is already restored).
    """
    alpha = max(0.0, min(1.0, 1.0 - gamma * (t_next - t)))
    if alpha == 1.0:
        return ode_step(field, z, t, t_next, x_prev)
    t_back = alpha * t
    return _noisy_euler(field, z, alpha, 1.0 - alpha, t_back, t_next - t_back, x_prev,
                        noise_scale=noise_scale, generator=generator)


# Columns of StepPlan.coef
T, DT, ALPHA, ONE_MINUS_ALPHA, T_BACK, DT_BACK = range(6)


@dataclass(frozen=True)
class StepPlan:
    """One batch's integration loop, fixed before it starts."""

    coef: torch.Tensor  # (steps, 6) float32 on the grid's device; columns T … DT_BACK above
    noisy: tuple[bool, ...]  # per interval: an SDE step that draws noise (the last never does)


def step_plan(grid: torch.Tensor, *, sampler: str, gamma: float) -> StepPlan:
    """Per-interval scalars of :func:`ode_step` / :func:`sde_step` for a (steps + 1,) grid.

    Computed in float64 on the grid's device with the same operations as the Python-double
    arithmetic of ``sde_step``, then rounded to float32 (what a float32 op does to a Python
    scalar), so the loop reproduces the per-step functions bit for bit. ``noisy`` needs α on the
    host: one (steps,) read for an SDE with γ > 0, none otherwise.
    """
    if sampler not in ("ode", "sde"):
        raise ValueError(f"sample.sampler='{sampler}' is not one of ['ode', 'sde']")
    g = grid.to(torch.float64)
    t, t_next = g[:-1], g[1:]
    dt = t_next - t
    alpha = (1.0 - gamma * dt).clamp(0.0, 1.0)
    t_back = alpha * t
    coef = torch.stack([t, dt, alpha, 1.0 - alpha, t_back, t_next - t_back], dim=1).to(torch.float32)
    steps = dt.shape[0]
    noisy = [False] * steps
    if sampler == "sde" and gamma > 0 and steps > 1:
        noisy[:-1] = (alpha[:-1] < 1.0).tolist()  # the one host read of the batch
    return StepPlan(coef, tuple(noisy))


def integrate(field: GuidedField, z: torch.Tensor, grid: torch.Tensor, *, sampler: str, gamma: float,
              noise_scale: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Run the grid from ``z`` (already R_c-restored); the last interval is always an ODE step
    (pt:utils/generation_utils.py:89-105). Same numbers as chaining :func:`sde_step` /
    :func:`ode_step` over ``grid.tolist()``, with the per-step scalars read from :func:`step_plan`."""
    if sampler == "sde" and grid.shape[0] > 2 and generator is None:
        raise ValueError("the SDE sampler draws noise: pass a torch.Generator")
    plan = step_plan(grid, sampler=sampler, gamma=gamma)
    x_prev = field.restore(torch.zeros_like(z))
    for i, noisy in enumerate(plan.noisy):
        c = plan.coef[i]
        if noisy:
            z, x_prev = _noisy_euler(field, z, c[ALPHA], c[ONE_MINUS_ALPHA], c[T_BACK], c[DT_BACK], x_prev,
                                     noise_scale=noise_scale, generator=generator)
        else:
            z, x_prev = _euler(field, z, c[T], c[DT], x_prev)
    return z


# ----------------------------------------------------------------------------------------------
# Public entry points
@contextlib.contextmanager
def _inference(net: torch.nn.Module) -> Iterator[None]:
    """no_grad + eval mode, restoring the caller's mode. Not ``inference_mode``: the network caches
    RoPE tables, and inference tensors in that cache would break a later training backward."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        net.train(was_training)


def _model_device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def _check_generator(generator: Optional[torch.Generator], device: torch.device) -> None:
    if generator is not None and torch.device(generator.device) != device:
        raise ValueError(f"the generator is on {generator.device} but the model is on {device}; "
                         f"create it with torch.Generator(device='{device}')")


def sample_latents(net: ELFNetwork, shape: tuple[int, int, int], sample_cfg: SampleConfig,
                   flow_cfg: FlowConfig, generator: torch.Generator, *,
                   cond_latents: Optional[torch.Tensor] = None, cond_mask: Optional[torch.Tensor] = None,
                   bf16: bool = False) -> torch.Tensor:
    """Latents at t = 1 for a batch of ``shape`` = (B, S, D), fp32 on the model's device.

    Draws, in order: the grid (``sample_cfg.grid``, fresh per call), ``z = noise_scale·ε``, then SDE
    noise per step. Condition latents (B, S, D) / mask (B, S) bool are kept clean throughout.
    """
    device = _model_device(net)
    _check_generator(generator, device)
    if shape[-1] != net.latent_dim:
        raise ValueError(f"latent width {shape[-1]} does not match the network's latent_dim {net.latent_dim}")
    if cond_latents is not None and cond_mask is not None:
        if tuple(cond_latents.shape) != tuple(shape) or tuple(cond_mask.shape) != tuple(shape[:2]):
            raise ValueError(f"cond_latents {tuple(cond_latents.shape)} / cond_mask {tuple(cond_mask.shape)} "
                             f"must be {tuple(shape)} / {tuple(shape[:2])}")
        cond_latents = cond_latents.to(device=device, dtype=torch.float32)
        cond_mask = cond_mask.to(device)
    field = GuidedField(net, sample_cfg.sc_cfg, t_eps=flow_cfg.t_eps, cfg_scale=sample_cfg.cfg,
                        cond_latents=cond_latents, cond_mask=cond_mask, bf16=bf16)
    with _inference(net):
        grid = time_grid(sample_cfg.steps, sample_cfg.grid, flow_cfg.p_mean, flow_cfg.p_std, generator, device)
        z = torch.randn(shape, generator=generator, dtype=torch.float32, device=device) * flow_cfg.noise_scale
        z = field.restore(z)
        return integrate(field, z, grid, sampler=sample_cfg.sampler, gamma=sample_cfg.gamma,
                         noise_scale=flow_cfg.noise_scale, generator=generator)


def decode_latents(net: ELFNetwork, z: torch.Tensor, w: float, *, bf16: bool = False) -> torch.Tensor:
    """Token ids (B, S): ``argmax net([z, 0], t = 1, w, gate = 1).logits``. The self-conditioning
    half is all zeros, condition positions included (pt:utils/generation_utils.py:109-130)."""
    with _inference(net):
        B = z.shape[0]
        t = torch.ones(B, dtype=torch.float32, device=z.device)
        ws = torch.full((B,), float(w), dtype=torch.float32, device=z.device)
        with autocast_for(z.device, bf16):
            _, logits = net(torch.cat([z, torch.zeros_like(z)], dim=-1), t, ws, gate=1.0)
        return logits.argmax(dim=-1)


def cut_at_eos(ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Replace the first EOS and everything after it with ``pad_id`` (official ``mask_after_eos``)."""
    keep = (ids == eos_id).int().cumsum(dim=1) == 0
    return torch.where(keep, ids, torch.full_like(ids, pad_id))


def _prefix_lengths(cond_mask: torch.Tensor) -> torch.Tensor:
    """Per-row condition length, checking the mask is a prefix (True then False)."""
    lengths = cond_mask.sum(dim=1)
    prefix = torch.arange(cond_mask.shape[1], device=cond_mask.device)[None] < lengths[:, None]
    if not torch.equal(prefix, cond_mask):
        raise ValueError("cond_mask must mark a prefix of each row (condition first, then the target)")
    return lengths


def target_window(ids: torch.Tensor, cond_mask: torch.Tensor, target_len: int, pad_id: int) -> torch.Tensor:
    """(B, target_len): the ``target_len`` positions right after each row's condition, ``pad_id``
    past the end of the row (official ``shift_left(...)[:, :gen_length]``, pt:generation.py:369-378)."""
    lengths = _prefix_lengths(cond_mask)
    idx = lengths[:, None] + torch.arange(target_len, device=ids.device)[None]
    inside = idx < ids.shape[1]
    picked = torch.gather(ids, 1, idx.clamp(max=ids.shape[1] - 1))
    return torch.where(inside, picked, torch.full_like(picked, pad_id))


def encode_condition(encode_fn: EncodeFn, input_ids: torch.Tensor, cond_mask: torch.Tensor, *,
                     pad_id: int) -> torch.Tensor:
    """Clean condition latents (B, S, D) for sampling, zero off the condition; runs the encoder on
    the condition tokens only.

    ``encode_fn(ids (B, L), mask (B, L, L) bool) -> normalised latents (B, L, D)`` (e.g. the frozen
    encoder's ``encode``). The official encodes the whole ``[cond ; ground-truth target]`` row with
    the pairwise mask and keeps the condition positions (pt:generation.py:351-354). Under that mask a
    condition row sees only condition columns, so its output does not depend on the target: encoding
    just the first L = max condition length columns, where every row sees exactly the condition
    columns (the official mask for a row whose valid part is the condition), gives the same condition
    latents (T5's relative position bias depends on j − i only) up to float rounding (attention
    reductions run over L instead of S columns; ~1e-7 relative on CPU), without reading the
    reference target and at a fraction of the cost. Rows without a condition get zeros.
    """
    B, S = input_ids.shape
    lengths = _prefix_lengths(cond_mask)
    L = int(lengths.max()) if B else 0
    if L == 0:
        raise ValueError("encode_condition: no row has a condition (cond_mask is all False)")
    cm = cond_mask[:, :L]
    ids = torch.where(cm, input_ids[:, :L], torch.full_like(input_ids[:, :L], pad_id))
    h = encode_fn(ids, cm[:, None, :].expand(B, L, L)).float()
    if h.shape[:2] != (B, L):
        raise ValueError(f"encode_fn returned shape {tuple(h.shape)}, expected ({B}, {L}, D)")
    out = torch.zeros(B, S, h.shape[-1], dtype=torch.float32, device=h.device)
    out[:, :L] = torch.where(cm[..., None].to(h.device), h, torch.zeros_like(h))
    return out


_MASK63 = (1 << 63) - 1


def batch_seed(seed: int, batch: int) -> int:
    """The 63-bit seed of sampling batch ``batch`` of a run seeded ``seed`` (counter-based, no state).

    Two rounds of a golden-ratio multiply-add (as the trainer's ``noise_seed``) followed by a
    SplitMix64-style xor-shift finaliser, so neighbouring (seed, batch) pairs give unrelated seeds.
    """
    if batch < 0:
        raise ValueError(f"batch index must be >= 0, got {batch}")
    h = int(seed) & _MASK63
    for part in (0x5EED_5A3F, int(batch)):  # a fixed domain tag, then the batch index
        h = (h * 0x9E3779B97F4A7C15 + part + 1) & _MASK63
    h ^= h >> 31
    h = (h * 0xBF58476D1CE4E5B9) & _MASK63
    return h ^ (h >> 29)


def batch_generator(seed: int, batch: int, device: torch.device | str) -> torch.Generator:
    """A fresh generator on ``device`` seeded with :func:`batch_seed` ``(seed, batch)``."""
    return torch.Generator(device=device).manual_seed(batch_seed(seed, batch))


def num_batches(num_samples: int, batch_size: int) -> int:
    """How many sampling batches ``num_samples`` samples take (the last one may be short)."""
    if batch_size <= 0:
        raise ValueError(f"sample.batch_size must be positive, got {batch_size}")
    return -(-int(num_samples) // int(batch_size))


def batch_bounds(batch: int, num_samples: int, batch_size: int) -> tuple[int, int]:
    """Sample indices ``[start, end)`` of batch ``batch``."""
    n_b = num_batches(num_samples, batch_size)
    if not 0 <= batch < n_b:
        raise ValueError(f"batch {batch} is out of range: {num_samples} samples in batches of {batch_size} "
                         f"make {n_b} batches")
    start = batch * batch_size
    return start, min(start + batch_size, num_samples)


def generate(net: ELFNetwork, sample_cfg: SampleConfig, flow_cfg: FlowConfig, *, seq_len: int,
             seed: int, decode_fn: DecodeFn, eos_id: int, pad_id: int,
             num_samples: Optional[int] = None, batches: Optional[Sequence[int]] = None,
             latent_dim: Optional[int] = None,
             cond_latents: Optional[torch.Tensor] = None, cond_mask: Optional[torch.Tensor] = None,
             cond_ids: Optional[torch.Tensor] = None, encode_fn: Optional[EncodeFn] = None,
             target_len: int = 64, bf16: bool = False,
             progress: Optional[Callable[[int, int], None]] = None) -> list[str]:
    """Generate texts in batches of ``sample_cfg.batch_size``.

    Unconditional: ``num_samples`` texts of ``seq_len`` positions. Conditional: one text per row of
    ``cond_mask`` (N, seq_len), from precomputed ``cond_latents`` (N, seq_len, D) or from
    ``cond_ids`` (N, seq_len) encoded per batch with ``encode_fn`` (:func:`encode_condition`); the
    text is the first ``target_len`` positions after the condition (official: ``max_length −
    max_input_length``, 64 for both De-En and XSum). Ids are cut at the first EOS (the rest becomes
    ``pad_id``) and handed to ``decode_fn(ids (b, L)) -> list[str]``, which must drop ``pad_id``
    (e.g. ``tokenizer.batch_decode(ids, skip_special_tokens=True)``).

    Batch ``k`` (samples ``[k·bs, (k+1)·bs)``) draws from :func:`batch_generator` ``(seed, k)`` (module
    docstring). ``batches`` (default: all, in order) selects which batches to generate; the texts of
    those batches are returned in the order given, each exactly as in a full run. Conditions are
    still given for all N rows: batch k reads rows ``[k·bs, (k+1)·bs)``. ``progress(done, total)``
    is called after each batch with the samples done / to do in this call.
    """
    D = net.latent_dim
    if latent_dim is not None and latent_dim != D:
        raise ValueError(f"latent_dim={latent_dim} does not match the network's latent_dim {D}")
    conditional = cond_mask is not None
    if conditional:
        if (cond_latents is None) == (cond_ids is None):
            raise ValueError("conditional generation needs exactly one of cond_latents or cond_ids")
        if cond_ids is not None and encode_fn is None:
            raise ValueError("cond_ids needs encode_fn to encode the conditions")
        n_rows = cond_mask.shape[0]
        if num_samples is not None and num_samples != n_rows:
            raise ValueError(f"num_samples={num_samples} but cond_mask has {n_rows} rows")
        if cond_mask.shape[1] != seq_len:
            raise ValueError(f"cond_mask has {cond_mask.shape[1]} positions, seq_len is {seq_len}")
        num_samples = n_rows
    elif cond_latents is not None or cond_ids is not None:
        raise ValueError("cond_latents / cond_ids given without cond_mask")
    if num_samples is None or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer, got {num_samples}")
    bs = sample_cfg.batch_size
    n_b = num_batches(num_samples, bs)
    todo = list(range(n_b)) if batches is None else [int(k) for k in batches]
    bounds = [batch_bounds(k, num_samples, bs) for k in todo]  # checks every index first
    total = sum(end - start for start, end in bounds)

    device = _model_device(net)
    texts: list[str] = []
    for k, (start, end) in zip(todo, bounds):
        c_lat = c_mask = None
        if conditional:
            c_mask = cond_mask[start:end].to(device)
            if cond_ids is not None:
                c_lat = encode_condition(encode_fn, cond_ids[start:end].to(device), c_mask, pad_id=pad_id)
            else:
                c_lat = cond_latents[start:end]
        z = sample_latents(net, (end - start, seq_len, D), sample_cfg, flow_cfg, batch_generator(seed, k, device),
                           cond_latents=c_lat, cond_mask=c_mask, bf16=bf16)
        ids = decode_latents(net, z, sample_cfg.sc_cfg, bf16=bf16)
        if conditional:
            ids = target_window(ids, c_mask, target_len, pad_id)
        texts.extend(decode_fn(cut_at_eos(ids, eos_id, pad_id).cpu()))
        if progress is not None:
            progress(len(texts), total)
    return texts
