"""Case builders and checks of the native backends (``cpp`` on the CPU, ``cuda`` on a GPU).

Used by the per-op files, whose native-op tests run on both native backends
(``tests/ops/_util.native_backends``): tests/ops/test_weight_std.py, test_sgd_momentum.py,
test_group_norm_relu.py and test_batch_norm_relu.py; and by the backend files, which hold
what only one backend has: test_cpp_backend.py, test_cuda_backend.py and
test_cuda_backend_norms.py. The error checks (check_errors, check_cuda_errors,
check_norm_errors) and short_row_backward_outputs also run in child processes
(``run_in_child``, and tools/gpu_check.sh), so they live here, in a helper module.

The checks compare the native ops (``torch.ops.bitfast.native_*``) and the public API with a
native backend against the spec in ``bitfast.ops.reference``, evaluated in float64, with
PyTorch's own math in the same dtype as the error baseline (the tolerance rule of
tests/ops/_util.py). They take a device and a backend, so every backend runs the same
cases.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

import bitfast
from bitfast import backends
from bitfast.ops import reference
from tests.ops._util import assert_parity

ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
EPS = 1e-8


# (shape, label): minimal, BiT stem, projection, odd sizes, a row beyond a vector length
WS_SHAPES = [
    ((1, 1, 1, 1), "minimal"),
    ((64, 3, 7, 7), "stem"),
    ((256, 64, 1, 1), "projection"),
    ((7, 5, 3, 3), "odd"),
    ((3, 4609), "long-row-2d"),
]


SGD_OPTIONS = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
    for m, d, wd, n, mx in itertools.product((0.0, 0.9), (0.0, 0.1), (0.0, 1e-2), (False, True), (False, True))
    if not (n and (m == 0 or d != 0))
]


def require(backend: str, family: str, device: str, dtype: torch.dtype = torch.float32) -> None:
    """Skip, saying why, when ``backend`` cannot serve ``family`` here."""
    reasons = backends.not_supported_reasons(backend, family, device, dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def layouts(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as ``w`` in several layouts: contiguous, transposed storage,
    channels_last (4-d), and a strided slice of a larger tensor."""
    out = {"contiguous": w.contiguous(), "transposed": w.transpose(0, 1).contiguous().transpose(0, 1)}
    if w.dim() == 4:
        out["channels_last"] = w.contiguous(memory_format=torch.channels_last)
    wide = torch.zeros(*w.shape[:-1], 2 * w.shape[-1], dtype=w.dtype, device=w.device)
    wide[..., ::2] = w
    out["sliced"] = wide[..., ::2]
    return out


def random_weight(shape, dtype, device) -> torch.Tensor:
    # an offset and a small spread, as trained conv weights: the mean matters
    return (torch.randn(shape, device=device) * 0.05 + 0.01).to(dtype)


def check_ws_native(w: torch.Tensor, grad: torch.Tensor, eps: float = EPS) -> None:
    """native_weight_standardize_fwd/bwd on ``w`` (and ``grad``) against the float64
    reference, with the reference in ``w``'s dtype as the error baseline."""
    dtype = w.dtype
    sd = stat_dtype(dtype)
    fmt = reference.memory_format(w)
    out, mean, rstd = torch.ops.bitfast.native_weight_standardize_fwd(w, eps)
    assert out.dtype == dtype and out.shape == w.shape and out.is_contiguous(memory_format=fmt)
    assert mean.dtype == sd and rstd.dtype == sd and mean.shape == rstd.shape == (w.shape[0],)
    assert out.device == mean.device == w.device
    out64, mean64, rstd64 = reference.weight_standardize_forward(w.double(), eps)
    out_b, mean_b, rstd_b = reference.weight_standardize_forward(w, eps)
    assert_parity(out, out64, out_b, dtype, "forward out")
    assert_parity(mean, mean64, mean_b, sd, "forward mean")
    assert_parity(rstd, rstd64, rstd_b, sd, "forward rstd")

    dw = torch.ops.bitfast.native_weight_standardize_bwd(grad, w, mean, rstd)
    assert dw.dtype == dtype and dw.shape == w.shape and dw.is_contiguous(memory_format=fmt)
    dw64 = reference.weight_standardize_backward(grad.double(), w.double(), mean64, rstd64)
    dw_b = reference.weight_standardize_backward(grad, w, mean_b, rstd_b)
    assert_parity(dw, dw64, dw_b, dtype, "backward")


