"""Inference export: fold weight standardization (and eval BatchNorm) once, keep plain torch.

``for_inference(model)`` returns an eval-mode copy of a bitfast model built only from
``torch.nn`` modules and the pure-torch classes of ``bitfast.plain_model``:

* every ``StdConv2d`` (LoRA-wrapped ones included, their update merged) becomes an
  ``nn.Conv2d`` whose weight is the standardized weight, computed once in float64 and stored
  in the parameter's dtype: no weight standardization runs per forward;
* ``GroupNormReLU`` becomes ``PlainGroupNormReLU`` (``F.group_norm`` + ReLU, same keys);
* ``BatchNormReLU`` is folded with its running statistics into a per-channel affine map.
  BiT is pre-activation (norm -> ReLU -> conv), so the ReLU sits between a norm and the conv
  it feeds and the affine map cannot move into that conv. It can move into the conv *before*
  it when that conv's output feeds only this norm: in a ``ResNetV2`` that holds for ``norm2``
  (after ``conv1``) and ``norm3`` (after ``conv2``), which fold into those convs (a bias
  appears) and leave a bare ReLU. ``norm1`` and the final ``norm`` read a residual sum, so
  they stay as ``ScaleShiftReLU`` (two (C,) buffers). In other models every
  ``BatchNormReLU`` becomes a ``ScaleShiftReLU``.

A ``bitfast.ResNetV2`` exports to ``bitfast.plain_model.PlainResNetV2`` (its structure
rebuilt from ``exported.config_json``); other models keep their own containers with the
leaves swapped. The result scripts (``torch.jit.script``) and compiles
(``torch.compile(fullgraph=True)``), and its state dict loads where bitfast is not
installed: ``write_plain_module(path)`` writes the one-file definition to copy along.

Pruning and int8 weight quantization of exported models live in ``bitfast.compress`` and are
re-exported here (``prune_magnitude``, ``quantize_int8``).
"""

from __future__ import annotations

import copy
import inspect
import os

import torch
from torch import nn

from bitfast import plain_model
from bitfast.compress import PruneReport, QuantReport, prune_magnitude, quantize_int8
from bitfast.models.resnetv2 import ResNetV2
from bitfast.nn.layers import BatchNormReLU, GroupNormReLU, StdConv2d
from bitfast.ops import reference

__all__ = [
    "PruneReport",
    "QuantReport",
    "for_inference",
    "plain_module_source",
    "prune_magnitude",
    "quantize_int8",
    "write_plain_module",
]


def _raw_weight(conv: StdConv2d) -> torch.Tensor:
    eff = getattr(conv, "effective_weight", None)  # LoRA layers: weight + update
    return (eff() if callable(eff) else conv.weight).detach()


