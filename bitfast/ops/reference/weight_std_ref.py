"""The reference of weight standardization and the standardized convolution (``bitfast.ops.weight_std``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitfast.ops.reference.common import memory_format, stat_dtype

__all__ = [
    "weight_standardize",
    "weight_standardize_forward",
    "weight_standardize_backward",
    "std_conv2d",
    "weight_standardize_multi_forward",
    "weight_standardize_multi_backward",
]


def weight_standardize(w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """timm's weight standardization (``F.batch_norm`` in training mode over each output
    channel): ``(w - mean) / sqrt(var + eps)`` with the biased variance.

    Written with ``var_mean`` rather than ``F.batch_norm`` so that a channel of a single
    element (K = 1) standardizes to zero instead of raising. Computed in float32 (eps 1e-8
    and 1e-10 round to zero in half precision), returned in ``w``'s dtype and memory format
    (``memory_format``), as every backend returns it.
    """
    wf = w.to(stat_dtype(w.dtype)).reshape(w.shape[0], -1)
    var, mean = torch.var_mean(wf, dim=1, correction=0, keepdim=True)
    out = ((wf - mean) * torch.rsqrt(var + eps)).reshape(w.shape).to(w.dtype)
    return out.contiguous(memory_format=memory_format(w))


def weight_standardize_forward(w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardized weight plus the per-output-channel ``mean`` and ``rstd`` (float32)."""
    wf = w.to(stat_dtype(w.dtype)).reshape(w.shape[0], -1)
    mean = wf.mean(dim=1)
    var = (wf - mean[:, None]).square().mean(dim=1)
    rstd = torch.rsqrt(var + eps)
    out = ((wf - mean[:, None]) * rstd[:, None]).reshape(w.shape).to(w.dtype)
    return out.contiguous(memory_format=memory_format(w)), mean, rstd


def weight_standardize_backward(
    grad_out: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """Gradient of ``weight_standardize`` w.r.t. ``w``.

    With ``w_hat = (w - mean) * rstd`` over the K elements of an output channel:
    ``dw = rstd * (g - mean(g) - w_hat * mean(g * w_hat))``.
    """
    sd = mean.dtype
    g = grad_out.to(sd).reshape(w.shape[0], -1)
    w_hat = (w.to(sd).reshape(w.shape[0], -1) - mean[:, None]) * rstd[:, None]
    dw = rstd[:, None] * (g - g.mean(dim=1, keepdim=True) - w_hat * (g * w_hat).mean(dim=1, keepdim=True))
    return dw.reshape(w.shape).to(w.dtype).contiguous(memory_format=memory_format(w))


def std_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    eps: float = 1e-8,
) -> torch.Tensor:
    """A convolution with a weight-standardized kernel, as timm's ``StdConv2d``."""
    return F.conv2d(x, weight_standardize(weight, eps), bias, stride, padding, dilation, groups)



def weight_standardize_multi_forward(
    ws: list[torch.Tensor], eps: float, out_dtype: torch.dtype | None = None
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``weight_standardize_forward`` of every weight of ``ws``: the standardized weights (in
    ``out_dtype`` when given: the weight's result rounded once to it), and the statistics of
    all their output channels, one weight after the other."""
    results = [weight_standardize_forward(w, eps) for w in ws]
    outs = [r[0] if out_dtype is None else r[0].to(out_dtype) for r in results]
    return outs, torch.cat([r[1] for r in results]), torch.cat([r[2] for r in results])


def weight_standardize_multi_backward(
    grad_outs: list[torch.Tensor], ws: list[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor
) -> list[torch.Tensor]:
    """``weight_standardize_backward`` of every weight, each with its slice of the statistics
    (a gradient in another dtype than its weight's, as after ``out_dtype``, is converted first)."""
    grads, first = [], 0
    for g, w in zip(grad_outs, ws):
        g = g.to(w.dtype)
        o = w.shape[0]
        grads.append(weight_standardize_backward(g, w, mean[first:first + o], rstd[first:first + o]))
        first += o
    return grads