def check_ws_autograd(w: torch.Tensor, backend: str, eps: float = EPS) -> None:
    """Gradients through ``bitfast.ops.weight_standardize(w, backend=...)`` against float64
    autograd through ``reference.weight_standardize``."""
    dtype = w.dtype
    w = w.detach().requires_grad_()
    fmt = reference.memory_format(w)
    y = bitfast.ops.weight_standardize(w, eps, backend=backend)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    g = torch.randn(y.shape, device=w.device).to(dtype)
    (gw,) = torch.autograd.grad(y, w, g)
    # in w's format, so that AccumulateGrad keeps it as the parameter's .grad without a copy
    assert gw.is_contiguous(memory_format=fmt)
    w64 = w.detach().double().requires_grad_()
    y64 = reference.weight_standardize(w64, eps)
    (gw64,) = torch.autograd.grad(y64, w64, g.double())
    wb = w.detach().clone().requires_grad_()
    yb = reference.weight_standardize(wb, eps)
    (gwb,) = torch.autograd.grad(yb, wb, g)
    assert_parity(y, y64.detach(), yb.detach(), dtype, f"{backend} forward")
    assert_parity(gw, gw64, gwb, dtype, f"{backend} backward")


def check_sgd(
    shapes, dtype, device, backend, opts, steps=8, native=False, make=None, lr_tensor=False, ema_dtype=None,
) -> None:
    """``steps`` SGD steps on ``backend`` (through the native op when ``native``) against
    float64 steps of the reference, with the reference in ``dtype`` as the error baseline.
    ``make(shape, dtype, device)`` builds each param/grad/buffer (layout tests). With
    ``lr_tensor`` the learning rate is a float32 tensor on ``device`` (written in place at
    the schedule change); with ``ema_dtype`` the step also updates a moving average of the
    params in that dtype (built by ``make`` too), checked like the params."""
    make = make or (lambda s, dt, dev: torch.randn(s, device=dev).to(dt))
    params = [make(s, dtype, device) for s in shapes]
    momentum = opts["momentum"]
    bufs = [make(s, dtype, device) for s in shapes] if momentum else []
    emas = [make(s, ema_dtype, device) for s in shapes] if ema_dtype is not None else []
    decay = 0.75 if emas else 0.0
    p64 = [p.double() for p in params]
    b64 = [b.double() for b in bufs]
    e64 = [e.double() for e in emas]
    pb = [p.clone() for p in params]
    bb = [b.clone() for b in bufs]
    eb = [e.clone() for e in emas]
    ids = [(t.data_ptr(), t.stride()) for t in params + emas]
    lr_t = torch.tensor(0.05, device=device) if lr_tensor else None
    for step in range(steps):
        lr = 0.05 if step < steps // 2 else 0.01  # a schedule change mid-run
        if lr_t is not None:
            lr_t.fill_(lr)
            lr = float(lr_t)  # the float32 value, for the reference
        grads = [make(s, dtype, device) for s in shapes]
        args = (lr, momentum, opts["dampening"], opts["weight_decay"], opts["nesterov"], opts["maximize"], step == 0)
        if native:
            torch.ops.bitfast.native_sgd_momentum_(
                params, grads, bufs, 0.0 if lr_tensor else lr, *args[1:], lr_t, emas, decay
            )
        else:
            bitfast.ops.sgd_momentum_(
                params, grads, bufs, lr=lr_t if lr_tensor else lr, momentum=momentum, dampening=opts["dampening"],
                weight_decay=opts["weight_decay"], nesterov=opts["nesterov"], maximize=opts["maximize"],
                is_first_step=step == 0, ema_params=emas, ema_decay=decay, backend=backend,
            )
        reference.sgd_momentum_(p64, [g.double() for g in grads], b64, *args, None, e64, decay)
        reference.sgd_momentum_(pb, grads, bb, *args, None, eb, decay)
    # updated in place: same storage, same strides
    assert [(t.data_ptr(), t.stride()) for t in params + emas] == ids
    for i, (a, r, b) in enumerate(zip(params, p64, pb)):
        assert_parity(a, r, b, dtype, f"param {i} {tuple(a.shape)}")
    for i, (a, r, b) in enumerate(zip(bufs, b64, bb)):
        assert_parity(a, r, b, dtype, f"momentum buffer {i} {tuple(a.shape)}")
    for i, (a, r, b) in enumerate(zip(emas, e64, eb)):
        assert_parity(a, r, b, dtype, f"average {i} {tuple(a.shape)}")


