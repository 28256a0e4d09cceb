"""GroupNorm (Wu & He, 2018) fused with the ReLU that follows it in every BiT unit, and
with the residual add before it (``group_norm_relu_add``).

Statistics per (sample, group) in float32 with biased variance and eps inside the square
root, as ``F.group_norm``; NCHW and channels_last inputs, the output in the input's
memory format and dtype. The backward recomputes the normalized value and the ReLU mask
from ``x`` and the saved (N, G) statistics, so autograd keeps nothing else.
"""

from __future__ import annotations

import math

import torch

from bitfast import backends
from bitfast.ops import _register, checks, reference
from bitfast.ops.reference import memory_format, stat_dtype

__all__ = ["group_norm_relu", "group_norm_relu_add"]

FAMILY = "group_norm_relu"
ADD_FAMILY = "group_norm_relu_add"

SCHEMAS = {
    "group_norm_relu_fwd": (
        "(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, bool relu)"
        " -> (Tensor y, Tensor mean, Tensor rstd)"
    ),
    "group_norm_relu_bwd": (
        "(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd,"
        " int num_groups, bool relu) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)"
    ),
    # The residual sum s = a + b of a pre-activation ResNet fused with the next unit's
    # GroupNorm+ReLU: returns s and y = relu(group_norm(s)). The backward's grad_input is
    # the gradient of a and of b alike: grad_sum (None: zero) plus that of y through s.
    "group_norm_relu_add_fwd": (
        "(Tensor a, Tensor b, Tensor? weight, Tensor? bias, int num_groups, float eps, bool relu)"
        " -> (Tensor sum, Tensor y, Tensor mean, Tensor rstd)"
    ),
    "group_norm_relu_add_bwd": (
        "(Tensor grad_y, Tensor? grad_sum, Tensor sum, Tensor? weight, Tensor? bias, Tensor mean,"
        " Tensor rstd, int num_groups, bool relu)"
        " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)"
    ),
}
_GN = ("group_norm_relu_fwd", "group_norm_relu_bwd")
_ADD = ("group_norm_relu_add_fwd", "group_norm_relu_add_bwd")


def _fwd_fake(x, weight, bias, num_groups, eps, relu):
    torch._check(x.dim() == 4, lambda: f"group_norm_relu: x has {x.dim()} dims; expected (N, C, H, W)")
    torch._check(x.shape[1] % num_groups == 0, lambda: "group_norm_relu: C is not divisible by num_groups")
    n = x.shape[0]
    y = torch.empty_like(x, memory_format=memory_format(x))
    return y, x.new_empty((n, num_groups), dtype=stat_dtype(x.dtype)), x.new_empty((n, num_groups), dtype=stat_dtype(x.dtype))


