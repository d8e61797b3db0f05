"""The order the loop draws its examples in, resumable from (epoch, position)."""

from __future__ import annotations

import torch


class Batches:
    """An endless sequence of batches. Each batch holds examples of one size (one aspect
    bucket; ``sizes`` may be any sortable group key, such as (dataset, height, width));
    each epoch shuffles within buckets and then the order of the batches, from (seed,
    epoch) alone, so the order after a resume is the order without one. ``batch_size``:
    one for all, or one per group key."""

    def __init__(self, sizes: list[tuple], batch_size: int | dict, seed: int, epoch: int = 0, position: int = 0,
                 rank: int = 0, world: int = 1):
        self.sizes, self.batch_size, self.seed = sizes, batch_size, seed
        self.epoch, self.position = epoch, position
        self.rank, self.world = rank, world  # processes take turns along the one order (processes.py)
        self._batches = self._epoch(epoch)

    def _epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        by_size: dict[tuple, list[int]] = {}
        for i, size in enumerate(self.sizes):
            by_size.setdefault(tuple(size), []).append(i)
        batches = []
        for size in sorted(by_size):
            members = by_size[size]
            order = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
            n = self.batch_size if isinstance(self.batch_size, int) else self.batch_size[size]
            batches += [order[k:k + n] for k in range(0, len(order), n)]
        return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]

    def next(self) -> list[int]:
        """This process's next batch; the other processes take the ones around it."""
        turns = [self._advance() for _ in range(self.world)]
        return turns[self.rank]

    def _advance(self) -> list[int]:
        if self.position == len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch(self.epoch)
        self.position += 1
        return self._batches[self.position - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}