def check_sgd_matches_torch_optim(device, backend, opts, steps=6) -> None:
    """The backend's steps against torch.optim.SGD itself (fp32, several param groups'
    worth of tensors, the buffers initialised on the first step)."""
    shapes = [(64, 3, 7, 7), (256,), (33, 17)]
    params = [torch.randn(s, device=device) for s in shapes]
    torch_params = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(torch_params, lr=0.1, foreach=False, **opts)
    bufs = [torch.zeros_like(p) for p in params] if opts["momentum"] else []
    for step in range(steps):
        grads = [torch.randn(s, device=device) for s in shapes]
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        opt.step()
        bitfast.ops.sgd_momentum_(params, grads, bufs, lr=0.1, is_first_step=step == 0, backend=backend, **opts)
    for a, b in zip(params, torch_params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(bufs, torch_params):
        torch.testing.assert_close(a, opt.state[b]["momentum_buffer"], rtol=1e-5, atol=1e-6)


def make_strided(kind: str):
    """A ``make`` for check_sgd building tensors of the layout ``kind``."""

    def make(shape, dtype, device):
        x = torch.randn(shape, device=device).to(dtype)
        if kind == "transposed":
            return x.transpose(0, -1).contiguous().transpose(0, -1)
        if kind == "channels_last" and len(shape) == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if kind == "sliced":
            wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
            wide[..., ::2] = x
            return wide[..., ::2]
        if kind == "offset":  # storage offset of one element: unaligned vectors
            flat = torch.zeros(x.numel() + 1, dtype=dtype, device=device)
            flat[1:] = x.reshape(-1)
            return flat[1:].view(shape)
        return x

    return make


# (shape, num_groups, label): minimal, one group, groups == channels, odd sizes, BiT shapes
GN_SHAPES = [
    ((1, 2, 1, 2), 1, "minimal"),
    ((2, 6, 5, 3), 1, "one-group"),
    ((2, 12, 3, 5), 12, "groups==channels"),
    ((3, 40, 7, 9), 8, "odd"),
    ((2, 64, 14, 14), 32, "bit-C64"),
    ((2, 2048, 4, 4), 32, "bit-final-4x4"),
    ((1, 512, 7, 7), 32, "bit-7x7"),
    ((2, 32, 16, 16), 2, "wide-groups-16x16"),
    ((2, 96, 4, 8), 4, "short-rows"),
    ((1, 192, 5, 7), 8, "24-channel-groups"),
    ((1, 32, 33, 33), 2, "rows-over-one-chunk"),
]


# (shape, label)
BN_SHAPES = [
    ((2, 1, 2, 1), "minimal"),
    ((3, 5, 7, 3), "odd"),
    ((4, 64, 14, 14), "bit-C64"),
    ((2, 512, 7, 7), "bit-late"),
    ((17, 8, 4, 4), "many-samples-4x4"),
    ((80, 3, 4, 4), "rows-over-one-chunk-4x4"),
]


NORM_LAYOUTS = ["nchw", "channels_last", "non_contiguous"]


def make_activation(shape, dtype, layout, device) -> torch.Tensor:
    """Activations with an offset and a spread (the mean matters) in ``layout``: NCHW,
    channels_last, or H and W swapped in memory (neither of the two)."""
    x = (torch.randn(shape, device=device) * 1.5 + 0.3).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "non_contiguous":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


def _f64(t):
    return None if t is None else t.double()


def check_gn_native(x, weight, bias, groups, relu, eps=1e-5) -> None:
    """native_group_norm_relu_fwd/bwd against the float64 reference, with the reference in
    x's dtype as the error baseline."""
    dtype, sd = x.dtype, stat_dtype(x.dtype)
    n, c = x.shape[:2]
    y, mean, rstd = torch.ops.bitfast.native_group_norm_relu_fwd(x, weight, bias, groups, eps, relu)
    fmt = reference.memory_format(x)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(memory_format=fmt)
    assert mean.dtype == rstd.dtype == sd and mean.shape == rstd.shape == (n, groups)
    y64, mean64, rstd64 = reference.group_norm_relu_forward(x.double(), _f64(weight), _f64(bias), groups, eps, relu)
    yb, mean_b, rstd_b = reference.group_norm_relu_forward(x, weight, bias, groups, eps, relu)
    assert_parity(y, y64, yb, dtype, "forward y")
    assert_parity(mean, mean64, mean_b, sd, "forward mean")
    assert_parity(rstd, rstd64, rstd_b, sd, "forward rstd")

    g = torch.randn(x.shape, device=x.device).to(dtype).contiguous(memory_format=fmt)
    dx, dw, db = torch.ops.bitfast.native_group_norm_relu_bwd(g, x, weight, bias, mean, rstd, groups, relu)
    pdtype = weight.dtype if weight is not None else torch.float32
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=fmt)
    assert dw.dtype == db.dtype == pdtype and dw.shape == db.shape == (c,)
    ref64 = reference.group_norm_relu_backward(
        g.double(), x.double(), _f64(weight), _f64(bias), mean64, rstd64, groups, relu
    )
    base = reference.group_norm_relu_backward(g, x, weight, bias, mean_b, rstd_b, groups, relu)
    for name, a, r, b in zip(("grad_x", "grad_weight", "grad_bias"), (dx, dw, db), ref64, base):
        assert_parity(a, r, b, dtype, name)


