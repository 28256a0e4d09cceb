"""Parity of GroupNorm+ReLU on every backend, over a shape grid of labelled edge cases and BiT's real shapes.

Then the native ops (``torch.ops.bitfast.native_group_norm_relu_fwd/bwd``) on the native
backends (``cpp`` on the CPU, ``cuda`` with a GPU; tests/ops/_util.py's
``native_backends``): every dtype, NCHW, channels_last and other layouts, float32
parameters with half-precision inputs, with and without affine and ReLU, eps, constant
groups and fp64 gradcheck through the public API; against a float64 evaluation of the
reference with the reference in the input's dtype as the error baseline (the cases of
tests/ops/_native_cases.py). The tests of both native norms are here too: short NCHW rows
of GroupNorm and BatchNorm, ``torch.library.opcheck`` of the native GroupNorm+ReLU and
BatchNorm+ReLU ops, and the error messages of bad calls of the native norm ops
(test_batch_norm_relu.py has BatchNorm's own). What only one backend's kernels have
(thread counts, CUDA's shared-memory paths, ...) is in test_cpp_backend.py and
test_cuda_backend_norms.py.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

import bitfast
from tests.ops import _util as U
from tests.ops._native_cases import (
    ALL_DTYPES,
    GN_SHAPES,
    NORM_LAYOUTS,
    check_bn_native,
    check_gn_native,
    make_activation,
    norm_params,
    opcheck_norms,
    require,
    run_in_child,
)
from tests.ops._util import DTYPES, assert_parity, device_backends, native_backends, require_backend

FAMILY = "group_norm_relu"

# (N, C, H, W, G, label)
SHAPES = [
    (1, 1, 2, 2, 1, "minimal"),
    (2, 6, 5, 3, 1, "one-group"),
    (2, 12, 3, 5, 12, "groups==channels"),
    (3, 40, 7, 9, 8, "non-pow2-odd-spatial"),
    (2, 64, 14, 14, 32, "bit-C64"),
    (1, 256, 28, 28, 32, "bit-stage1-like"),
    (2, 2048, 7, 7, 32, "bit-final"),
]
LAYOUTS = ["nchw", "channels_last", "non_contiguous"]


def _make(shape, dtype, layout, device):
    n, c, h, w = shape
    if layout == "non_contiguous":
        x = torch.randn(n, c, w, h, device=device).transpose(2, 3)  # H and W swapped in memory
    else:
        x = torch.randn(n, c, h, w, device=device)
    x = (x * 1.5 + 0.3).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _run(fn, x, weight, bias, g):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    y = fn(x, weight, bias)
    grads = torch.autograd.grad(y, (x, weight, bias), g.to(y.dtype))
    return y.detach(), grads


def _cases():
    # Large BiT shapes run in the two main layouts with ReLU only, to bound CI time.
    for *shape, label in SHAPES:
        for layout in LAYOUTS:
            for relu in (True, False):
                if label.startswith("bit") and (layout == "non_contiguous" or not relu):
                    continue
                yield pytest.param(*shape, layout, relu, id=f"{label}-{layout}-{'relu' if relu else 'norelu'}")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c,h,w,groups,layout,relu", list(_cases()))
def test_group_norm_relu_parity(device, backend, dtype, n, c, h, w, groups, layout, relu):
    require_backend(backend, FAMILY, device, dtype)
    x = _make((n, c, h, w), dtype, layout, device)
    weight = torch.randn(c, device=device) * 0.5 + 1.0
    bias = torch.randn(c, device=device) * 0.5
    g = torch.randn(n, c, h, w, device=device)
    eps = 1e-5

    y, grads = _run(lambda a, wt, b: U.group_norm_relu(backend)(a, groups, wt, b, eps, relu), x, weight, bias, g)
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last" and c > 1 and h * w > 1:
        assert y.is_contiguous(memory_format=torch.channels_last), "output must keep channels_last"
        if backend != "reference":  # the composite's gradient layout is PyTorch's choice (NCHW on CUDA)
            assert grads[0].is_contiguous(memory_format=torch.channels_last), "grad must keep channels_last"

    def torch_op(a, wt, b):
        out = F.group_norm(a, groups, wt.to(a.dtype), b.to(a.dtype), eps)
        return F.relu(out) if relu else out

    y64, grads64 = _run(torch_op, x.double(), weight.double(), bias.double(), g.double())
    # PyTorch's own op with everything in x's dtype (what an eager low-precision model runs).
    yb, gradsb = _run(torch_op, x, weight.to(dtype), bias.to(dtype), g.to(dtype))
    assert_parity(y, y64, yb, dtype, f"{backend} forward")
    for name, a, r, b in zip(("x", "weight", "bias"), grads, grads64, gradsb):
        assert_parity(a, r, b, dtype, f"{backend} grad {name}")


@pytest.mark.parametrize("device,backend", device_backends())
def test_no_affine(device, backend):
    require_backend(backend, FAMILY, device, torch.float32)
    x = torch.randn(2, 8, 4, 4, device=device, requires_grad=True)
    y = U.group_norm_relu(backend)(x, 4)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x64 = x.detach().double().requires_grad_()
    y64 = F.relu(F.group_norm(x64, 4))
    (gx64,) = torch.autograd.grad(y64, x64, torch.ones_like(y64))
    assert_parity(y, y64, None, torch.float32, "forward")
    assert_parity(gx, gx64, None, torch.float32, "grad x")


@pytest.mark.parametrize("device,backend", device_backends())
def test_mixed_dtype_params_under_autocast_style(device, backend):
    """bfloat16 activations with float32 affine parameters, as under autocast."""
    require_backend(backend, FAMILY, device, torch.bfloat16)
    x = torch.randn(2, 32, 6, 6, device=device).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(32, device=device, requires_grad=True)
    bias = torch.randn(32, device=device, requires_grad=True)
    y = U.group_norm_relu(backend)(x, 8, weight, bias)
    assert y.dtype == torch.bfloat16
    gx, gw, gb = torch.autograd.grad(y, (x, weight, bias), torch.ones_like(y))
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32 and gb.dtype == torch.float32
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y64 = F.relu(F.group_norm(x64, 8, w64, b64))
    grads64 = torch.autograd.grad(y64, (x64, w64, b64), torch.ones_like(y64))
    assert_parity(y, y64, None, torch.bfloat16, "forward")
    for a, r in zip((gx, gw, gb), grads64):
        assert_parity(a, r, None, torch.bfloat16, "grad")


@pytest.mark.parametrize("device,backend", device_backends())
def test_float64_gradcheck(device, backend):
    require_backend(backend, FAMILY, device, torch.float64)
    x = torch.randn(2, 6, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: U.group_norm_relu(backend)(a[0], 3, a[1], a[2]), (x, w, b))


def test_bad_input_messages():
    f = bitfast.ops.group_norm_relu
    with pytest.raises(ValueError, match=r"group_norm_relu: x has 3 dims \(shape \(2, 4, 4\)\); expected \(N, C, H, W\)"):
        f(torch.randn(2, 4, 4), 2)
    with pytest.raises(ValueError, match=r"x has 6 channels, not divisible by num_groups=4"):
        f(torch.randn(1, 6, 2, 2), 4)
    with pytest.raises(ValueError, match=r"weight has shape \(5,\); expected \(6,\)"):
        f(torch.randn(1, 6, 2, 2), 3, torch.randn(5))
    with pytest.raises(TypeError, match=r"x has dtype torch.int32"):
        f(torch.ones(1, 6, 2, 2, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"num_groups must be >= 1; got 0"):
        f(torch.randn(1, 6, 2, 2), 0)
    with pytest.raises(ValueError, match=r"eps must be a finite value >= 0; got -0.1"):
        f(torch.randn(1, 6, 2, 2), 3, eps=-0.1)
    with pytest.raises(ValueError, match=r"has a single element; expected more than 1 value per group"):
        f(torch.randn(2, 4, 1, 1), 4)
    with pytest.raises(TypeError, match=r"relu must be a bool"):
        f(torch.randn(1, 6, 2, 2), 3, relu=1)


def test_quick_argument_check_agrees_with_the_full_checks():
    """The public op first tries a quick check of the usual argument types and takes the
    full checks (and their messages) for anything it does not accept: it must accept only
    what the full checks accept."""
    module = importlib.import_module("bitfast.ops.group_norm_relu")  # the package exports the function

    x, w = torch.randn(2, 6, 3, 3), torch.randn(6)
    ok = [(x, 3, w, w, 1e-5, True), (x, 3, None, None, 0.0, False), (x.bfloat16(), 6, w, None, 1e-6, True)]
    odd_but_valid = [(x, 3, w, w, 0, True), (x, torch.tensor(3).item(), w, w, 1e-5, True)]
    invalid = [
        (x, 4, w, w, 1e-5, True), (x, 0, w, w, 1e-5, True), (x, 3, w[:5], w, 1e-5, True),
        (x, 3, w, w, -1.0, True), (x, 3, w, w, float("nan"), True), (x, 3, w, w, float("inf"), True),
        (x, 3, w, w, 1e-5, 1), (x, True, w, w, 1e-5, True), (x[0], 3, w, w, 1e-5, True),
        (x.int(), 3, w, w, 1e-5, True), (x, 3, w.int(), w, 1e-5, True), (torch.randn(2, 6, 0, 3), 3, w, w, 1e-5, True),
        (torch.randn(2, 6, 1, 1), 6, w, w, 1e-5, True),
    ]
    for args in ok:
        assert module._valid_args(*args)
        module._check_args("group_norm_relu", "x", *args)
    for args in odd_but_valid:
        module._check_args("group_norm_relu", "x", *args)
    for args in invalid:
        assert not module._valid_args(*args)
        with pytest.raises((TypeError, ValueError)):
            module._check_args("group_norm_relu", "x", *args)


# --------------------------------------------------------------------------------------
# The native ops on the native backends
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", NORM_LAYOUTS)
@pytest.mark.parametrize("shape,groups,label", GN_SHAPES, ids=[s[2] for s in GN_SHAPES])
def test_gn_native_parity(device, backend, dtype, layout, shape, groups, label):
    require(backend, FAMILY, device)
    x = make_activation(shape, dtype, layout, device)
    weight, bias = norm_params(shape[1], device)
    check_gn_native(x, weight.to(dtype), bias.to(dtype), groups, relu=True)


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_gn_native_options(device, backend, layout, relu, affine):
    require(backend, FAMILY, device)
    x = make_activation((3, 24, 5, 6), torch.float32, layout, device)
    check_gn_native(x, *norm_params(24, device, affine=affine), 6, relu)


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gn_native_float32_params(device, backend, dtype, layout):
    """Half-precision activations with float32 parameters (autocast); the parameter
    gradients come back in float32."""
    require(backend, FAMILY, device)
    x = make_activation((2, 32, 6, 6), dtype, layout, device)
    check_gn_native(x, *norm_params(32, device), 8, relu=True)


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("eps", [1e-10, 1e-5, 0.5])
def test_gn_native_eps(device, backend, eps):
    require(backend, FAMILY, device)
    check_gn_native(make_activation((2, 16, 4, 4), torch.float32, "nchw", device), *norm_params(16, device), 4,
                    True, eps)


@pytest.mark.parametrize("device,backend", native_backends())
def test_gn_native_constant_groups_are_finite(device, backend):
    require(backend, FAMILY, device)
    x = torch.zeros(2, 8, 3, 3, device=device)
    x[1, 4:] = 2.5
    for layout in ("nchw", "channels_last"):
        for dtype in ALL_DTYPES:
            xx = x.to(dtype).contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                        torch.contiguous_format)
            y, mean, rstd = torch.ops.bitfast.native_group_norm_relu_fwd(xx, None, None, 2, 1e-5, True)
            dx, dw, db = torch.ops.bitfast.native_group_norm_relu_bwd(torch.ones_like(y), xx, None, None, mean, rstd,
                                                                       2, True)
            for t in (y, dx, dw, db):
                assert torch.isfinite(t).all(), (layout, dtype)


@pytest.mark.parametrize("device,backend", native_backends())
def test_gn_gradcheck_float64_native(device, backend):
    require(backend, FAMILY, device)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for inp in (x, xl):
        assert torch.autograd.gradcheck(
            lambda a, ww, bb: bitfast.ops.group_norm_relu(a, 3, ww, bb, backend=backend), (inp, w, b)
        )


# Both native norms


def _require_norms(backend, device):
    require(backend, FAMILY, device)
    require(backend, "batch_norm_relu", device)


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_norms_native_short_row_blocks(device, backend, dtype, relu):
    """The NCHW backward sums of short rows, 16 rows at a time (two GroupNorm groups of 32
    rows of 4x4; a BatchNorm channel of 17 rows: one block and one row), with and without
    the ReLU."""
    _require_norms(backend, device)
    x = make_activation((2, 64, 4, 4), dtype, "nchw", device)
    weight, bias = norm_params(64, device)
    check_gn_native(x, weight.to(dtype), bias.to(dtype), 2, relu)
    x = make_activation((17, 8, 4, 4), dtype, "nchw", device)
    weight, bias = norm_params(8, device)
    check_bn_native(x, None, None, weight.to(dtype), bias.to(dtype), True, relu)


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("layout", NORM_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_norms(device, backend, layout, dtype):
    _require_norms(backend, device)
    opcheck_norms(device, layout, dtype)


@pytest.mark.parametrize("device,backend", native_backends())
def test_norm_errors(device, backend):
    """Bad calls of the native norm ops raise RuntimeErrors that say what was wrong. In a
    child process, as test_sgd_momentum.py::test_errors: the CUDA extension's error path
    crashed the process once."""
    _require_norms(backend, device)
    run_in_child("tests.ops._native_cases", "check_norm_errors", device)
