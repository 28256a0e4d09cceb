"""``make_loader``: a DataLoader set up the way bitfast's training loops want it.

* The order of an epoch is a function of ``(seed, epoch)`` only (:class:`EpochSampler`), in
  one process or sharded over the ranks of ``torch.distributed``, so a run resumed at
  epoch ``e`` sees the same batches as an uninterrupted one. It is the training loop's order
  (``bitfast.data.sampling.epoch_permutation``): epoch ``e`` of ``make_loader(seed=s)`` holds
  the examples of epoch ``e`` of a training run with seed ``s``. Call
  :func:`set_epoch(loader, e) <set_epoch>` (or ``loader.sampler.set_epoch(e)``) before each
  epoch; it also reseeds the worker processes' random streams (augmentation) from
  ``(seed, e)``.
* Training shards are padded (by repeating examples) so that every rank runs the same number
  of steps, as DistributedDataParallel needs; evaluation shards are not padded, so no example
  is counted twice (reduce metric *counts* across ranks, and evaluate the unwrapped module
  or under ``torch.no_grad()``, as ranks may run different numbers of batches).
* Worker processes: none for in-memory datasets (the digits, TensorDataset), else
  ``min(4, cpus - 1)``; pinned host memory when CUDA is available.
"""

from __future__ import annotations

import math
import os
import random

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from bitfast.data.sampling import epoch_permutation, epoch_seed

__all__ = ["EpochSampler", "default_workers", "make_loader", "set_epoch"]


class EpochSampler(Sampler[int]):
    """The indices of one rank's share of each epoch.

    With ``shuffle``, epoch ``e`` is ``epoch_permutation(size, seed, e)`` (the training
    loop's order); otherwise the dataset order. Rank ``r`` of ``num_replicas`` takes positions ``r, r + R, r + 2R, ...``.
    With ``pad`` (default: ``shuffle``) the epoch is extended by repeating its first indices to
    a multiple of ``num_replicas``, so every rank gets ``ceil(n / R)`` indices.
    """

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        pad: bool | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"EpochSampler: the dataset is empty (size {size}); there is nothing to load")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"EpochSampler: rank {rank} must be in [0, num_replicas={num_replicas})")
        self.size, self.shuffle, self.seed = int(size), bool(shuffle), int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.pad = self.shuffle if pad is None else bool(pad)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = int(epoch)

    def _order(self) -> torch.Tensor:
        order = epoch_permutation(self.size, self.seed, self.epoch, shuffle=self.shuffle)
        if self.pad and self.size % self.num_replicas:
            total = math.ceil(self.size / self.num_replicas) * self.num_replicas
            order = order.repeat(math.ceil(total / self.size))[:total]
        return order

    def __iter__(self):
        return iter(self._order()[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.size / self.num_replicas)
        return len(range(self.rank, self.size, self.num_replicas))


def default_workers(dataset: Dataset) -> int:
    """Worker processes for ``dataset``: 0 for in-memory data (a ``TensorDataset`` or any
    dataset with ``in_memory = True``, like the digits), else ``min(4, cpus - 1)``."""
    if isinstance(dataset, TensorDataset) or getattr(dataset, "in_memory", False):
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker's torch generator; seed Python's and NumPy's from it too, so
    # transforms that use those are deterministic as well.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    workers: int | None = None,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool | None = None,
    collate_fn=None,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` with a deterministic, optionally sharded, sampler.

    Args:
        batch_size: examples per batch *per process* (under ``distributed``, the global batch
            is ``batch_size * world_size``).
        train: shuffle (from ``seed`` and the epoch) and pad shards; otherwise keep the order
            and do not pad.
        workers: DataLoader worker processes; default :func:`default_workers`.
        distributed: shard over the ranks of the initialised default process group.
        seed: the seed of the order and of the workers' random streams.
        drop_last: drop a last incomplete batch; default: when training and the shard holds
            at least one full batch.
        pin_memory: default: when CUDA is available.

    Before each epoch call ``set_epoch(loader, epoch)`` (``loader.sampler.set_epoch(epoch)``
    sets the order only). ``loader.sampler`` is an :class:`EpochSampler`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"make_loader: batch_size must be an int >= 1; got {batch_size!r}")
    size = len(dataset)
    if size < 1:
        raise ValueError("make_loader: the dataset is empty; check its folder or class selection")
    num_replicas, rank = 1, 0
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "make_loader(distributed=True) needs torch.distributed initialised first "
                "(torch.distributed.init_process_group, e.g. under torchrun)"
            )
        num_replicas, rank = dist.get_world_size(), dist.get_rank()
        if train and size < num_replicas:
            raise ValueError(
                f"make_loader: {size} training examples cannot be sharded over {num_replicas} processes; "
                "use fewer processes or more data"
            )
    sampler = EpochSampler(size, shuffle=train, seed=seed, num_replicas=num_replicas, rank=rank)
    if workers is None:
        workers = default_workers(dataset)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"make_loader: workers must be an int >= 0; got {workers!r}")
    if drop_last is None:
        drop_last = bool(train) and len(sampler) >= batch_size
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    generator = torch.Generator().manual_seed(epoch_seed(seed, 0))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_seed_worker if workers > 0 else None,
    )
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Prepare ``loader`` for ``epoch``: its sampler's order and (for worker processes) the
    seed the workers' random streams are derived from both become functions of
    ``(seed, epoch)``."""
    sampler = loader.sampler
    if not hasattr(sampler, "set_epoch"):
        raise TypeError(f"set_epoch: the loader's sampler ({type(sampler).__name__}) has no set_epoch")
    sampler.set_epoch(epoch)
    if loader.generator is not None and isinstance(sampler, EpochSampler):
        loader.generator.manual_seed(epoch_seed(sampler.seed, epoch))
