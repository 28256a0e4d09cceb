"""BatchNorm (Ioffe & Szegedy, 2015) fused with the ReLU that follows it: the BatchNorm
variant of BiT from the project brief (the paper's ablation: BN+WS 75.8 vs GN+WS 76.0).

``F.batch_norm``'s argument order and semantics: in training, batch statistics (biased
variance for normalization) and, when running statistics are given, PyTorch's update
``r = (1 - momentum) r + momentum s`` with the unbiased variance; otherwise the running
statistics (a per-channel scale, shift and ReLU).
"""

from __future__ import annotations

import torch

from bitfast import backends
from bitfast.ops import _register, checks, reference
from bitfast.ops.reference import memory_format, stat_dtype

__all__ = ["batch_norm_relu"]

FAMILY = "batch_norm_relu"

SCHEMAS = {
    "batch_norm_relu_fwd": (
        "(Tensor x, Tensor? running_mean, Tensor? running_var, Tensor? weight, Tensor? bias,"
        " bool training, float eps, bool relu) -> (Tensor y, Tensor mean, Tensor var)"
    ),
    "batch_norm_relu_bwd": (
        "(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var,"
        " bool training, float eps, bool relu)"
        " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)"
    ),
    # Running statistics are updated by their own (mutating) op: PyTorch only accepts
    # autograd formulas on functional ops, so the forward above cannot mutate them.
    "batch_norm_update_stats_": (
        "(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var,"
        " float momentum, int count) -> ()"
    ),
}


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


def _setup_context(ctx, inputs, output):
    x, _rm, _rv, weight, bias, training, eps, relu = inputs
    _y, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.training, ctx.eps, ctx.relu = training, eps, relu
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _backward(ctx, call, grad_y, _grad_mean, _grad_var):
    x, weight, bias, mean, var = ctx.saved_tensors
    grad_y = grad_y.contiguous(memory_format=memory_format(x))
    dx, dw, db = call("batch_norm_relu_bwd", grad_y, x, weight, bias, mean, var, ctx.training, ctx.eps, ctx.relu)
    return dx, None, None, (dw if ctx.has_weight else None), (db if ctx.has_bias else None), None, None, None


OP = _register.define_op(
    FAMILY, SCHEMAS,
    fakes={"batch_norm_relu_fwd": _fwd_fake, "batch_norm_relu_bwd": _bwd_fake, "batch_norm_update_stats_": _update_fake},
    references={"batch_norm_relu_fwd": reference.batch_norm_relu_forward,
                "batch_norm_relu_bwd": reference.batch_norm_relu_backward,
                "batch_norm_update_stats_": reference.batch_norm_update_stats_},
    forward="batch_norm_relu_fwd", setup_context=_setup_context, backward=_backward,
    triton_module="batch_norm_relu",
)


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
    checks.tensor(fn, "x", x)
    checks.floating(fn, "x", x)
    checks.ndim(fn, "x", x, 4, "(N, C, H, W)")
    if x.numel() == 0:
        raise ValueError(f"{fn}: x has shape {tuple(x.shape)} with no elements; expected a non-empty input")
    c = x.shape[1]
    for arg, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        checks.channel_vector(fn, arg, t, c, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{fn}: running_mean and running_var must be given together or both be None")
    if not training and running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_var are required when training=False")
    if not isinstance(training, bool):
        raise TypeError(f"{fn}: training must be a bool; got {type(training).__name__}")
    if not isinstance(relu, bool):
        raise TypeError(f"{fn}: relu must be a bool; got {type(relu).__name__}")
    checks.non_negative(fn, "momentum", momentum)
    checks.non_negative(fn, "eps", eps)
    count = x.numel() // c
    if training and count <= 1:
        raise ValueError(
            f"{fn}: expected more than 1 value per channel when training; got input of shape {tuple(x.shape)}"
        )
    name = backends.resolve(FAMILY, x.device.type, x.dtype, backend)
    if name == "reference":
        return reference.batch_norm_relu(x, running_mean, running_var, weight, bias, training, momentum, eps, relu)
    x = x.contiguous(memory_format=memory_format(x))
    y, mean, var = OP(name, x, running_mean, running_var, weight, bias, training, float(eps), relu)
    if training and running_mean is not None:
        OP.run("batch_norm_update_stats_", name, running_mean, running_var, mean, var, float(momentum), count)
    return y
