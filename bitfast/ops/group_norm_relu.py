"""GroupNorm (Wu & He, 2018) fused with the ReLU that follows it in every BiT unit.

Statistics per (sample, group) in float32 with biased variance and eps inside the square
root, as ``F.group_norm``; NCHW and channels_last inputs, the output in the input's
memory format and dtype. The backward recomputes the normalized value and the ReLU mask
from ``x`` and the saved (N, G) statistics, so autograd keeps nothing else.
"""

from __future__ import annotations

import torch

from bitfast import backends
from bitfast.ops import _checks, _library, _register, reference
from bitfast.ops.reference import memory_format, stat_dtype

FAMILY = "group_norm_relu"

backends.register_family(
    FAMILY, ("group_norm_relu_fwd", "group_norm_relu_bwd"), triton_module="group_norm_relu"
)


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


_register.register("group_norm_relu_fwd", _fwd_fake)
_register.register("group_norm_relu_bwd", _bwd_fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, _eps, relu, backend = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.relu, ctx.backend = num_groups, relu, backend
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    grad_y = grad_y.contiguous(memory_format=memory_format(x))
    dx, dw, db = torch.ops.bitfast.group_norm_relu_bwd(
        grad_y, x, weight, bias, mean, rstd, ctx.num_groups, ctx.relu, ctx.backend
    )
    return dx, (dw if ctx.has_weight else None), (db if ctx.has_bias else None), None, None, None, None


torch.library.register_autograd(
    _library.qualname("group_norm_relu_fwd"), _backward, setup_context=_setup_context, lib=_library.lib
)


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
    fn = "group_norm_relu"
    _checks.tensor(fn, "x", x)
    _checks.floating(fn, "x", x)
    _checks.ndim(fn, "x", x, 4, "(N, C, H, W)")
    _checks.positive_int(fn, "num_groups", num_groups)
    c = x.shape[1]
    if c % num_groups:
        raise ValueError(f"{fn}: x has {c} channels, not divisible by num_groups={num_groups}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: x has shape {tuple(x.shape)} with no elements; expected a non-empty input")
    if x.numel() // (x.shape[0] * num_groups) < 2:
        raise ValueError(
            f"{fn}: each group of x (shape {tuple(x.shape)}, num_groups={num_groups}) has a single "
            f"element; expected more than 1 value per group, as F.group_norm does"
        )
    _checks.channel_vector(fn, "weight", weight, c, x)
    _checks.channel_vector(fn, "bias", bias, c, x)
    _checks.non_negative(fn, "eps", eps)
    if not isinstance(relu, bool):
        raise TypeError(f"{fn}: relu must be a bool; got {type(relu).__name__}")
    name = backends.resolve(FAMILY, x.device.type, x.dtype, backend)
    if name == "reference":
        return reference.group_norm_relu(x, num_groups, weight, bias, eps, relu)
    x = x.contiguous(memory_format=memory_format(x))
    return torch.ops.bitfast.group_norm_relu_fwd(x, weight, bias, num_groups, float(eps), relu, name)[0]
