"""The reference of GroupNorm+ReLU and of GroupNorm+ReLU of a sum (``bitfast.ops.group_norm_relu``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitfast.ops.reference.common import channel_view, memory_format, stat_dtype

__all__ = [
    "group_norm_relu",
    "group_norm_relu_forward",
    "group_norm_relu_backward",
    "group_norm_relu_add",
    "group_norm_relu_add_forward",
    "group_norm_relu_add_backward",
]


def group_norm_relu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    relu: bool = True,
) -> torch.Tensor:
    """timm's ``GroupNormAct``: ``F.group_norm`` then ReLU, keeping ``x``'s memory format."""
    fmt = memory_format(x)
    mixed = weight is not None and weight.dtype != x.dtype
    if mixed and not torch.is_autocast_enabled(x.device.type):
        # Half-precision activations with float32 parameters: F.group_norm on CUDA refuses
        # mixed dtypes outside autocast, so compute as autocast would (in the parameters'
        # dtype) and return x's dtype.
        y = F.group_norm(x.to(weight.dtype), num_groups, weight, bias, eps).to(x.dtype)
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
    if relu:
        y = F.relu(y)
    return y.contiguous(memory_format=fmt)


def _group_view(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    n, c = x.shape[:2]
    return x.reshape(n, num_groups, c // num_groups, -1)


def group_norm_relu_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm(+ReLU) output plus per-(sample, group) ``mean`` and ``rstd`` (float32)."""
    n, c = x.shape[:2]
    sd = stat_dtype(x.dtype)
    xg = _group_view(x.to(sd), num_groups)
    mean = xg.mean(dim=(2, 3))
    var = (xg - mean[..., None, None]).square().mean(dim=(2, 3))
    rstd = torch.rsqrt(var + eps)
    xhat = (xg - mean[..., None, None]) * rstd[..., None, None]
    w = channel_view(weight, c, sd, x.device, 1.0).reshape(1, num_groups, c // num_groups, 1)
    b = channel_view(bias, c, sd, x.device, 0.0).reshape(1, num_groups, c // num_groups, 1)
    y = xhat * w + b
    if relu:
        y = y.clamp_min(0)
    y = y.reshape(x.shape).to(x.dtype).contiguous(memory_format=memory_format(x))
    return y, mean, rstd


def group_norm_relu_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of GroupNorm(+ReLU) w.r.t. ``x``, ``weight`` and ``bias``.

    The normalized value and the ReLU mask are recomputed from ``x`` and the saved
    statistics, so nothing but ``x`` is kept for backward. Per group of M elements, with
    ``g = dy * mask * gamma``: ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``.
    ``grad_weight``/``grad_bias`` have ``weight``'s dtype (float32 when ``weight`` is None).
    """
    return _group_norm_relu_grads(grad_y, None, x, weight, bias, mean, rstd, num_groups, relu)


def _group_norm_relu_grads(grad_y, grad_sum, x, weight, bias, mean, rstd, num_groups, relu):
    # GroupNorm(+ReLU) gradients; grad_sum (when given) is added to dx in the statistics
    # dtype, before dx's one rounding to x's dtype (the fused residual backward).
    n, c = x.shape[:2]
    cg = c // num_groups
    sd = mean.dtype
    xhat = (_group_view(x.to(sd), num_groups) - mean[..., None, None]) * rstd[..., None, None]
    w = channel_view(weight, c, sd, x.device, 1.0).reshape(1, num_groups, cg, 1)
    b = channel_view(bias, c, sd, x.device, 0.0).reshape(1, num_groups, cg, 1)
    dy = _group_view(grad_y.to(sd), num_groups)
    if relu:
        dy = torch.where(xhat * w + b > 0, dy, torch.zeros((), dtype=sd, device=x.device))
    grad_bias = dy.sum(dim=(0, 3)).reshape(c)
    grad_weight = (dy * xhat).sum(dim=(0, 3)).reshape(c)
    g = dy * w
    dx = rstd[..., None, None] * (
        g - g.mean(dim=(2, 3), keepdim=True) - xhat * (g * xhat).mean(dim=(2, 3), keepdim=True)
    )
    dx = dx.reshape(x.shape)
    if grad_sum is not None:
        dx = dx + grad_sum.to(sd)
    dx = dx.to(x.dtype).contiguous(memory_format=memory_format(x))
    pdtype = weight.dtype if weight is not None else torch.float32
    return dx, grad_weight.to(pdtype), grad_bias.to(pdtype)


def group_norm_relu_add(
    a: torch.Tensor,
    b: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    relu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum ``s = a + b`` and ``group_norm_relu(s)``, as a pre-activation
    ResNet computes them unfused: returns ``(s, y)``, both in ``a``'s memory format."""
    s = (a + b).contiguous(memory_format=memory_format(a))
    return s, group_norm_relu(s, num_groups, weight, bias, eps, relu)


def group_norm_relu_add_forward(
    a: torch.Tensor,
    b: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, y, mean, rstd)``: the sum ``s = a + b`` rounded to the inputs' dtype (what
    ``a + b`` gives), then ``group_norm_relu_forward(s)``. ``s`` and ``y`` keep ``a``'s
    memory format; ``b`` must have ``a``'s shape and dtype (no broadcasting)."""
    s = (a + b).contiguous(memory_format=memory_format(a))
    y, mean, rstd = group_norm_relu_forward(s, weight, bias, num_groups, eps, relu)
    return s, y, mean, rstd


def group_norm_relu_add_backward(
    grad_y: torch.Tensor,
    grad_sum: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``group_norm_relu_add`` w.r.t. its inputs: ``(grad_input, grad_weight,
    grad_bias)``. ``grad_input = grad_sum + d y / d s`` (``grad_sum`` None counts as zero),
    added in the statistics dtype and rounded once; it is the gradient of ``a`` and of ``b``
    alike. ``grad_weight``/``grad_bias`` as in ``group_norm_relu_backward``."""
    return _group_norm_relu_grads(grad_y, grad_sum, s, weight, bias, mean, rstd, num_groups, relu)