def _folded_conv(conv: StdConv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The standardized weight (float64) and bias (float64 or None) of a StdConv2d."""
    w = reference.weight_standardize(_raw_weight(conv).to(torch.float64), conv.eps)
    b = conv.bias.detach().to(torch.float64) if conv.bias is not None else None
    return w, b


def _bn_affine(bn: BatchNormReLU, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 of an eval-mode BatchNorm: ``x * scale + shift``."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"for_inference: {name} is a BatchNorm without running statistics (track_running_stats=False): "
            "it normalizes with batch statistics even in eval mode, so it has no fixed affine map to export"
        )
    inv = torch.rsqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    w = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(inv)
    b = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(inv)
    scale = w * inv
    return scale, b - bn.running_mean.detach().to(torch.float64) * scale


def _plain_conv(conv: nn.Conv2d, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, bias=b is not None, padding_mode=conv.padding_mode, device=w.device, dtype=dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _swap_leaves(model: nn.Module) -> nn.Module:
    """Replace bitfast leaves by plain ones in ``model`` (a copy), recursively."""
    for name, child in list(model.named_children()):
        if isinstance(child, StdConv2d):
            w, b = _folded_conv(child)
            new = _plain_conv(child, w, b, child.weight.dtype)
        elif isinstance(child, GroupNormReLU):
            new = plain_model.PlainGroupNormReLU(child.num_channels, child.num_groups, child.eps, child.affine,
                                                 relu=child.relu)
            if child.affine:
                new.to(device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    new.weight.copy_(child.weight)
                    new.bias.copy_(child.bias)
        elif isinstance(child, BatchNormReLU):
            scale, shift = _bn_affine(child, name)
            new = plain_model.ScaleShiftReLU(child.num_features, relu=child.relu)
            dtype = child.weight.dtype if child.weight is not None else torch.float32
            new.scale = scale.to(dtype)
            new.shift = shift.to(dtype)
        else:
            _swap_leaves(child)
            continue
        setattr(model, name, new)
    return model


def _resnet_norm(model: ResNetV2) -> str | None:
    """"gn" or "bn" when every conv and norm of ``model`` is a bitfast layer of one BiT
    kind (so PlainResNetV2 reproduces it), else None."""
    convs = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not n.startswith("head.")]
    if not all(isinstance(c, StdConv2d) for c in convs):
        return None
    norms = [m for _, m in model.named_modules() if isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm))]
    if norms and all(type(m) is GroupNormReLU and m.relu and m.affine for m in norms):
        groups = {(m.num_groups, m.eps) for m in norms}
        return "gn" if len(groups) == 1 else None
    if norms and all(isinstance(m, BatchNormReLU) and m.relu for m in norms):
        return "bn"
    return None


@torch.no_grad()
def _export_resnet(model: ResNetV2, norm: str) -> plain_model.PlainResNetV2:
    ref = next(model.parameters())
    gn = next(m for m in model.modules() if isinstance(m, (GroupNormReLU, BatchNormReLU)))
    kwargs = {"num_groups": gn.num_groups, "eps": gn.eps} if norm == "gn" else {}
    plain = plain_model.PlainResNetV2(list(model.layers), model.width_factor, model.num_classes, model.in_chans,
                                      model.base_width, norm=norm, **kwargs)
    plain.to(device=ref.device, dtype=ref.dtype)
    state: dict[str, torch.Tensor] = {}

    def put_conv(key: str, conv: StdConv2d, after: BatchNormReLU | None = None, after_name: str = "") -> None:
        w, b = _folded_conv(conv)
        if after is not None:
            scale, shift = _bn_affine(after, after_name)
            w = w * scale.view(-1, 1, 1, 1)
            b = shift if b is None else b * scale + shift
        state[f"{key}.weight"] = w
        if b is not None:
            state[f"{key}.bias"] = b

    def put_norm(key: str, m: nn.Module) -> None:
        if norm == "gn":
            state[f"{key}.weight"], state[f"{key}.bias"] = m.weight, m.bias
        else:
            state[f"{key}.scale"], state[f"{key}.shift"] = _bn_affine(m, key)

    put_conv("stem.conv", model.stem.conv)
    for i, stage in enumerate(model.stages):
        for j, blk in enumerate(stage.blocks):
            k = f"stages.{i}.blocks.{j}"
            bn = norm == "bn"
            if blk.downsample is not None:
                put_conv(f"{k}.downsample.conv", blk.downsample.conv)
            put_norm(f"{k}.norm1", blk.norm1)
            put_conv(f"{k}.conv1", blk.conv1, blk.norm2 if bn else None, f"{k}.norm2")
            put_conv(f"{k}.conv2", blk.conv2, blk.norm3 if bn else None, f"{k}.norm3")
            put_conv(f"{k}.conv3", blk.conv3)
            if not bn:
                put_norm(f"{k}.norm2", blk.norm2)
                put_norm(f"{k}.norm3", blk.norm3)
    put_norm("norm", model.norm)
    if isinstance(model.head.fc, nn.Conv2d):
        state["head.fc.weight"], state["head.fc.bias"] = model.head.fc.weight, model.head.fc.bias
    plain.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)  # copy_ casts to the dtype
    return plain


def for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` for inference, made of plain torch modules (see the
    module docs for what is folded and what cannot be).

    Args:
        model: a bitfast model (``ResNetV2``, possibly LoRA-wrapped) or any module using
            bitfast layers. It is not modified.

    Returns:
        For a ``ResNetV2`` whose layers are all bitfast's: a ``PlainResNetV2`` (its
        ``config_json`` rebuilds the structure without bitfast). Otherwise a deep copy with
        every bitfast layer swapped for its plain equivalent. In eval mode, with
        ``requires_grad=False`` parameters; outputs equal ``model.eval()``'s within floating
        point rounding (the folded weights are computed in float64).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a BatchNorm without running statistics (nothing to fold).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"for_inference: model must be an nn.Module; got {type(model).__name__}")
    norm = _resnet_norm(model) if isinstance(model, ResNetV2) else None
    if norm is not None:
        out = _export_resnet(model, norm)
    elif isinstance(model, StdConv2d | GroupNormReLU | BatchNormReLU):
        out = _swap_leaves(nn.Sequential(copy.deepcopy(model)))[0]
    else:
        out = _swap_leaves(copy.deepcopy(model))
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def plain_module_source() -> str:
    """The source of ``bitfast.plain_model``: a one-file, torch-only definition of the
    exported modules (``PlainResNetV2``, ``PlainGroupNormReLU``, ``ScaleShiftReLU``, ``Int8Conv2d``...)."""
    return inspect.getsource(plain_model)


def write_plain_module(path: str | os.PathLike) -> str:
    """Write ``plain_module_source()`` to ``path`` (e.g. ``"bitfast_plain_model.py"``), to
    load exported state dicts where bitfast is not installed. Returns the path written."""
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(plain_module_source())
    return path