def check_bn_native(x, running_mean, running_var, weight, bias, training, relu, eps=1e-5) -> None:
    """native_batch_norm_relu_fwd/bwd against the float64 reference; the running
    statistics are read, never written."""
    dtype, sd = x.dtype, stat_dtype(x.dtype)
    c = x.shape[1]
    saved = [None if t is None else t.clone() for t in (running_mean, running_var)]
    y, mean, var = torch.ops.bitfast.native_batch_norm_relu_fwd(
        x, running_mean, running_var, weight, bias, training, eps, relu
    )
    for t, t0 in zip((running_mean, running_var), saved):
        assert t is None or torch.equal(t, t0), "the forward must not touch the running statistics"
    if not training:
        assert mean.data_ptr() != running_mean.data_ptr() and var.data_ptr() != running_var.data_ptr()
    fmt = reference.memory_format(x)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(memory_format=fmt)
    assert mean.dtype == var.dtype == sd and mean.shape == var.shape == (c,)
    args64 = (_f64(running_mean), _f64(running_var), _f64(weight), _f64(bias), training, eps, relu)
    y64, mean64, var64 = reference.batch_norm_relu_forward(x.double(), *args64)
    yb, mean_b, var_b = reference.batch_norm_relu_forward(
        x, running_mean, running_var, weight, bias, training, eps, relu
    )
    assert_parity(y, y64, yb, dtype, "forward y")
    assert_parity(mean, mean64, mean_b, sd, "forward mean")
    assert_parity(var, var64, var_b, sd, "forward var")

    g = torch.randn(x.shape, device=x.device).to(dtype).contiguous(memory_format=fmt)
    dx, dw, db = torch.ops.bitfast.native_batch_norm_relu_bwd(g, x, weight, bias, mean, var, training, eps, relu)
    pdtype = weight.dtype if weight is not None else torch.float32
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=fmt)
    assert dw.dtype == db.dtype == pdtype and dw.shape == db.shape == (c,)
    ref64 = reference.batch_norm_relu_backward(
        g.double(), x.double(), _f64(weight), _f64(bias), mean64, var64, training, eps, relu
    )
    base = reference.batch_norm_relu_backward(g, x, weight, bias, mean_b, var_b, training, eps, relu)
    for name, a, r, b in zip(("grad_x", "grad_weight", "grad_bias"), (dx, dw, db), ref64, base):
        assert_parity(a, r, b, dtype, name)


