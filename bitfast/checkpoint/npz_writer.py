"""Writing a bitfast (timm-layout) state dict as an official-layout BiT ``.npz`` file.

The inverse of the ``npz`` layout in ``bitfast.checkpoint.layouts``: conv kernels go from
OIHW to HWIO (the released files' layout), GroupNorm parameters to ``group_norm/{gamma,beta}``.
Useful to hand bitfast weights to tools that read the official files, and to make synthetic
checkpoints (the README's demo and the tests load one).
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from torch import nn

__all__ = ["save_npz", "timm_to_npz_key"]

_FIXED = {
    "stem.conv.weight": "resnet/root_block/standardized_conv2d/kernel",
    "norm.weight": "resnet/group_norm/gamma",
    "norm.bias": "resnet/group_norm/beta",
    "head.fc.weight": "resnet/head/conv2d/kernel",
    "head.fc.bias": "resnet/head/conv2d/bias",
}
_UNIT = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.(norm([123])\.(weight|bias)|conv([123])\.weight|downsample\.conv\.weight)$")
_LETTERS = "abc"


def timm_to_npz_key(key: str) -> str | None:
    """The official ``.npz`` name of a bitfast parameter, or None (e.g. BatchNorm buffers,
    which the GroupNorm releases do not have)."""
    if key in _FIXED:
        return _FIXED[key]
    m = _UNIT.match(key)
    if m is None:
        return None
    stage, block = int(m.group(1)) + 1, int(m.group(2)) + 1
    prefix = f"resnet/block{stage}/unit{block:02d}"
    if m.group(4):
        leaf = "gamma" if m.group(5) == "weight" else "beta"
        return f"{prefix}/{_LETTERS[int(m.group(4)) - 1]}/group_norm/{leaf}"
    if m.group(6):
        return f"{prefix}/{_LETTERS[int(m.group(6)) - 1]}/standardized_conv2d/kernel"
    return f"{prefix}/a/proj/standardized_conv2d/kernel"


def save_npz(model_or_state: nn.Module | dict, path: str | os.PathLike, dtype: np.dtype | None = None) -> list[str]:
    """Write the GroupNorm BiT weights of a model (or state dict) as an official ``.npz``.

    Args:
        model_or_state: a bitfast/timm BiT model or its state dict.
        path: destination file (``.npz``).
        dtype: numpy dtype of the arrays (default: that of each tensor, as float32 for
            bfloat16, which numpy lacks).

    Returns:
        The keys written. Raises ValueError for a state dict that holds no BiT tensors or
        BatchNorm statistics (the official layout has no place for them).
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    arrays: dict[str, np.ndarray] = {}
    unmapped = []
    for key, value in state.items():
        name = timm_to_npz_key(key)
        if name is None:
            unmapped.append(key)
            continue
        t = value.detach().to("cpu")
        if t.dtype == torch.bfloat16:
            t = t.float()
        a = t.numpy()
        if a.ndim == 4:
            a = a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        arrays[name] = a.astype(dtype) if dtype is not None else a
    if unmapped:
        raise ValueError(
            f"save_npz: {len(unmapped)} tensors have no place in the official .npz layout "
            f"(a BatchNorm model?): {', '.join(unmapped[:5])}{' ...' if len(unmapped) > 5 else ''}"
        )
    if not arrays:
        raise ValueError("save_npz: the state dict holds no BiT tensors")
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return sorted(arrays)
