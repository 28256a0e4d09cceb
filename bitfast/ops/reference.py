"""The pure-PyTorch specification of every bitfast op.

This module is the spec: tests compare every backend against it, benchmarks use it as
the timm-style eager baseline, and the ``reference`` backend runs it. The math follows
timm's BiT layers (``StdConv2d`` standardizes weights through ``F.batch_norm`` over each
output channel with biased variance and eps inside the square root; ``GroupNormAct`` is
``F.group_norm`` followed by ReLU) and ``torch.optim.SGD``.

Two kinds of function live here:

* differentiable composites (``weight_standardize``, ``group_norm_relu``,
  ``group_norm_relu_add``, ``batch_norm_relu``, ``std_conv2d``): plain PyTorch,
  differentiated by autograd, what a user of timm runs today;
* explicit forward/backward pairs (``*_forward`` returning the saved statistics,
  ``*_backward`` the hand-derived gradients): the contract every kernel implements, and the
  kernels of the registered ops under ``backend="reference"``.

Statistics are always computed in float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "memory_format",
    "stat_dtype",
    "weight_standardize",
    "weight_standardize_forward",
    "weight_standardize_backward",
    "std_conv2d",
    "group_norm_relu",
    "group_norm_relu_forward",
    "group_norm_relu_backward",
    "group_norm_relu_add",
    "group_norm_relu_add_forward",
    "group_norm_relu_add_backward",
    "batch_norm_relu",
    "batch_norm_relu_forward",
    "batch_norm_relu_backward",
    "batch_norm_update_stats_",
    "sgd_momentum_",
]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when ``x`` is laid out so (and not also plainly contiguous), else
    contiguous: the layout every op keeps for its outputs."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# --------------------------------------------------------------------------------------
# Weight standardization
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# GroupNorm + ReLU
# --------------------------------------------------------------------------------------


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


def _channel_view(t: torch.Tensor | None, c: int, dtype: torch.dtype, device, fill: float) -> torch.Tensor:
    if t is None:
        return torch.full((c,), fill, dtype=dtype, device=device)
    return t.to(dtype)


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
    w = _channel_view(weight, c, sd, x.device, 1.0).reshape(1, num_groups, c // num_groups, 1)
    b = _channel_view(bias, c, sd, x.device, 0.0).reshape(1, num_groups, c // num_groups, 1)
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
    w = _channel_view(weight, c, sd, x.device, 1.0).reshape(1, num_groups, cg, 1)
    b = _channel_view(bias, c, sd, x.device, 0.0).reshape(1, num_groups, cg, 1)
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


# --------------------------------------------------------------------------------------
# BatchNorm + ReLU
# --------------------------------------------------------------------------------------


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
    w = _channel_view(weight, c, sd, x.device, 1.0)
    b = _channel_view(bias, c, sd, x.device, 0.0)
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
    w = _channel_view(weight, c, sd, x.device, 1.0)
    b = _channel_view(bias, c, sd, x.device, 0.0)
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


# --------------------------------------------------------------------------------------
# SGD with momentum
# --------------------------------------------------------------------------------------


def sgd_momentum_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    lr_tensor: torch.Tensor | None = None,
    ema_params: list[torch.Tensor] = (),
    ema_decay: float = 0.0,
) -> None:
    """One in-place step of ``torch.optim.SGD`` over lists of tensors, with an optional
    exponential moving average (Polyak average) of the parameters.

    Per parameter: ``d = -g if maximize else g``; ``d += weight_decay * p``; with momentum,
    ``buf = d`` on the first step, else ``buf = momentum * buf + (1 - dampening) * d``, and
    ``d = d + momentum * buf`` (nesterov) or ``d = buf``; finally ``p -= lr * d``.
    ``momentum_buffers`` may be empty when ``momentum == 0``.

    ``lr_tensor`` (a one-element float32 tensor), when given, is the learning rate instead
    of ``lr``. A CPU tensor is read as a number, as ``torch.optim.SGD`` does with a tensor
    ``lr``; on other devices the update is formed with tensor arithmetic in float32
    (float64 for float64 params), so the step never waits for the device.

    With ``ema_params`` (one per param, its shape, in its dtype or in float32), after the
    update of ``p``: ``ema = ema_decay * ema + (1 - ema_decay) * p``, from the parameter as
    stored, evaluated as ``torch.lerp(ema, p, 1 - ema_decay)`` (the kernels compute
    ``ema + (1 - ema_decay) * (p - ema)``): weights that sum to one exactly, so a constant
    ``p`` leaves ``ema == p``.
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        d = -g if maximize else g
        if weight_decay != 0:
            d = d.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if is_first_step:
                buf.copy_(d)
            else:
                buf.mul_(momentum).add_(d, alpha=1 - dampening)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        if lr_tensor is None:
            p.add_(d, alpha=-lr)
        elif lr_tensor.device.type == "cpu":
            p.add_(d, alpha=-float(lr_tensor))
        else:
            acc = stat_dtype(p.dtype)
            p.sub_(d.to(acc) * lr_tensor.reshape(()).to(acc))
        if ema_params:
            e = ema_params[i]
            e.lerp_(p.to(e.dtype), 1 - ema_decay)