def check_bn_update_stats(device, dtype=torch.float32) -> None:
    """native_batch_norm_update_stats_ against the reference update, in place."""
    c = 7
    mean, var = torch.randn(c, device=device, dtype=stat_dtype(dtype)), torch.rand(c, device=device) + 0.5
    var = var.to(stat_dtype(dtype))
    for count in (1, 2, 75):
        rm, rv = torch.randn(c, device=device).to(dtype), (torch.rand(c, device=device) + 0.5).to(dtype)
        rm_ref, rv_ref = rm.clone(), rv.clone()
        ptrs = (rm.data_ptr(), rv.data_ptr())
        torch.ops.bitfast.native_batch_norm_update_stats_(rm, rv, mean, var, 0.1, count)
        reference.batch_norm_update_stats_(rm_ref, rv_ref, mean, var, 0.1, count)
        assert (rm.data_ptr(), rv.data_ptr()) == ptrs
        # Exact in fp32/fp64 on CPU. On CUDA within a rounding: the kernel and ATen's tensor
        # ops (mul_, add_(alpha=)) need not contract the multiply-add alike (an H100 run
        # differed by one ulp in 2 of 7 channels). Half-precision buffers may round the
        # last bit differently.
        low = dtype in (torch.float16, torch.bfloat16)
        eps = torch.finfo(dtype).eps
        if low:
            tol = dict(rtol=1e-2, atol=1e-3)
        elif torch.device(device).type == "cuda":
            tol = dict(rtol=eps, atol=4 * eps)
        else:
            tol = dict(rtol=0, atol=0)
        torch.testing.assert_close(rm, rm_ref, **tol)
        torch.testing.assert_close(rv, rv_ref, **tol)


def norm_params(c, device, dtype=torch.float32, affine=True):
    if not affine:
        return None, None
    return (torch.randn(c, device=device) * 0.5 + 1.0).to(dtype), (torch.randn(c, device=device) * 0.5).to(dtype)


def opcheck_ws(device: str, layout: str, dtype: torch.dtype = torch.float32) -> None:
    w = layouts(random_weight((8, 4, 3, 3), dtype, device))[layout]
    torch.library.opcheck(torch.ops.bitfast.native_weight_standardize_fwd.default, (w, EPS))
    _, mean, rstd = torch.ops.bitfast.native_weight_standardize_fwd(w, EPS)
    g = layouts(torch.randn(8, 4, 3, 3, device=device).to(dtype))[layout]
    torch.library.opcheck(torch.ops.bitfast.native_weight_standardize_bwd.default, (g, w, mean, rstd))


def opcheck_sgd(device: str, non_contiguous: bool, momentum: float, lr_tensor_and_ema: bool = False) -> None:
    make = make_strided("transposed" if non_contiguous else "contiguous")
    shapes = [(6, 5), (64, 3, 7, 7)]
    dtype = torch.bfloat16 if lr_tensor_and_ema else torch.float32
    params = [make(s, dtype, device) for s in shapes]
    grads = [make(s, dtype, device) for s in shapes]
    bufs = [make(s, dtype, device) for s in shapes] if momentum else []
    lr_t = torch.tensor(0.1, device=device) if lr_tensor_and_ema else None
    emas = [make(s, torch.float32, device) for s in shapes] if lr_tensor_and_ema else []
    torch.library.opcheck(
        torch.ops.bitfast.native_sgd_momentum_.default,
        (params, grads, bufs, 0.1, momentum, 0.0, 1e-4, False, False, False, lr_t, emas, 0.9 if emas else 0.0),
    )


