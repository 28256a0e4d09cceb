"""BatchNorm (Ioffe & Szegedy, 2015) fused with the ReLU that follows it: the BatchNorm
variant of BiT from the project brief (the paper's ablation: BN+WS 75.8 vs GN+WS 76.0).

``F.batch_norm``'s argument order and semantics: in training, batch statistics (biased
variance for normalization) and, when running statistics are given, PyTorch's update
``r = (1 - momentum) r + momentum s`` with the unbiased variance; otherwise the running
statistics (a per-channel scale, shift and ReLU).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from bitfast import backends
from bitfast.ops import _checks, _library, _register, reference
from bitfast.ops.reference import memory_format, stat_dtype

FAMILY = "batch_norm_relu"

backends.register_family(
    FAMILY,
    ("batch_norm_relu_fwd", "batch_norm_relu_bwd", "batch_norm_update_stats_"),
    triton_module="batch_norm_relu",
)


def _fwd_fake(x, running_mean, running_var, weight, bias, training, eps, relu):
    torch._check(x.dim() == 4, lambda: f"batch_norm_relu: x has {x.dim()} dims; expected (N, C, H, W)")
    c = x.shape[1]
    y = torch.empty_like(x, memory_format=memory_format(x))
    return y, x.new_empty((c,), dtype=stat_dtype(x.dtype)), x.new_empty((c,), dtype=stat_dtype(x.dtype))


def _bwd_fake(grad_y, x, weight, bias, mean, var, training, eps, relu):
    c = x.shape[1]
    pdtype = weight.dtype if weight is not None else torch.float32
    return (
        torch.empty_like(x, memory_format=memory_format(x)),
        x.new_empty((c,), dtype=pdtype),
        x.new_empty((c,), dtype=pdtype),
    )


def _update_fake(running_mean, running_var, mean, var, momentum, count):
    return None


_register.register("batch_norm_relu_fwd", _fwd_fake)
_register.register("batch_norm_relu_bwd", _bwd_fake)
_register.register("batch_norm_update_stats_", _update_fake)


def _setup_context(ctx, inputs, output):
    x, _rm, _rv, weight, bias, training, eps, relu, backend = inputs
    _y, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.training, ctx.eps, ctx.relu, ctx.backend = training, eps, relu, backend
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _backward(ctx, grad_y, _grad_mean, _grad_var):
    x, weight, bias, mean, var = ctx.saved_tensors
    grad_y = grad_y.contiguous(memory_format=memory_format(x))
    dx, dw, db = torch.ops.bitfast.batch_norm_relu_bwd(
        grad_y, x, weight, bias, mean, var, ctx.training, ctx.eps, ctx.relu, ctx.backend
    )
    return dx, None, None, (dw if ctx.has_weight else None), (db if ctx.has_bias else None), None, None, None, None


torch.library.register_autograd(
    _library.qualname("batch_norm_relu_fwd"), _backward, setup_context=_setup_context, lib=_library.lib
)


class _EagerBatchNormReLU(torch.autograd.Function):
    """Autograd of ``batch_norm_relu_fwd`` in plain eager execution where no C++ autograd
    serves the backend (Triton; see ``_register.eager_forward``): the registered op's
    kernels and formulas without its Python layer."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, eps, relu, backend):
        fwd = _register.kernel_of("batch_norm_relu_fwd", backend)
        y, mean, var = fwd(x, running_mean, running_var, weight, bias, training, eps, relu)
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.training, ctx.eps, ctx.relu, ctx.backend = training, eps, relu, backend
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, bias, mean, var = ctx.saved_tensors
        grad_y = grad_y.contiguous(memory_format=memory_format(x))
        dx, dw, db = _register.kernel_of("batch_norm_relu_bwd", ctx.backend)(
            grad_y, x, weight, bias, mean, var, ctx.training, ctx.eps, ctx.relu
        )
        dw = dw if weight is not None else None
        db = db if bias is not None else None
        return dx, None, None, dw, db, None, None, None, None


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
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``.

    Args:
        x: (N, C, H, W), NCHW or channels_last, any floating dtype.
        running_mean, running_var: (C,) running statistics, updated in place in training
            (momentum as in ``F.batch_norm``); required when ``training`` is False; may both
            be None in training (batch statistics only).
        weight, bias: optional (C,) affine parameters.
        training: use batch statistics (and update the running ones) instead of the
            running statistics.
        momentum: running-statistics update factor.
        eps: added to the variance inside the square root.
        relu: apply the ReLU.
        backend: force a backend (see ``bitfast.backends``); default: auto.

    Returns:
        A tensor of ``x``'s shape, dtype and memory format; differentiable w.r.t. ``x``,
        ``weight`` and ``bias``.
    """
    fn = "batch_norm_relu"
    _checks.tensor(fn, "x", x)
    _checks.floating(fn, "x", x)
    _checks.ndim(fn, "x", x, 4, "(N, C, H, W)")
    if x.numel() == 0:
        raise ValueError(f"{fn}: x has shape {tuple(x.shape)} with no elements; expected a non-empty input")
    c = x.shape[1]
    for arg, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _checks.channel_vector(fn, arg, t, c, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{fn}: running_mean and running_var must be given together or both be None")
    if not training and running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_var are required when training=False")
    if not isinstance(training, bool):
        raise TypeError(f"{fn}: training must be a bool; got {type(training).__name__}")
    if not isinstance(relu, bool):
        raise TypeError(f"{fn}: relu must be a bool; got {type(relu).__name__}")
    _checks.non_negative(fn, "momentum", momentum)
    _checks.non_negative(fn, "eps", eps)
    count = x.numel() // c
    if training and count <= 1:
        raise ValueError(
            f"{fn}: expected more than 1 value per channel when training; got input of shape {tuple(x.shape)}"
        )
    name = backends.resolve(FAMILY, x.device.type, x.dtype, backend)
    if name == "reference":
        return reference.batch_norm_relu(x, running_mean, running_var, weight, bias, training, momentum, eps, relu)
    x = x.contiguous(memory_format=memory_format(x))
    args = (x, running_mean, running_var, weight, bias, training, float(eps), relu)
    eager = _register.eager(x, running_mean, running_var, weight, bias)
    if eager:
        y, mean, var = _register.eager_forward("batch_norm_relu_fwd", name, _EagerBatchNormReLU, args, (x, weight, bias))
    else:
        y, mean, var = torch.ops.bitfast.batch_norm_relu_fwd(*args, name)
    if training and running_mean is not None:
        stats = (running_mean, running_var, mean, var, float(momentum), count)
        if eager:
            _register.kernel_of("batch_norm_update_stats_", name)(*stats)
        else:
            torch.ops.bitfast.batch_norm_update_stats_(*stats, name)
    return y
