"""bitfast's one deterministic data order, shared by the training loop and ``make_loader``.

Epoch ``e`` of a dataset of ``n`` examples under seed ``s`` is the permutation
:func:`epoch_permutation` draws from :func:`epoch_seed` ``(s, e)``; nothing else decides the
order. Two views of it:

* :class:`StepSampler` (the training loop): the endless stream of epochs cut into global
  batches, addressed by step, so a run resumed at step ``k`` replays steps ``k+1 ...`` exactly;
  each process takes its contiguous slice of every global batch. With :class:`SeededDataset`
  every example's augmentation is drawn from a seed fixed by its position in the stream.
* :class:`bitfast.data.EpochSampler` (``make_loader``): one epoch at a time, ranks taking
  strided shares.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

__all__ = ["SeededDataset", "StepSampler", "collate", "epoch_permutation", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s order (and of ``make_loader``'s worker streams) under ``seed``."""
    return int(seed) * 1_000_003 + int(epoch)


def epoch_permutation(n: int, seed: int, epoch: int, *, shuffle: bool = True) -> torch.Tensor:
    """The order of epoch ``epoch`` of ``n`` examples: a permutation drawn from
    ``epoch_seed(seed, epoch)``, or ``arange(n)`` without ``shuffle``."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


class StepSampler:
    """The data order as a function of the step: the infinite stream of per-epoch permutations
    of ``range(n)`` (:func:`epoch_permutation`) cut into global batches of ``global_batch``;
    process ``rank`` of ``world_size`` takes its contiguous slice of each. Yields, for steps
    ``start_step .. total_steps - 1``, lists of ``(index, sample_seed)`` keys for
    :class:`SeededDataset`.
    """

    def __init__(self, n: int, global_batch: int, *, total_steps: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        if n < 1:
            raise ValueError("StepSampler: the dataset is empty")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"StepSampler: rank {rank} must be in [0, world_size={world_size})")
        if global_batch < world_size or global_batch % world_size:
            raise ValueError(f"StepSampler: the global batch {global_batch} must be a positive multiple of the "
                             f"number of processes ({world_size})")
        self.n, self.global_batch = n, global_batch
        self.local = global_batch // world_size
        self.total_steps, self.start_step = total_steps, start_step
        self.rank, self.seed, self.shuffle = rank, seed, shuffle
        self._perm: tuple[int, torch.Tensor] | None = None

    def _epoch(self, e: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != e:
            self._perm = (e, epoch_permutation(self.n, self.seed, e, shuffle=self.shuffle))
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