def opcheck_norms(device: str, layout: str, dtype: torch.dtype = torch.float32) -> None:
    """opcheck of the native GroupNorm+ReLU and BatchNorm+ReLU ops (float32 parameters)."""
    x = make_activation((2, 8, 5, 5), dtype, layout, device)
    w, b = norm_params(8, device)
    g = torch.randn(x.shape, device=device).to(dtype)
    torch.library.opcheck(torch.ops.bitfast.native_group_norm_relu_fwd.default, (x, w, b, 4, 1e-5, True))
    _, mean, rstd = torch.ops.bitfast.native_group_norm_relu_fwd(x, w, b, 4, 1e-5, True)
    torch.library.opcheck(
        torch.ops.bitfast.native_group_norm_relu_bwd.default, (g, x, w, b, mean, rstd, 4, True)
    )
    torch.library.opcheck(torch.ops.bitfast.native_group_norm_relu_fwd.default, (x, None, None, 2, 1e-5, False))
    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    for training in (True, False):
        args = (x, rm, rv, w, b, training, 1e-5, True)
        torch.library.opcheck(torch.ops.bitfast.native_batch_norm_relu_fwd.default, args)
        _, mean, var = torch.ops.bitfast.native_batch_norm_relu_fwd(*args)
        torch.library.opcheck(
            torch.ops.bitfast.native_batch_norm_relu_bwd.default, (g, x, w, b, mean, var, training, 1e-5, True)
        )
    torch.library.opcheck(torch.ops.bitfast.native_batch_norm_update_stats_.default, (rm, rv, mean, var, 0.1, 50))


