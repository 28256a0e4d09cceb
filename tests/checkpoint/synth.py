"""Synthetic BiT checkpoints in every layout, written straight from docs/bit.md (parameter
names, the released .npz files), independently of bitfast.checkpoint's own key mapping, all holding the SAME weights."""

from __future__ import annotations

import numpy as np
import torch

from bitfast.models import ResNetV2


def random_state(model: ResNetV2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every parameter of ``model`` (norm affines and head included),
    rounded to float16-representable values so that a float16 .npz holds them exactly."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        if name.endswith("running_var"):
            v = 0.5 + torch.rand(t.shape, generator=g)
        elif name.endswith("weight") and t.dim() == 1:
            v = 1 + 0.2 * torch.randn(t.shape, generator=g)
        elif t.dim() == 1:
            v = 0.1 * torch.randn(t.shape, generator=g)
        else:
            v = torch.randn(t.shape, generator=g) * (0.05 if name.startswith("head") else 1.0)
        out[name] = v.half().float()
    return out


def _units(layers):
    for i, depth in enumerate(layers):
        for j in range(depth):
            yield i, j


def npz_arrays(state: dict, layers, dtype=np.float32) -> dict[str, np.ndarray]:
    """The official .npz layout: ``resnet/...`` keys, HWIO kernels."""

    def hwio(t):
        return t.permute(2, 3, 1, 0).numpy().astype(dtype)  # OIHW -> HWIO

    def vec(t):
        return t.numpy().astype(dtype)

    out = {"resnet/root_block/standardized_conv2d/kernel": hwio(state["stem.conv.weight"])}
    for i, j in _units(layers):
        src = f"stages.{i}.blocks.{j}"
        dst = f"resnet/block{i + 1}/unit{j + 1:02d}"
        for k, letter in ((1, "a"), (2, "b"), (3, "c")):
            out[f"{dst}/{letter}/standardized_conv2d/kernel"] = hwio(state[f"{src}.conv{k}.weight"])
            out[f"{dst}/{letter}/group_norm/gamma"] = vec(state[f"{src}.norm{k}.weight"])
            out[f"{dst}/{letter}/group_norm/beta"] = vec(state[f"{src}.norm{k}.bias"])
        if j == 0:
            out[f"{dst}/a/proj/standardized_conv2d/kernel"] = hwio(state[f"{src}.downsample.conv.weight"])
    out["resnet/group_norm/gamma"] = vec(state["norm.weight"])
    out["resnet/group_norm/beta"] = vec(state["norm.bias"])
    if "head.fc.weight" in state:
        out["resnet/head/conv2d/kernel"] = hwio(state["head.fc.weight"])
        out["resnet/head/conv2d/bias"] = vec(state["head.fc.bias"])
    return out


def authors_state(state: dict, layers) -> dict[str, torch.Tensor]:
    """The authors' PyTorch module names (root/body/head.gn/head.conv)."""
    out = {"root.conv.weight": state["stem.conv.weight"]}
    for i, j in _units(layers):
        src = f"stages.{i}.blocks.{j}"
        dst = f"body.block{i + 1}.unit{j + 1:02d}"
        for k in (1, 2, 3):
            out[f"{dst}.gn{k}.weight"] = state[f"{src}.norm{k}.weight"]
            out[f"{dst}.gn{k}.bias"] = state[f"{src}.norm{k}.bias"]
            out[f"{dst}.conv{k}.weight"] = state[f"{src}.conv{k}.weight"]
        if j == 0:
            out[f"{dst}.downsample.weight"] = state[f"{src}.downsample.conv.weight"]
    out["head.gn.weight"] = state["norm.weight"]
    out["head.gn.bias"] = state["norm.bias"]
    if "head.fc.weight" in state:
        out["head.conv.weight"] = state["head.fc.weight"]
        out["head.conv.bias"] = state["head.fc.bias"]
    return {k: v.clone() for k, v in out.items()}


def authors_training_checkpoint(state: dict, layers, step: int = 500) -> dict:
    """A ``bit.pth.tar`` as the authors' training script saves it: DataParallel-prefixed
    model keys next to the step and the SGD state."""
    model = {f"module.{k}": v for k, v in authors_state(state, layers).items()}
    params = list(model.values())
    optim = {
        "state": {i: {"momentum_buffer": torch.zeros_like(p)} for i, p in enumerate(params[:3])},
        "param_groups": [
            {"lr": 0.003, "momentum": 0.9, "dampening": 0, "weight_decay": 0, "nesterov": False,
             "params": list(range(len(params)))}
        ],
    }
    return {"step": step, "model": model, "optim": optim}
