"""Distributed data parallel set-up for bitfast's training loops.

The loops run unchanged under ``torchrun``: ``init_distributed`` reads torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), starts the process group (NCCL on GPUs, gloo on
CPU) and picks this process's device; without those variables it returns a one-process
``DistInfo`` and nothing else changes. Metrics are summed across ranks with ``all_reduce_sum``;
only rank 0 (``info.is_main``) writes checkpoints, metrics and plots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_reduce_sum", "barrier", "check_batch", "init_distributed", "shutdown"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, its ``local_rank`` on
    the node and its ``device``; ``enabled`` when a process group is running."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from exc


def init_distributed(device: str | None = None, backend: str | None = None) -> DistInfo:
    """Start (or join) the process group when launched by ``torchrun``; return a ``DistInfo``.

    ``device``: ``"cuda"``, ``"cpu"`` or None (CUDA when available). Under torchrun on GPUs each
    process takes ``cuda:LOCAL_RANK``. ``backend`` defaults to NCCL for CUDA and gloo for CPU.
    Without torchrun's variables (or with ``WORLD_SIZE=1``) no process group is started.
    """
    world = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0  # checked like the others; the process group reports it
    local_rank = _env_int("LOCAL_RANK") or 0
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; pass --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(rank=rank, device=dev)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        store = _attempt_store(world)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev, enabled=True)


def _attempt_store(world: int):
    """Under torchrun, a view of torchrun's own key-value store private to this attempt of the
    worker group, or None (then torch's default rendezvous is used).

    torchrun (torch 2.5+) lets the workers' process group share its rendezvous store, without
    a prefix per restart: a worker group restarted after a failure (``--max-restarts``) then
    reads the addresses the dead group published and cannot connect. Keys under
    ``bitfast/attempt<TORCHELASTIC_RESTART_COUNT>/`` keep the attempts apart. Set
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` to bypass the shared store altogether."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    host, port = os.environ.get("MASTER_ADDR"), _env_int("MASTER_PORT")
    if not host or port is None:
        return None
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT") or 0
    store = dist.TCPStore(host, port, world, is_master=False)
    return dist.PrefixStore(f"bitfast/attempt{attempt}/", store)


def check_batch(batch_size: int, world_size: int, batch_split: int = 1) -> int:
    """The per-process batch of a global ``batch_size``; a clear ``ValueError`` when the batch
    is smaller than the number of processes or does not divide evenly (processes x micro-batches)."""
    if batch_size < world_size:
        raise ValueError(
            f"--batch-size {batch_size} is smaller than the number of processes ({world_size}): every process "
            f"needs at least one image; use a batch of at least {world_size} or fewer processes"
        )
    if batch_size % (world_size * batch_split):
        raise ValueError(
            f"--batch-size {batch_size} must be divisible by processes x --batch-split = {world_size} x {batch_split}; "
            f"e.g. use --batch-size {max(1, batch_size // (world_size * batch_split)) * world_size * batch_split}"
        )
    return batch_size // world_size


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over all processes (in place) and return it; a no-op with one process."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op with one process)."""
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Destroy the process group started by ``init_distributed`` (no-op with one process)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
