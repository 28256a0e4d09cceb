"""Weight standardization (Qiao et al., 2019, as used by BiT) and the standardized conv.

``w_hat = (w - mean) / sqrt(var + eps)`` per output channel over (Cin, kh, kw), biased
variance, eps inside the square root, recomputed from the raw weight on every forward
and always in float32 (1e-8 and 1e-10 round to zero in half precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitfast import backends
from bitfast.ops import _library, _register, checks, reference

__all__ = ["std_conv2d", "weight_standardize", "weight_standardize_multi"]

FAMILY = "weight_standardize"

MULTI_FAMILY = "weight_standardize_multi"

SCHEMAS = {
    "weight_standardize_fwd": "(Tensor w, float eps) -> (Tensor out, Tensor mean, Tensor rstd)",
    "weight_standardize_bwd": "(Tensor grad_out, Tensor w, Tensor mean, Tensor rstd) -> Tensor",
    "weight_standardize_multi_fwd": (
        "(Tensor[] ws, float eps, ScalarType? out_dtype) -> (Tensor[] out, Tensor mean, Tensor rstd)"
    ),
    "weight_standardize_multi_bwd": "(Tensor[] grad_outs, Tensor[] ws, Tensor mean, Tensor rstd) -> Tensor[]",
}
_SINGLE = ("weight_standardize_fwd", "weight_standardize_bwd")
_MULTI = ("weight_standardize_multi_fwd", "weight_standardize_multi_bwd")


def _fwd_fake(w, eps):
    torch._check(w.dim() >= 2, lambda: f"weight_standardize: w has {w.dim()} dims; expected (O, ...)")
    sd = reference.stat_dtype(w.dtype)
    o = w.shape[0]
    fmt = reference.memory_format(w)
    return torch.empty_like(w, memory_format=fmt), w.new_empty(o, dtype=sd), w.new_empty(o, dtype=sd)


def _bwd_fake(grad_out, w, mean, rstd):
    torch._check(grad_out.shape == w.shape, lambda: "weight_standardize_bwd: grad_out and w shapes differ")
    return torch.empty_like(w, memory_format=reference.memory_format(w))


def _setup_context(ctx, inputs, output):
    w, _eps = inputs
    _out, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(w, mean, rstd)


def _backward(ctx, call, grad_out, _grad_mean, _grad_rstd):
    w, mean, rstd = ctx.saved_tensors
    return call("weight_standardize_bwd", grad_out, w, mean, rstd), None


OP = _register.define_op(
    FAMILY, {k: SCHEMAS[k] for k in _SINGLE},
    fakes={"weight_standardize_fwd": _fwd_fake, "weight_standardize_bwd": _bwd_fake},
    references={"weight_standardize_fwd": reference.weight_standardize_forward,
                "weight_standardize_bwd": reference.weight_standardize_backward},
    forward="weight_standardize_fwd", setup_context=_setup_context, backward=_backward,
    triton_module="weight_std",
)


def _multi_fwd_fake(ws, eps, out_dtype):
    torch._check(len(ws) > 0, lambda: "weight_standardize_multi: ws is empty")
    sd = reference.stat_dtype(ws[0].dtype)
    rows = sum(w.shape[0] for w in ws)
    outs = [torch.empty_like(w, dtype=out_dtype or w.dtype, memory_format=reference.memory_format(w)) for w in ws]
    return outs, ws[0].new_empty(rows, dtype=sd), ws[0].new_empty(rows, dtype=sd)


def _multi_bwd_fake(grad_outs, ws, mean, rstd):
    return [torch.empty_like(w, memory_format=reference.memory_format(w)) for w in ws]


def _multi_setup_context(ctx, inputs, output):
    ws, _eps, _out_dtype = inputs
    _outs, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(*ws, mean, rstd)


def _multi_backward(ctx, call, grad_outs, _grad_mean, _grad_rstd):
    *ws, mean, rstd = ctx.saved_tensors
    # An output that took no part in the loss has no gradient: its weight gets zeros.
    grads = [g if g is not None else torch.zeros_like(w) for g, w in zip(grad_outs, ws)]
    return call("weight_standardize_multi_bwd", grads, ws, mean, rstd), None, None


MULTI_OP = _register.define_op(
    MULTI_FAMILY, {k: SCHEMAS[k] for k in _MULTI},
    fakes={"weight_standardize_multi_fwd": _multi_fwd_fake, "weight_standardize_multi_bwd": _multi_bwd_fake},
    references={"weight_standardize_multi_fwd": reference.weight_standardize_multi_forward,
                "weight_standardize_multi_bwd": reference.weight_standardize_multi_backward},
    forward="weight_standardize_multi_fwd", setup_context=_multi_setup_context, backward=_multi_backward,
    triton_module="weight_std",
)


def _standardize(w: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    # the standardized weight from a non-reference backend
    return OP(backend, w, eps)[0]


def _check_weight(fn: str, w, eps) -> None:
    checks.tensor(fn, "w", w)
    checks.floating(fn, "w", w)
    if w.dim() < 2:
        raise ValueError(f"{fn}: w has {w.dim()} dims (shape {tuple(w.shape)}); expected (O, ...) with >= 2 dims")
    if w.numel() == 0:
        raise ValueError(f"{fn}: w has shape {tuple(w.shape)} with no elements; expected a non-empty weight")
    checks.non_negative(fn, "eps", eps)


def weight_standardize(w: torch.Tensor, eps: float = 1e-8, *, backend: str | None = None) -> torch.Tensor:
    """Standardize a conv weight per output channel: ``(w - mean) / sqrt(var + eps)``.

    Args:
        w: weight of shape (O, Cin/groups, kh, kw) (any shape with >= 2 dims), any
            floating dtype; statistics are computed in float32 whatever its dtype.
        eps: added to the biased variance inside the square root (bitfast and timm's BiT
            models: 1e-8; the authors' release: 1e-10).
        backend: force a backend (see ``bitfast.backends``); default: auto.

    Returns:
        The standardized weight in ``w``'s dtype and memory format: channels_last when
        ``w`` is (a model moved to channels_last has such weights; the convolution then
        takes them without a copy), else contiguous. Differentiable; the gradient comes
        back in the same format.
    """
    _check_weight("weight_standardize", w, eps)
    name = backends.resolve(FAMILY, w.device.type, w.dtype, backend)
    if name == "reference":
        return reference.weight_standardize(w, eps)
    return _standardize(w, float(eps), name)


def weight_standardize_multi(ws, eps: float = 1e-8, *, out_dtype: torch.dtype | None = None,
                             backend: str | None = None) -> list[torch.Tensor]:
    """``[weight_standardize(w, eps) for w in ws]`` in one call of one kernel (on the ``cpp``
    backend: one parallel region over every output channel of every weight).

    Args:
        ws: a non-empty list (or tuple) of weights, each as ``weight_standardize`` takes, all
            of one floating dtype and on one device.
        eps: as in ``weight_standardize``.
        out_dtype: the dtype of the standardized weights (default: each weight's). Under
            autocast a float32 model's convolutions need bfloat16 or float16 weights: asking
            for them here writes them directly (on Triton; the C++ kernel converts its float32
            result), saving the cast per conv and its backward. Gradients come back in the
            weights' dtype.
        backend: force a backend; default: auto. Backends without a kernel for the list op
            (today ``cuda``) are skipped by auto, and forcing one raises.

    Returns:
        The standardized weights, each in its weight's memory format, equal to
        ``weight_standardize(w, eps).to(out_dtype)`` bit for bit on the reference and C++
        backends (same row arithmetic) and within the parity rule on Triton (one tile size
        for the whole list, so its sums may be ordered otherwise); differentiable with respect to every weight.
    """
    fn = "weight_standardize_multi"
    if not isinstance(ws, (list, tuple)) or not ws:
        raise ValueError(f"{fn}: ws must be a non-empty list of weights; got {ws!r:.80}")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise ValueError(f"{fn}: out_dtype must be a floating torch.dtype or None; got {out_dtype!r}")
    for i, w in enumerate(ws):
        _check_weight(f"{fn}: ws[{i}]", w, eps)
        if w.dtype != ws[0].dtype or w.device != ws[0].device:
            raise ValueError(f"{fn}: ws[{i}] is {w.dtype} on {w.device} but ws[0] is {ws[0].dtype} on {ws[0].device}; "
                             "expected one dtype and device")
    name = backends.resolve(MULTI_FAMILY, ws[0].device.type, ws[0].dtype, backend)
    if name == "reference":
        return [reference.weight_standardize(w, eps) if out_dtype is None else reference.weight_standardize(w, eps).to(out_dtype)
                for w in ws]
    return list(MULTI_OP(name, list(ws), float(eps), out_dtype)[0])


def _std_conv2d_composite(x, weight, bias, stride, padding, dilation, groups, eps, backend):
    w_hat = torch.ops.bitfast.weight_standardize_fwd(weight, eps, backend)[0]
    return F.conv2d(x, w_hat, bias, stride, padding, dilation, groups)


# std_conv2d is a composite of weight_standardize_fwd and aten's convolution: autograd,
# fakes and compilation all flow through its decomposition.
_library.lib.define(
    "std_conv2d(Tensor x, Tensor weight, Tensor? bias, SymInt[2] stride, SymInt[2] padding,"
    " SymInt[2] dilation, SymInt groups, float eps, str backend) -> Tensor"
)
_library.lib.impl("std_conv2d", _std_conv2d_composite, "CompositeImplicitAutograd")


def std_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    eps: float = 1e-8,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, weight_standardize(weight, eps), bias, ...)``: BiT's StdConv2d.

    Args:
        x: input (N, Cin, H, W), NCHW or channels_last.
        weight: raw (unstandardized) weight (Cout, Cin/groups, kh, kw).
        bias: optional (Cout,) bias.
        stride, padding, dilation: ints or pairs of ints, as in ``F.conv2d``.
        groups: number of blocked connections from input to output channels.
        eps: weight-standardization eps (see ``weight_standardize``).
        backend: force the weight-standardization backend; default: auto.
    """
    fn = "std_conv2d"
    checks.tensor(fn, "x", x)
    checks.floating(fn, "x", x)
    checks.ndim(fn, "x", x, 4, "(N, C, H, W)")
    _check_weight(fn, weight, eps)
    if weight.dim() != 4:
        raise ValueError(f"{fn}: weight has {weight.dim()} dims; expected (Cout, Cin/groups, kh, kw)")
    checks.positive_int(fn, "groups", groups)
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"{fn}: x has {x.shape[1]} channels but weight expects {weight.shape[1] * groups} "
            f"(weight.shape[1]={weight.shape[1]} x groups={groups})"
        )
    checks.tensor(fn, "bias", bias, optional=True)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{fn}: bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    stride, padding, dilation = (list(checks.int_pair(fn, n, v)) for n, v in (("stride", stride), ("padding", padding), ("dilation", dilation)))
    name = backends.resolve(FAMILY, weight.device.type, weight.dtype, backend)
    if name == "reference":
        return reference.std_conv2d(x, weight, bias, stride, padding, dilation, groups, eps)
    if _register.eager(x, weight, bias):
        return F.conv2d(x, _standardize(weight, float(eps), name), bias, stride, padding, dilation, groups)
    return torch.ops.bitfast.std_conv2d(x, weight, bias, stride, padding, dilation, groups, float(eps), name)
