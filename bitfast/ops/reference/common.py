"""What the reference kernels share: the dtype of statistics, the memory format of outputs,
and per-channel parameter views."""

from __future__ import annotations

import torch

__all__ = ["channel_view", "memory_format", "stat_dtype"]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when ``x`` is laid out so (and not also plainly contiguous), else
    contiguous: the layout every op keeps for its outputs."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def channel_view(t: torch.Tensor | None, c: int, dtype: torch.dtype, device, fill: float) -> torch.Tensor:
    """A per-channel parameter ``t`` (C,) in ``dtype``, or ``fill`` repeated C times when the
    op has none (no affine weight or bias)."""
    if t is None:
        return torch.full((c,), fill, dtype=dtype, device=device)
    return t.to(dtype)

