"""Quality probe: fixed held-out measurements that show whether a model is getting better.

At the start and the end of training (and whenever called), on a fixed held-out batch with fixed
noise: the flow loss and its branches, and the **clean-latent decode accuracy** — the fraction of
valid tokens that ``net([x, 0], t = 1, gate = 1)`` maps back to their own ids — plus a few generated
samples. Fixed data and fixed seeds make start and end directly comparable: logged at the step
measured, each metric is one series (step 0 and the end).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from elf_core.config import ExperimentConfig
from elf_core.flow import StepNoise, encode_for_step, flow_loss
from elf_core.sampling import generate


class QualityProbe:
    """A fixed held-out batch with fixed noise, measured with any network (raw or EMA weights)."""

    def __init__(self, cfg: ExperimentConfig, encoder, rows: Sequence[dict[str, Any]], collate,
                 device: torch.device, seed: int = 1234):
        self.cfg, self.encoder, self.device, self.seed = cfg, encoder, device, seed
        self.batch = {k: v.to(device) for k, v in collate(list(rows)).items() if isinstance(v, torch.Tensor)}
        noise_gen = torch.Generator(device=device).manual_seed(seed)
        ids = self.batch["input_ids"]
        self.noise = StepNoise.draw((ids.shape[0], ids.shape[1], encoder.dim), cfg.flow, noise_gen, device)
        self.x0 = encode_for_step(encoder, self.batch, self.noise)

    @torch.no_grad()
    def measure(self, net) -> dict[str, float]:
        """``{"loss", "ce", "l2", "decode_acc", "clean_decode_acc"}`` on the held-out batch."""
        was_training = net.training
        net.eval()
        try:
            out = flow_loss(net, self.x0, self.batch["input_ids"], self.batch["cond_mask"],
                            self.batch["loss_mask"], self.noise, self.cfg.flow, bf16=self.cfg.train.bf16)
            clean = self.encoder.encode(self.batch["input_ids"], self.batch["encoder_mask"])
            B = clean.shape[0]
            ones = torch.ones(B, device=self.device)
            _, logits = net(torch.cat([clean, torch.zeros_like(clean)], -1), ones, ones, gate=1.0)
            valid = self.batch["attention_mask"].float()
            acc = ((logits.argmax(-1) == self.batch["input_ids"]).float() * valid).sum() / valid.sum()
        finally:
            net.train(was_training)
        m = {k: float(v) for k, v in out.metrics.items() if "tokens" not in k}
        m["clean_decode_acc"] = float(acc)
        return m

    def samples(self, net, n: int) -> list[str]:
        """``n`` unconditional samples at the experiment's sampling settings (fixed seed)."""
        if n <= 0:
            return []
        s = self.cfg.sample
        sample_cfg = type(s)(**{**s.__dict__, "num_samples": n, "batch_size": min(n, s.batch_size)})
        return generate(net, sample_cfg, self.cfg.flow, seq_len=self.cfg.data.max_length, seed=self.seed,
                        decode_fn=self.encoder.decode_ids, eos_id=self.encoder.eos_id,
                        pad_id=self.encoder.pad_id, num_samples=n, bf16=self.cfg.train.bf16)