def check_norm_errors(device: str) -> None:
    """Bad calls of the native norm ops raise RuntimeErrors that say what was wrong."""
    gn_fwd, gn_bwd = torch.ops.bitfast.native_group_norm_relu_fwd, torch.ops.bitfast.native_group_norm_relu_bwd
    bn_fwd, bn_bwd = torch.ops.bitfast.native_batch_norm_relu_fwd, torch.ops.bitfast.native_batch_norm_relu_bwd
    update = torch.ops.bitfast.native_batch_norm_update_stats_
    add_fwd, add_bwd = torch.ops.bitfast.native_group_norm_relu_add_fwd, torch.ops.bitfast.native_group_norm_relu_add_bwd
    x = torch.randn(2, 6, 3, 3, device=device)
    w = torch.randn(6, device=device)
    _, mean, rstd = gn_fwd(x, w, w, 3, 1e-5, True)
    _, bmean, bvar = bn_fwd(x, None, None, w, w, True, 1e-5, True)
    rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
    cases = [
        (lambda: gn_fwd(torch.randn(2, 6, 3, device=device), None, None, 3, 1e-5, True), r"x has 3 dims"),
        (lambda: gn_fwd(x.int(), None, None, 3, 1e-5, True), r"expected Half, BFloat16, Float or Double"),
        (lambda: gn_fwd(x, None, None, 4, 1e-5, True), r"x has 6 channels, not divisible by num_groups=4"),
        (lambda: gn_fwd(x, None, None, 0, 1e-5, True), r"num_groups is 0; expected >= 1"),
        (lambda: gn_fwd(x, w[:5], None, 3, 1e-5, True), r"weight has shape \[5\]; expected \(6,\)"),
        (lambda: gn_fwd(x, None, w.int(), 3, 1e-5, True), r"bias has dtype Int"),
        (lambda: gn_bwd(x[:1], x, w, w, mean, rstd, 3, True), r"grad_y has shape .* expected equal shapes"),
        (lambda: gn_bwd(x.double(), x, w, w, mean, rstd, 3, True), r"expected equal dtypes"),
        (lambda: gn_bwd(x, x, w, w, mean[:, :2], rstd, 3, True), r"mean has shape \[2, 2\]; expected \[2, 3\]"),
        (lambda: gn_bwd(x, x, w, w, mean, rstd.double(), 3, True), r"rstd has dtype Double; expected Float"),
        (lambda: bn_fwd(x, None, None, w, w, False, 1e-5, True), r"running_mean and running_var are required"),
        (lambda: bn_fwd(x, rm[:4], rv, w, w, False, 1e-5, True), r"running_mean has shape \[4\]; expected \(6,\)"),
        (lambda: bn_bwd(x, x, w, w, bmean, bvar.double(), True, 1e-5, True), r"var has dtype Double; expected Float"),
        (lambda: bn_bwd(x, x, w, w, bmean[:2], bvar, True, 1e-5, True), r"mean has shape \[2\]; expected \[6\]"),
        (lambda: update(rm, rv, bmean[:2], bvar, 0.1, 18), r"mean has shape \[2\]; expected \(6,\) like running_mean"),
        (lambda: update(torch.zeros(1, device=device).expand(6), rv, bmean, bvar, 0.1, 18), r"share memory"),
        (lambda: add_fwd(x, x[:1], None, None, 3, 1e-5, True), r"native_group_norm_relu_add_fwd: b has shape"),
        (lambda: add_bwd(x, x[:1], x, None, None, mean, rstd, 3, True), r"native_group_norm_relu_add_bwd: grad_sum"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


def check_errors(device: str) -> None:
    """Bad calls of the native ops raise RuntimeErrors that say what was wrong."""
    ws_fwd, ws_bwd = torch.ops.bitfast.native_weight_standardize_fwd, torch.ops.bitfast.native_weight_standardize_bwd
    sgd = torch.ops.bitfast.native_sgd_momentum_
    w = torch.randn(4, 3, 3, 3, device=device)
    _, mean, rstd = ws_fwd(w, EPS)
    cases = [
        (lambda: ws_fwd(torch.randn(5, device=device), EPS), r"w has 1 dims"),
        (lambda: ws_fwd(torch.ones(2, 2, dtype=torch.int32, device=device), EPS), r"expected Half, BFloat16, Float"),
        (lambda: ws_bwd(torch.randn(4, 3, 3, 2, device=device), w, mean, rstd), r"expected equal shapes"),
        (lambda: ws_bwd(w.double(), w, mean, rstd), r"expected equal dtypes"),
        (lambda: ws_bwd(w, w, mean[:3], rstd), r"mean has shape \[3\]; expected \(4,\)"),
        (lambda: ws_bwd(w, w, mean, rstd.double()), r"rstd has dtype Double; expected Float"),
        (lambda: sgd([w], [], [], 0.1, 0.0, 0.0, 0.0, False, False, False, None, [], 0.0),
         r"got 1 params but 0 grads"),
        (lambda: sgd([w], [w.clone()], [], 0.1, 0.9, 0.0, 0.0, False, False, False, None, [], 0.0),
         r"needs one buffer per param"),
        (lambda: sgd([w], [w[:2].clone()], [], 0.1, 0.0, 0.0, 0.0, False, False, False, None, [], 0.0),
         r"grads\[0\] is Float"),
        (lambda: sgd([w, w.double()], [w, w.double()], [], 0.1, 0.0, 0.0, 0.0, False, False, False, None, [], 0.0),
         r"one dtype and device per call"),
        (lambda: sgd([torch.randn(1, device=device).expand(3)], [torch.randn(3, device=device)], [], 0.1, 0.0, 0.0,
                     0.0, False, False, False, None, [], 0.0), r"share memory"),
        (lambda: sgd([w], [w.clone()], [], 0.1, 0.0, 0.0, 0.0, False, False, False,
                     torch.tensor([0.1, 0.2], device=device), [], 0.0), r"lr_tensor is Float \[2\]"),
        (lambda: sgd([w], [w.clone()], [], 0.1, 0.0, 0.0, 0.0, False, False, False,
                     torch.tensor(0.1, dtype=torch.float64, device=device), [], 0.0), r"expected one Float element"),
        (lambda: sgd([w], [w.clone()], [], 0.1, 0.0, 0.0, 0.0, False, False, False, None, [w.clone(), w.clone()], 0.5),
         r"got 1 params but 2 ema_params"),
        (lambda: sgd([w], [w.clone()], [], 0.1, 0.0, 0.0, 0.0, False, False, False, None, [w.clone()], 1.0),
         r"ema_decay is 1; expected 0 <= ema_decay < 1"),
        (lambda: sgd([w], [w.clone()], [], 0.1, 0.0, 0.0, 0.0, False, False, False, None, [w.double()], 0.5),
         r"ema_params\[0\] is Double; expected Float for Float params"),
        (lambda: sgd([w], [w.clone()], [], 0.1, 0.0, 0.0, 0.0, False, False, False, None, [w[:2].clone()], 0.5),
         r"ema_params\[0\] is Float \[2, 3, 3, 3\]"),
        (lambda: sgd([w], [w.clone()], [], 0.1, 0.0, 0.0, 0.0, False, False, False, None, [w], 0.5),
         r"ema_params\[0\] shares memory with params\[0\]"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


def check_cuda_errors(device: str) -> None:
    """check_errors on CUDA, plus a list whose first tensor is on the GPU: it reaches the
    CUDA kernel, which checks the rest."""
    check_errors(device)
    p = [torch.randn(3, device=device), torch.randn(3)]
    with pytest.raises(RuntimeError, match=r"one dtype and device per call"):
        torch.ops.bitfast.native_sgd_momentum_(
            p, [t.clone() for t in p], [], 0.1, 0.0, 0.0, 0.0, False, False, False, None, [], 0.0
        )
    q = [torch.randn(3, device=device)]
    with pytest.raises(RuntimeError, match=r"lr_tensor is Float \[\] on cpu; expected one Float element on cuda"):
        torch.ops.bitfast.native_sgd_momentum_(
            q, [q[0].clone()], [], 0.1, 0.0, 0.0, 0.0, False, False, False, torch.tensor(0.1), [], 0.0
        )


def run_in_child(module: str, function: str, device: str) -> None:
    """Run ``<module>.<function>(device)`` in a child Python process (``module`` under
    the repository root, e.g. ``tests.ops._native_cases``).

    Used for the error paths of the native extensions: a crash while an extension raises
    (seen once: a segmentation fault on torch 2.11 with an H100, 2026-11-26) then fails
    this one test with the child's backtrace instead of ending the whole test run.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = f"import {module} as m; m.{function}({device!r})"
    child = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert child.returncode == 0, (
        f"{function}({device!r}) in a child process exited with {child.returncode}\n"
        f"stdout:\n{child.stdout[-4000:]}\nstderr:\n{child.stderr[-6000:]}"
    )


def short_row_backward_outputs(path: str) -> None:
    """Save the backward outputs of GroupNorm and BatchNorm at short NCHW rows (fp32 and
    bf16, with and without the ReLU) to ``path``: run in child processes by
    test_sums_in_registers_match_the_arrays."""
    torch.manual_seed(0)
    out = {}
    for dtype, relu in itertools.product((torch.float32, torch.bfloat16), (True, False)):
        for name, shape, c in (("gn", (2, 64, 7, 7), 64), ("bn", (17, 8, 4, 4), 8)):
            x = torch.randn(shape).to(dtype)
            w, b = torch.randn(c), torch.randn(c)
            if name == "gn":
                y, mean, rstd = torch.ops.bitfast.native_group_norm_relu_fwd(x, w, b, 2, 1e-5, relu)
                grads = torch.ops.bitfast.native_group_norm_relu_bwd(torch.randn_like(y), x, w, b, mean, rstd, 2, relu)
            else:
                y, mean, var = torch.ops.bitfast.native_batch_norm_relu_fwd(x, None, None, w, b, True, 1e-5, relu)
                grads = torch.ops.bitfast.native_batch_norm_relu_bwd(torch.randn_like(y), x, w, b, mean, var, True,
                                                                    1e-5, relu)
            out[f"{name} {dtype} {relu}"] = grads
    torch.save(out, path)
