"""Key layouts of BiT checkpoints, translated to bitfast's (= timm's) parameter names.

Three layouts name the same tensors:

* ``timm``: bitfast's own state dict: ``stem.conv.weight``, ``stages.{i}.blocks.{j}.norm1.weight``,
  ``stages.{i}.blocks.0.downsample.conv.weight``, ``norm.weight``, ``head.fc.weight`` ...
* ``npz``: the official release files: ``resnet/root_block/standardized_conv2d/kernel``,
  ``resnet/block{i+1}/unit{j+1:02d}/{a,b,c}/{standardized_conv2d/kernel,group_norm/gamma,...}``,
  ``resnet/block{i+1}/unit01/a/proj/standardized_conv2d/kernel``, ``resnet/group_norm/*``,
  ``resnet/head/conv2d/{kernel,bias}``; conv kernels are HWIO (transposed to OIHW here);
* ``authors``: the BiT authors' PyTorch modules: ``root.conv.weight``,
  ``body.block{i+1}.unit{j+1:02d}.{gn1,gn2,gn3,conv1,conv2,conv3}.*``,
  ``body.block{i+1}.unit01.downsample.weight``, ``head.gn.*``, ``head.conv.*``.

GroupNorm ``a`` of a unit normalizes the input of conv ``a``: ``a``/``b``/``c`` are
norm1/conv1, norm2/conv2, norm3/conv3.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["LAYOUTS", "detect_layout", "infer_arch", "npz_to_timm_key", "authors_to_timm_key", "to_timm_layout"]

LAYOUTS: tuple[str, ...] = ("timm", "npz", "authors")

_LETTER = {"a": 1, "b": 2, "c": 3}

_NPZ_UNIT = re.compile(
    r"resnet/block(\d+)/unit(\d+)/([abc])/"
    r"(standardized_conv2d/kernel|group_norm/gamma|group_norm/beta|proj/standardized_conv2d/kernel)"
)
_NPZ_FIXED = {
    "resnet/root_block/standardized_conv2d/kernel": "stem.conv.weight",
    "resnet/group_norm/gamma": "norm.weight",
    "resnet/group_norm/beta": "norm.bias",
    "resnet/head/conv2d/kernel": "head.fc.weight",
    "resnet/head/conv2d/bias": "head.fc.bias",
}

_AUTHORS_UNIT = re.compile(r"body\.block(\d+)\.unit(\d+)\.(?:(gn|conv)([123])\.(weight|bias)|downsample\.weight)")
_AUTHORS_FIXED = {
    "root.conv.weight": "stem.conv.weight",
    "head.gn.weight": "norm.weight",
    "head.gn.bias": "norm.bias",
    "head.conv.weight": "head.fc.weight",
    "head.conv.bias": "head.fc.bias",
}

_TIMM_UNIT = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.")


def npz_to_timm_key(key: str) -> str | None:
    """The bitfast name of an official ``.npz`` key, or None if it names no BiT tensor."""
    if key in _NPZ_FIXED:
        return _NPZ_FIXED[key]
    m = _NPZ_UNIT.fullmatch(key)
    if m is None:
        return None
    block, unit, letter, what = int(m[1]), int(m[2]), m[3], m[4]
    if block < 1 or unit < 1:
        return None
    prefix = f"stages.{block - 1}.blocks.{unit - 1}"
    if what.startswith("proj/"):
        return f"{prefix}.downsample.conv.weight" if letter == "a" else None
    k = _LETTER[letter]
    if what == "standardized_conv2d/kernel":
        return f"{prefix}.conv{k}.weight"
    return f"{prefix}.norm{k}.{'weight' if what.endswith('gamma') else 'bias'}"


def authors_to_timm_key(key: str) -> str | None:
    """The bitfast name of a key of the authors' PyTorch model, or None."""
    if key in _AUTHORS_FIXED:
        return _AUTHORS_FIXED[key]
    m = _AUTHORS_UNIT.fullmatch(key)
    if m is None:
        return None
    block, unit = int(m[1]), int(m[2])
    if block < 1 or unit < 1:
        return None
    prefix = f"stages.{block - 1}.blocks.{unit - 1}"
    if m[3] is None:
        return f"{prefix}.downsample.conv.weight"
    if m[3] == "conv" and m[5] == "bias":
        return None  # BiT convs have no bias
    return f"{prefix}.{'norm' if m[3] == 'gn' else 'conv'}{m[4]}.{m[5]}"


def detect_layout(keys) -> str | None:
    """``"npz"``, ``"authors"`` or ``"timm"`` from the key names; None if none fits."""
    keys = list(keys)
    if any(k.startswith("resnet/") for k in keys):
        return "npz"
    if any(k.startswith(("root.conv.", "body.block")) for k in keys):
        return "authors"
    if any(k.startswith(("stem.conv.", "stages.")) for k in keys):
        return "timm"
    return None


def _hwio_to_oihw(a):
    if isinstance(a, np.ndarray):
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1)) if a.ndim == 4 else a
    return a.permute(3, 2, 0, 1).contiguous() if a.dim() == 4 else a


def to_timm_layout(tensors: Mapping, layout: str) -> tuple[dict, list[str]]:
    """Rename (and, for ``npz``, transpose HWIO -> OIHW) the tensors of a checkpoint in
    ``layout`` to bitfast's names.

    Returns ``(translated, untranslated)``: the renamed tensors (numpy arrays stay numpy
    arrays) and the original names of the keys that name no BiT tensor.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"to_timm_layout: unknown layout {layout!r}; expected one of {LAYOUTS}")
    out: dict = {}
    untranslated: list[str] = []
    for key, value in tensors.items():
        if layout == "timm":
            new = key
        elif layout == "npz":
            new = npz_to_timm_key(key)
            if new is not None:
                value = _hwio_to_oihw(value)
        else:
            new = authors_to_timm_key(key)
        if new is None or new in out:
            untranslated.append(key)
        else:
            out[new] = value
    return out, untranslated


_DEPTH_NAMES = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


def _shape(v) -> tuple[int, ...]:
    return tuple(v.shape) if isinstance(v, (np.ndarray, torch.Tensor)) else ()


def infer_arch(state: Mapping) -> str | None:
    """Guess the architecture of a bitfast-layout state dict: ``"R50x3"``, ``"R?x1 (units
    2,2,2,2)"`` for a non-standard depth, or None when it cannot tell."""
    stem = state.get("stem.conv.weight")
    if stem is None or len(_shape(stem)) != 4:
        return None
    wf, rem = divmod(_shape(stem)[0], 64)
    units: dict[int, int] = {}
    for key in state:
        m = _TIMM_UNIT.match(key)
        if m:
            s, b = int(m[1]), int(m[2])
            units[s] = max(units.get(s, 0), b + 1)
    layers = tuple(units.get(i, 0) for i in range(max(units, default=-1) + 1))
    width = f"x{wf}" if wf >= 1 and rem == 0 else f" (stem width {_shape(stem)[0]})"
    depth = _DEPTH_NAMES.get(layers)
    if depth is not None:
        return f"R{depth}{width}"
    return f"R?{width} (units {','.join(map(str, layers))})"
