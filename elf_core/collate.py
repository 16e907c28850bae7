"""Batching: rows -> fixed-length ids plus the masks ELF needs (reference §2.1).

Per row ``seq = cond[:max_input_length] ++ target`` (unconditional: ``seq = input_ids``), padded or
truncated to ``max_length``; ``total_len = min(len(seq), max_length)``, ``cond_len = len(cond[:max_input_length])``.
With ``is_cond[j] = j < cond_len`` and ``is_valid[j] = j < total_len``:

* ``encoder_mask[i, j] = (is_cond[i] & is_cond[j]) | (~is_cond[i] & is_valid[j])`` — condition rows see only
  the condition; every other row (target *and* pad rows) sees all valid columns; nobody sees pads.
* ``loss_mask = (is_valid if pad_token == "pad" else 1) * (1 - is_cond)`` — with EOS padding the tail is a
  supervised run of EOS.

Pure numpy/torch and picklable, so DataLoader workers and Ray can ship it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from .config import DataConfig

PASSTHROUGH_KEYS = ("index", "input", "target")  # raw fields kept as lists (eval references)


def pairwise_encoder_mask(is_cond: torch.Tensor, is_valid: torch.Tensor) -> torch.Tensor:
    """(B,S) bool flags -> (B,S,S) bool; ``[b, i, j]`` = may row i attend to column j."""
    is_cond, is_valid = is_cond.bool(), is_valid.bool()
    return (is_cond[:, :, None] & is_cond[:, None, :]) | (~is_cond[:, :, None] & is_valid[:, None, :])


class Collator:
    """``Collator(...)(rows) -> dict`` of ``input_ids`` (B,S) long, ``attention_mask`` / ``cond_mask`` (B,S) bool,
    ``encoder_mask`` (B,S,S) bool, ``loss_mask`` (B,S) float32, plus ``index``/``input``/``target`` lists
    when the rows carry them.

    ``conditional``: rows must have ``condition_input_ids``; otherwise any condition is ignored.
    ``pad_token``: ``"pad"`` fills with ``pad_id`` and masks the tail from the loss; ``"eos"`` fills with
    ``eos_id`` and supervises it.
    """

    def __init__(self, max_length: int, eos_id: int, pad_id: int, *, pad_token: str = "pad",
                 conditional: bool = False, max_input_length: Optional[int] = None) -> None:
        if pad_token not in ("pad", "eos"):
            raise ValueError(f"pad_token must be 'pad' or 'eos', got '{pad_token}'")
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.max_length = max_length
        self.pad_token = pad_token
        self.fill_id = eos_id if pad_token == "eos" else pad_id
        self.conditional = conditional
        self.max_input_length = max_input_length

    @classmethod
    def from_config(cls, cfg: DataConfig, eos_id: int, pad_id: int) -> "Collator":
        return cls(cfg.max_length, eos_id, pad_id, pad_token=cfg.pad_token,
                   conditional=cfg.task == "conditional", max_input_length=cfg.max_input_length)

    def __repr__(self) -> str:
        return (f"Collator(max_length={self.max_length}, fill_id={self.fill_id}, pad_token='{self.pad_token}', "
                f"conditional={self.conditional}, max_input_length={self.max_input_length})")

    def _sequence(self, row: Mapping[str, Any], b: int) -> tuple[np.ndarray, int]:
        target = np.asarray(row["input_ids"], dtype=np.int64).reshape(-1)
        if not self.conditional:
            return target, 0
        if "condition_input_ids" not in row:
            raise KeyError(f"conditional collate: row {row.get('index', b)} has no 'condition_input_ids'")
        cond = np.asarray(row["condition_input_ids"], dtype=np.int64).reshape(-1)[: self.max_input_length]
        return np.concatenate([cond, target]), len(cond)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        B, S = len(rows), self.max_length
        ids = np.full((B, S), self.fill_id, dtype=np.int64)
        total_len = np.zeros(B, dtype=np.int64)
        cond_len = np.zeros(B, dtype=np.int64)
        for b, row in enumerate(rows):
            seq, cond_len[b] = self._sequence(row, b)
            n = min(len(seq), S)
            if n == 0:  # a row with no valid column would be fully masked in the encoder (NaN)
                raise ValueError(f"collate: row {row.get('index', b)} has no tokens")
            ids[b, :n] = seq[:n]
            total_len[b] = n
        pos = torch.arange(S)[None, :]
        is_cond = pos < torch.from_numpy(cond_len)[:, None]
        is_valid = pos < torch.from_numpy(total_len)[:, None]
        not_cond = (~is_cond).float()
        out: dict[str, Any] = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": is_valid,
            "cond_mask": is_cond,
            "encoder_mask": pairwise_encoder_mask(is_cond, is_valid),
            "loss_mask": (is_valid.float() * not_cond) if self.pad_token == "pad" else not_cond,
        }
        for key in PASSTHROUGH_KEYS:
            if rows and key in rows[0]:
                out[key] = [row[key] for row in rows]
        return out
