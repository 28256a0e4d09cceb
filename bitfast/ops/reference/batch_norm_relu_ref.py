"""The reference of BatchNorm+ReLU and its running-statistics update (``bitfast.ops.batch_norm_relu``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitfast.ops.reference.common import channel_view, memory_format, stat_dtype

__all__ = [
    "batch_norm_relu",
    "batch_norm_relu_forward",
    "batch_norm_relu_backward",
    "batch_norm_update_stats_",
]


def batch_norm_relu(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    relu: bool = True,
) -> torch.Tensor:
    """``F.batch_norm`` then ReLU (timm's ``BatchNormAct2d``), keeping the memory format."""
    fmt = memory_format(x)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if relu:
        y = F.relu(y)
    return y.contiguous(memory_format=fmt)


def _bcast(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


def batch_norm_relu_forward(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm(+ReLU) output plus the per-channel ``mean`` and biased ``var`` it used.

    In training these are the batch statistics; otherwise the running statistics (as
    float32 copies). Running statistics are not touched: see ``batch_norm_update_stats_``.
    """
    c = x.shape[1]
    sd = stat_dtype(x.dtype)
    xf = x.to(sd)
    if training:
        mean = xf.mean(dim=(0, 2, 3))
        var = (xf - _bcast(mean)).square().mean(dim=(0, 2, 3))
    else:
        mean = running_mean.to(sd).clone()
        var = running_var.to(sd).clone()
    rstd = torch.rsqrt(var + eps)
    w = channel_view(weight, c, sd, x.device, 1.0)
    b = channel_view(bias, c, sd, x.device, 0.0)
    y = (xf - _bcast(mean)) * _bcast(rstd * w) + _bcast(b)
    if relu:
        y = y.clamp_min(0)
    return y.to(x.dtype).contiguous(memory_format=memory_format(x)), mean, var


def batch_norm_relu_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of BatchNorm(+ReLU) w.r.t. ``x``, ``weight`` and ``bias``.

    In training the statistics depend on ``x``:
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` over (N, H, W) with
    ``g = dy * mask * gamma``; in eval they are constants and ``dx = g * rstd``.
    """
    c = x.shape[1]
    sd = mean.dtype
    rstd = torch.rsqrt(var + eps)
    xhat = (x.to(sd) - _bcast(mean)) * _bcast(rstd)
    w = channel_view(weight, c, sd, x.device, 1.0)
    b = channel_view(bias, c, sd, x.device, 0.0)
    dy = grad_y.to(sd)
    if relu:
        dy = torch.where(xhat * _bcast(w) + _bcast(b) > 0, dy, torch.zeros((), dtype=sd, device=x.device))
    grad_bias = dy.sum(dim=(0, 2, 3))
    grad_weight = (dy * xhat).sum(dim=(0, 2, 3))
    g = dy * _bcast(w)
    if training:
        dx = _bcast(rstd) * (
            g - g.mean(dim=(0, 2, 3), keepdim=True) - xhat * (g * xhat).mean(dim=(0, 2, 3), keepdim=True)
        )
    else:
        dx = g * _bcast(rstd)
    dx = dx.to(x.dtype).contiguous(memory_format=memory_format(x))
    pdtype = weight.dtype if weight is not None else torch.float32
    return dx, grad_weight.to(pdtype), grad_bias.to(pdtype)


def batch_norm_update_stats_(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    momentum: float,
    count: int,
) -> None:
    """PyTorch's running-stat update: ``r = (1 - m) r + m s``, the variance unbiased
    (``var * count / (count - 1)``) from the ``count`` elements each channel reduced."""
    unbiased = var * (count / (count - 1)) if count > 1 else var
    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)

