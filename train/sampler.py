"""A deterministic, resumable, rank-aware sampler that optionally groups samples of similar length.

The order of an epoch is a pure function of (seed, epoch), so a resumed run skips exactly the samples it has
already seen (`start`), without loading them. Grouping follows LLaVA's `get_length_grouped_indices`: shuffle,
cut into mega-batches of `world_size * micro_batch * mega_factor`, sort each by length (longest first), cut into
global batches and shuffle those, so every global batch holds samples of similar length (less padding) while
the epoch stays shuffled.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(
        self,
        lengths: Sequence[int],
        *,
        micro_batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        group_by_length: bool = True,
        mega_factor: int = 50,
    ) -> None:
        if not lengths:
            raise ValueError("the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.lengths = list(lengths)
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_factor = mega_factor
        self.epoch = 0
        self.start = 0  # samples of this rank's epoch order already consumed (resume)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; `start` skips this rank's first `start` samples (resume mid-epoch)."""
        self.epoch = epoch
        self.start = start

    def global_order(self, epoch: int) -> list[int]:
        """All ranks' indices for an epoch, padded (by wrapping) to whole global batches."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if self.group_by_length:
            mega = self.global_batch * self.mega_factor
            order = [i for k in range(0, len(order), mega)
                     for i in sorted(order[k:k + mega], key=lambda i: -self.lengths[i])]
        pad = -len(order) % self.global_batch
        order += (order * (pad // max(1, len(order)) + 1))[:pad]
        if self.group_by_length:  # batches keep similar lengths; their order still changes every epoch
            gb = self.global_batch
            batches = [order[k:k + gb] for k in range(0, len(order), gb)]
            order = [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]
        return order

    def rank_order(self, epoch: int) -> list[int]:
        """This rank's share: slice `rank` of every global batch (so a global batch holds similar lengths)."""
        order = self.global_order(epoch)
        mb, gb = self.micro_batch_size, self.global_batch
        return [i for k in range(0, len(order), gb) for i in order[k + self.rank * mb:k + (self.rank + 1) * mb]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_order(self.epoch)[self.start:])

    def __len__(self) -> int:
        return self.samples_per_rank - self.start

    @property
    def samples_per_rank(self) -> int:
        return -(-len(self.lengths) // self.global_batch) * self.micro_batch_size
