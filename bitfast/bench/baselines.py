"""The eager baselines of the benchmarks: timm's formulation of each op in plain PyTorch (what
a user of timm runs today), as functions and as the layers of the eager BiT model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitfast.bench.harness import EPS, GN_GROUPS, WS_EPS

__all__ = ["EagerGroupNormAct", "EagerStdConv2d", "eager_batch_norm_relu", "eager_group_norm_relu",
           "eager_group_norm_relu_add", "eager_weight_standardize"]


def eager_weight_standardize(w: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """timm's StdConv2d weight: ``F.batch_norm`` in training mode over each output channel."""
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=eps).reshape_as(w)


def eager_group_norm_relu(x, weight, bias, num_groups: int = GN_GROUPS, eps: float = EPS):
    """timm's GroupNormAct with ReLU: ``F.group_norm`` then an in-place ReLU."""
    return F.relu(F.group_norm(x, num_groups, weight, bias, eps), inplace=True)


def eager_group_norm_relu_add(a, b, weight, bias, num_groups: int = GN_GROUPS, eps: float = EPS):
    """A pre-activation ResNet's residual add then the next unit's GroupNormAct, unfused:
    returns ``(a + b, relu(group_norm(a + b)))``."""
    s = a + b
    return s, eager_group_norm_relu(s, weight, bias, num_groups, eps)


def eager_batch_norm_relu(x, running_mean, running_var, weight, bias, eps: float = EPS):
    """timm's BatchNormAct2d with ReLU in training mode."""
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, eps), inplace=True)


class EagerStdConv2d(nn.Conv2d):
    """A timm-style standardized conv (the eager baseline's layer)."""

    def __init__(self, in_chs, out_chs, kernel_size, stride=1, padding=0, eps: float = WS_EPS) -> None:
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=padding, bias=False)
        self.eps = eps

    def forward(self, x):
        return F.conv2d(x, eager_weight_standardize(self.weight, self.eps), None, self.stride, self.padding)


class EagerGroupNormAct(nn.GroupNorm):
    """A timm-style GroupNorm + in-place ReLU (the eager baseline's layer)."""

    def __init__(self, channels: int) -> None:
        super().__init__(GN_GROUPS, channels, eps=EPS)

    def forward(self, x):
        return eager_group_norm_relu(x, self.weight, self.bias, self.num_groups, self.eps)