def _bwd_fake(grad_y, x, weight, bias, mean, rstd, num_groups, relu):
    c = x.shape[1]
    pdtype = weight.dtype if weight is not None else torch.float32
    return (
        torch.empty_like(x, memory_format=memory_format(x)),
        x.new_empty((c,), dtype=pdtype),
        x.new_empty((c,), dtype=pdtype),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, _eps, relu = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.relu = num_groups, relu
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _backward(ctx, call, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    grad_y = grad_y.contiguous(memory_format=memory_format(x))
    dx, dw, db = call("group_norm_relu_bwd", grad_y, x, weight, bias, mean, rstd, ctx.num_groups, ctx.relu)
    return dx, (dw if ctx.has_weight else None), (db if ctx.has_bias else None), None, None, None


OP = _register.define_op(
    FAMILY, {op: SCHEMAS[op] for op in _GN},
    fakes={"group_norm_relu_fwd": _fwd_fake, "group_norm_relu_bwd": _bwd_fake},
    references={"group_norm_relu_fwd": reference.group_norm_relu_forward,
                "group_norm_relu_bwd": reference.group_norm_relu_backward},
    forward="group_norm_relu_fwd", setup_context=_setup_context, backward=_backward,
    triton_module="group_norm_relu",
)


def _valid_channel_vector(t, c: int, x: torch.Tensor) -> bool:
    # What checks.channel_vector accepts, in a few attribute reads.
    return t is None or (
        isinstance(t, torch.Tensor) and t.dtype in checks.FLOAT_DTYPES and t.shape == (c,) and t.device == x.device
    )


def _valid_args(x, num_groups, weight, bias, eps, relu) -> bool:
    # Whether _check_args would pass, for the usual argument types (a plain int, float and
    # bool): a quarter of the cost of the full checks, which every layer pays on every call.
    # Anything else (and every invalid call) takes the full checks and their messages.
    if not (isinstance(x, torch.Tensor) and type(num_groups) is int and type(eps) is float and type(relu) is bool):
        return False
    shape = x.shape
    if len(shape) != 4 or x.dtype not in checks.FLOAT_DTYPES or num_groups < 1 or not 0.0 <= eps < math.inf:
        return False
    n, c, h, w = shape
    if c % num_groups or n * c * h * w == 0 or (c // num_groups) * h * w < 2:
        return False
    return _valid_channel_vector(weight, c, x) and _valid_channel_vector(bias, c, x)


def _check_args(fn, xname, x, num_groups, weight, bias, eps, relu) -> None:
    # The checks every GroupNorm+ReLU entry point makes on its input ``x`` (named xname).
    if _valid_args(x, num_groups, weight, bias, eps, relu):
        return
    checks.tensor(fn, xname, x)
    checks.floating(fn, xname, x)
    checks.ndim(fn, xname, x, 4, "(N, C, H, W)")
    checks.positive_int(fn, "num_groups", num_groups)
    c = x.shape[1]
    if c % num_groups:
        raise ValueError(f"{fn}: {xname} has {c} channels, not divisible by num_groups={num_groups}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: {xname} has shape {tuple(x.shape)} with no elements; expected a non-empty input")
    if x.numel() // (x.shape[0] * num_groups) < 2:
        raise ValueError(
            f"{fn}: each group of {xname} (shape {tuple(x.shape)}, num_groups={num_groups}) has a single "
            f"element; expected more than 1 value per group, as F.group_norm does"
        )
    checks.channel_vector(fn, "weight", weight, c, x)
    checks.channel_vector(fn, "bias", bias, c, x)
    checks.non_negative(fn, "eps", eps)
    if not isinstance(relu, bool):
        raise TypeError(f"{fn}: relu must be a bool; got {type(relu).__name__}")


def group_norm_relu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    relu: bool = True,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``relu(group_norm(x, num_groups, weight, bias, eps))`` in one op.

    Args:
        x: (N, C, H, W), NCHW or channels_last, float16/bfloat16/float32/float64.
        num_groups: number of groups; must divide C (BiT: 32).
        weight, bias: optional per-channel affine parameters, shape (C,); they may have a
            different floating dtype than ``x`` (float32 parameters with a bfloat16 input
            under autocast).
        eps: added to the biased variance inside the square root.
        relu: apply the ReLU (``False`` gives plain GroupNorm).
        backend: force a backend (see ``bitfast.backends``); default: auto.

    Returns:
        A tensor of ``x``'s shape, dtype and memory format. Differentiable w.r.t. ``x``,
        ``weight`` and ``bias``.
    """
    _check_args("group_norm_relu", "x", x, num_groups, weight, bias, eps, relu)
    name = backends.resolve(FAMILY, x.device.type, x.dtype, backend)
    if name == "reference":
        return reference.group_norm_relu(x, num_groups, weight, bias, eps, relu)
    x = x.contiguous(memory_format=memory_format(x))
    return OP(name, x, weight, bias, num_groups, float(eps), relu)[0]


# --------------------------------------------------------------------------------------
# Residual add fused with GroupNorm+ReLU
# --------------------------------------------------------------------------------------
#
# In a pre-activation ResNet every unit ends with s = a + b (conv output + shortcut) and
# the next unit begins with relu(group_norm(s)). The fused op writes s and y from one pass
# over a and b; its backward writes grad_sum + d y / d s, which is the gradient of a and
# of b alike, in the pass that writes the GroupNorm input gradient.

def _add_fwd_fake(a, b, weight, bias, num_groups, eps, relu):
    torch._check(a.dim() == 4, lambda: f"group_norm_relu_add: a has {a.dim()} dims; expected (N, C, H, W)")
    torch._check(a.shape == b.shape, lambda: "group_norm_relu_add: a and b must have the same shape")
    torch._check(a.dtype == b.dtype, lambda: "group_norm_relu_add: a and b must have the same dtype")
    torch._check(a.shape[1] % num_groups == 0, lambda: "group_norm_relu_add: C is not divisible by num_groups")
    n, fmt, sd = a.shape[0], memory_format(a), stat_dtype(a.dtype)
    return (
        torch.empty_like(a, memory_format=fmt),
        torch.empty_like(a, memory_format=fmt),
        a.new_empty((n, num_groups), dtype=sd),
        a.new_empty((n, num_groups), dtype=sd),
    )


def _add_bwd_fake(grad_y, grad_sum, s, weight, bias, mean, rstd, num_groups, relu):
    c = s.shape[1]
    pdtype = weight.dtype if weight is not None else torch.float32
    return (
        torch.empty_like(s, memory_format=memory_format(s)),
        s.new_empty((c,), dtype=pdtype),
        s.new_empty((c,), dtype=pdtype),
    )


def _add_setup_context(ctx, inputs, output):
    _a, _b, weight, bias, num_groups, _eps, relu = inputs
    s, _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(s, weight, bias, mean, rstd)
    ctx.num_groups, ctx.relu = num_groups, relu
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _add_backward(ctx, call, grad_sum, grad_y, _grad_mean, _grad_rstd):
    s, weight, bias, mean, rstd = ctx.saved_tensors
    fmt = memory_format(s)
    if grad_sum is not None:
        grad_sum = grad_sum.contiguous(memory_format=fmt)
    if grad_y is None:  # only the sum was used: y contributes nothing
        grad_y = torch.zeros_like(s, memory_format=fmt)
    grad_y = grad_y.contiguous(memory_format=fmt)
    grad_in, dw, db = call("group_norm_relu_add_bwd", grad_y, grad_sum, s, weight, bias, mean, rstd, ctx.num_groups,
                           ctx.relu)
    return grad_in, grad_in, (dw if ctx.has_weight else None), (db if ctx.has_bias else None), None, None, None


ADD_OP = _register.define_op(
    ADD_FAMILY, {op: SCHEMAS[op] for op in _ADD},
    fakes={"group_norm_relu_add_fwd": _add_fwd_fake, "group_norm_relu_add_bwd": _add_bwd_fake},
    references={"group_norm_relu_add_fwd": reference.group_norm_relu_add_forward,
                "group_norm_relu_add_bwd": reference.group_norm_relu_add_backward},
    forward="group_norm_relu_add_fwd", setup_context=_add_setup_context, backward=_add_backward,
    materialize_grads=False, triton_module="group_norm_relu",
)


def group_norm_relu_add(
    a: torch.Tensor,
    b: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    relu: bool = True,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum ``s = a + b`` and ``relu(group_norm(s, num_groups, weight, bias,
    eps))``, computed together in one pass over ``a`` and ``b``.

    This is the joint of two pre-activation units: ``a`` is a unit's last conv output,
    ``b`` its shortcut, ``s`` the residual stream (the next unit's shortcut) and ``y`` the
    next unit's pre-activation.

    Args:
        a, b: (N, C, H, W) tensors of the same shape, dtype, device and memory format
            (NCHW or channels_last, by the rule of ``bitfast.ops.reference.memory_format``);
            no broadcasting. float16/bfloat16/float32/float64.
        num_groups: number of groups; must divide C (BiT: 32).
        weight, bias: optional per-channel affine parameters, shape (C,), any float dtype.
        eps: added to the biased variance inside the square root.
        relu: apply the ReLU (``False`` gives plain GroupNorm of the sum).
        backend: force a backend (see ``bitfast.backends``); default: auto.

    Returns:
        ``(s, y)``, both of ``a``'s shape, dtype and memory format. ``s`` equals ``a + b``
        (rounded to the dtype as ``a + b`` is). Both are differentiable: gradients flow to
        ``a``, ``b``, ``weight`` and ``bias`` from ``s`` and from ``y``.
    """
    fn = "group_norm_relu_add"
    checks.tensor(fn, "a", a)
    checks.tensor(fn, "b", b)
    _check_args(fn, "a", a, num_groups, weight, bias, eps, relu)
    if b.shape != a.shape:
        raise ValueError(
            f"{fn}: b has shape {tuple(b.shape)} but a has shape {tuple(a.shape)}; expected equal shapes "
            f"(no broadcasting)"
        )
    if b.dtype != a.dtype:
        raise TypeError(f"{fn}: b has dtype {b.dtype} but a has dtype {a.dtype}; expected equal dtypes")
    if b.device != a.device:
        raise ValueError(f"{fn}: b is on {b.device} but a is on {a.device}; expected the same device")
    fmt = memory_format(a)
    if memory_format(b) != fmt:
        def _name(f):
            return "channels_last" if f == torch.channels_last else "contiguous (NCHW)"

        raise ValueError(
            f"{fn}: b is laid out {_name(memory_format(b))} but a is {_name(fmt)}; expected the same memory format"
        )
    name = backends.resolve(ADD_FAMILY, a.device.type, a.dtype, backend)
    if name == "reference":
        # No fused kernel serves these inputs (or the reference was asked for): add, then
        # GroupNorm+ReLU on the backend it would get on its own (the reference composite
        # when that was requested), so the unfused path is never slower than before.
        s = (a + b).contiguous(memory_format=fmt)
        return s, group_norm_relu(s, num_groups, weight, bias, eps, relu, backend=backend)
    a = a.contiguous(memory_format=fmt)
    b = b.contiguous(memory_format=fmt)
    s, y, _mean, _rstd = ADD_OP(name, a, b, weight, bias, num_groups, float(eps), relu)
    return s, y
