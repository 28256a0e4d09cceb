"""The memory layout the Triton launchers take an operand in and give their outputs in:
the op layer's rule (``bitfast.ops.reference.memory_format``), so that real and fake
outputs have the same strides."""

from __future__ import annotations

import torch


def channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is taken as channels_last: 4-d, laid out so and not also plainly
    contiguous (as an (N, C, 1, 1) tensor is)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def memory_format(cl: bool) -> torch.memory_format:
    """``torch.channels_last`` when ``cl``, else ``torch.contiguous_format``."""
    return torch.channels_last if cl else torch.contiguous_format
