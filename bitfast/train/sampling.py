"""The data order of a training run as a function of the seed and the step: what makes
``--resume`` bit for bit (see ``bitfast.train.loop``)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from bitfast.train.distributed import check_batch

__all__ = ["SeededDataset", "StepSampler", "collate"]


class StepSampler:
    """The data order as a function of the step: the infinite stream of per-epoch permutations
    of ``range(n)`` (epoch ``e`` shuffled by a generator seeded with ``seed`` and ``e``) cut into
    global batches of ``global_batch``; process ``rank`` of ``world_size`` takes its contiguous
    slice of each. Yields, for steps ``start_step .. total_steps - 1``, lists of
    ``(index, sample_seed)`` keys for ``SeededDataset``.
    """

    def __init__(self, n: int, global_batch: int, *, total_steps: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        if n < 1:
            raise ValueError("StepSampler: the dataset is empty")
        self.n, self.global_batch = n, global_batch
        self.local = check_batch(global_batch, world_size)
        self.total_steps, self.start_step = total_steps, start_step
        self.rank, self.seed, self.shuffle = rank, seed, shuffle
        self._perm: tuple[int, torch.Tensor] | None = None

    def _epoch(self, e: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != e:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
                self._perm = (e, torch.randperm(self.n, generator=g))
            else:
                self._perm = (e, torch.arange(self.n))
        return self._perm[1]

    def batch(self, step: int) -> list[tuple[int, int]]:
        """This process's ``(index, sample_seed)`` keys of global batch ``step``."""
        first = step * self.global_batch + self.rank * self.local
        keys = []
        for p in range(first, first + self.local):
            idx = int(self._epoch(p // self.n)[p % self.n])
            keys.append((idx, (self.seed << 40) ^ p))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that item ``(index, sample_seed)`` runs the wrapped ``__getitem__``
    with torch's and Python's generators seeded from ``sample_seed``: random augmentations
    depend only on the sample's place in the data stream, not on worker count or history."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(state)


def collate(batch):
    """Stack a batch of ``(image, label)`` samples into ``(images, labels)``."""
    xs, ys = zip(*batch)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys, dtype=torch.long)
