"""Resumable, sharded batch order: which dataset rows each rank sees at each step.

The order is a pure function of (seed, epoch, step-in-epoch, rank, world size): every epoch is a
fresh permutation drawn from ``Generator(seed + epoch)`` (identical on every rank), cut into global
batches (``drop_last``, like the official ``DistributedSampler``), and each global batch is split
into contiguous per-rank slices. Resuming at (epoch, step) therefore costs nothing — no replaying of
the loader — and a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataPosition:
    """Where the next batch comes from."""

    epoch: int = 0
    step_in_epoch: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}


class ShardedBatchOrder:
    """Iterate (position, row indices of this rank's micro-batch) from a position onwards."""

    def __init__(self, num_rows: int, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch_size % world_size:
            raise ValueError(f"train.global_batch_size={global_batch_size} is not divisible by the {world_size} workers")
        if num_rows < global_batch_size:
            raise ValueError(
                f"the dataset has {num_rows} rows, fewer than one global batch ({global_batch_size}); "
                "use more data or a smaller train.global_batch_size")
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.steps_per_epoch = num_rows // global_batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_rows, generator=g)

    def local_rows(self, position: DataPosition) -> list[int]:
        perm = self.permutation(position.epoch)
        start = position.step_in_epoch * self.global_batch_size + self.rank * self.local_batch_size
        return perm[start:start + self.local_batch_size].tolist()

    def advance(self, position: DataPosition) -> DataPosition:
        nxt = position.step_in_epoch + 1
        if nxt >= self.steps_per_epoch:
            return DataPosition(position.epoch + 1, 0)
        return DataPosition(position.epoch, nxt)

    def iterate(self, start: DataPosition):
        """Yield ``(position, rows)`` forever, starting at ``start``; caches one permutation per epoch."""
        pos, perm_epoch, perm = start, None, None
        while True:
            if perm_epoch != pos.epoch:
                perm_epoch, perm = pos.epoch, self.permutation(pos.epoch)
            s = pos.step_in_epoch * self.global_batch_size + self.rank * self.local_batch_size
            yield pos, perm[s:s + self.local_batch_size].tolist()
            pos = self.advance(pos)
