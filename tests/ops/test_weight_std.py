"""Parity of weight standardization and std_conv2d on every backend.

Then the native ops (``torch.ops.bitfast.native_weight_standardize_fwd/bwd``) and the public
API on the native backends (``cpp`` on the CPU, ``cuda`` with a GPU; tests/ops/_util.py's
``native_backends``): fp32, fp64, bf16 and fp16, BiT and edge shapes, non-contiguous weights
and gradients, eps, constant rows, autograd and fp64 gradcheck, and ``torch.library.opcheck``;
against a float64 evaluation of the reference with the reference in the weight's dtype as
the error baseline (the cases of tests/ops/_native_cases.py). What only the CUDA kernel has
(BiT-sized weights, agreement with the CPU kernel) is in test_cuda_backend.py.
"""

import pytest
import torch
import torch.nn.functional as F

import bitfast
from bitfast.ops import reference
from tests.ops import _util as U
from tests.ops._native_cases import (
    ALL_DTYPES,
    EPS,
    WS_SHAPES,
    check_ws_autograd,
    check_ws_native,
    layouts,
    opcheck_ws,
    random_weight,
    require,
)
from tests.ops._util import DTYPES, assert_parity, device_backends, native_backends, require_backend

FAMILY = "weight_standardize"

# (shape, label): minimal, BiT stem / projection / 3x3, non-power-of-two sizes.
SHAPES = [
    ((1, 1, 1, 1), "minimal"),
    ((7, 5, 3, 3), "odd"),
    ((64, 3, 7, 7), "stem"),
    ((256, 64, 1, 1), "projection"),
    ((128, 128, 3, 3), "conv2-3x3"),
    ((33, 2049, 1, 1), "K-beyond-one-block"),
]


def _ref64(w, g, eps):
    w64 = w.detach().double().requires_grad_()
    y = reference.weight_standardize(w64, eps)
    (gw,) = torch.autograd.grad(y, w64, g.double())
    return y.detach(), gw


def _baseline(w, g, eps):
    """PyTorch's own (timm-style) standardization in w's dtype."""
    wl = w.detach().clone().requires_grad_()
    y = reference.weight_standardize(wl, eps)
    (gw,) = torch.autograd.grad(y, wl, g)
    return y.detach(), gw


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,label", SHAPES, ids=[s[1] for s in SHAPES])
def test_weight_standardize_parity(device, backend, dtype, shape, label):
    require_backend(backend, FAMILY, device, dtype)
    eps = 1e-8
    w = (torch.randn(shape, device=device) * 0.05 + 0.01).to(dtype).requires_grad_()
    y = U.weight_standardize(backend)(w, eps)
    assert y.dtype == dtype and y.shape == w.shape and y.is_contiguous()
    g = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, w, g)
    y64, gw64 = _ref64(w, g, eps)
    yb, gwb = _baseline(w, g, eps)
    assert_parity(y, y64, yb, dtype, f"{backend} forward {label}")
    assert_parity(gw, gw64, gwb, dtype, f"{backend} backward {label}")


@pytest.mark.parametrize("device,backend", device_backends())
def test_weight_standardize_non_contiguous(device, backend):
    require_backend(backend, FAMILY, device, torch.float32)
    base = torch.randn(3, 3, 12, 16, device=device)
    w = base.permute(3, 2, 0, 1).requires_grad_()  # (16, 12, 3, 3), not contiguous
    assert not w.is_contiguous()
    y = U.weight_standardize(backend)(w)
    g = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, w, g)
    y64, gw64 = _ref64(w, g, 1e-8)
    assert_parity(y, y64, None, torch.float32, "forward")
    assert_parity(gw, gw64, None, torch.float32, "backward")


CL_SHAPES = [s for s in SHAPES if s[0][2:] != (1, 1)]  # 1x1 kernels: both layouts are one


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,label", CL_SHAPES, ids=[s[1] for s in CL_SHAPES])
def test_weight_standardize_channels_last(device, backend, dtype, shape, label):
    """A channels_last weight (a model moved to channels_last) is standardized in place of
    its layout: the output and the gradient come back channels_last, with the values of the
    reference, and a gradient arriving in another layout is taken as well."""
    require_backend(backend, FAMILY, device, dtype)
    cl = torch.channels_last
    w = (torch.randn(shape, device=device) * 0.05 + 0.01).to(dtype).contiguous(memory_format=cl).requires_grad_()
    y = U.weight_standardize(backend)(w, 1e-8)
    assert y.dtype == dtype and y.shape == w.shape and y.is_contiguous(memory_format=cl)
    for g in (torch.randn_like(y), torch.randn_like(y, memory_format=torch.contiguous_format)):
        (gw,) = torch.autograd.grad(y, w, g, retain_graph=True)
        # (the reference composite's gradient takes whatever layout autograd's ops give it)
        assert backend == "reference" or gw.is_contiguous(memory_format=cl)
        y64, gw64 = _ref64(w, g, 1e-8)
        yb, gwb = _baseline(w, g, 1e-8)
        assert_parity(y, y64, yb, dtype, f"{backend} channels_last forward {label}")
        assert_parity(gw, gw64, gwb, dtype, f"{backend} channels_last backward {label}")


@pytest.mark.parametrize("device,backend", device_backends())
def test_channels_last_model_gets_channels_last_weight_grads(device, backend):
    """std_conv2d in a channels_last model: each weight's .grad comes back in the weight's own
    layout (so that autograd keeps it as .grad without a copy), on every backend but the
    reference composite, whose gradient takes the layout autograd's ops give it."""
    require_backend(backend, FAMILY, device, torch.float32)
    cl = torch.channels_last
    x = torch.randn(2, 8, 6, 6, device=device).contiguous(memory_format=cl)
    w = torch.randn(16, 8, 3, 3, device=device).contiguous(memory_format=cl).requires_grad_()
    U.std_conv2d(backend)(x, w, None, padding=1).square().sum().backward()
    assert backend == "reference" or w.grad.is_contiguous(memory_format=cl)
    w64 = w.detach().double().requires_grad_()
    F.conv2d(x.double(), reference.weight_standardize(w64, 1e-8), None, 1, 1).square().sum().backward()
    assert_parity(w.grad, w64.grad, None, torch.float32, f"{backend} std_conv2d weight grad, channels_last")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("eps", [1e-8, 1e-10])
def test_constant_and_zero_filters_give_no_nan(device, backend, eps):
    require_backend(backend, FAMILY, device, torch.float16)
    w = torch.zeros(4, 3, 3, 3, device=device)
    w[1] = 0.5
    w[2] = -3.0
    w[3] = torch.randn(3, 3, 3)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        wd = w.to(dtype).requires_grad_()
        y = U.weight_standardize(backend)(wd, eps)
        (gw,) = torch.autograd.grad(y, wd, torch.ones_like(y))
        assert torch.isfinite(y).all() and torch.isfinite(gw).all(), dtype
        assert (y[:3] == 0).all()


@pytest.mark.parametrize("device,backend", device_backends())
def test_float64_gradcheck(device, backend):
    require_backend(backend, FAMILY, device, torch.float64)
    w = torch.randn(3, 2, 2, 2, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: U.weight_standardize(backend)(t, 1e-5), (w,))


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_std_conv2d_matches_conv_of_standardized_weight(device, backend, channels_last):
    require_backend(backend, FAMILY, device, torch.float32)
    x = torch.randn(2, 6, 9, 11, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(8, 3, 3, 3, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    y = U.std_conv2d(backend)(x, w, b, stride=2, padding=1, groups=2, eps=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = F.conv2d(x64, reference.weight_standardize(w64, 1e-6), b64, 2, 1, 1, 2)
    grads64 = torch.autograd.grad(y64, (x64, w64, b64), g.double())
    assert_parity(y, y64, None, torch.float32, "std_conv2d forward")
    for name, a, r in zip("xwb", grads, grads64):
        assert_parity(a, r, None, torch.float32, f"std_conv2d grad {name}")


def test_bad_input_messages():
    f = bitfast.ops.weight_standardize
    with pytest.raises(ValueError, match=r"weight_standardize: w has 1 dims"):
        f(torch.randn(4))
    with pytest.raises(TypeError, match=r"weight_standardize: w has dtype torch.int64"):
        f(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"eps must be a finite value >= 0; got -1"):
        f(torch.randn(2, 2), eps=-1.0)
    with pytest.raises(TypeError, match=r"w must be a torch.Tensor"):
        f([[1.0]])
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        f(torch.randn(2, 2), backend="fast")
    with pytest.raises(ValueError, match=r"x has 6 channels but weight expects 4"):
        bitfast.ops.std_conv2d(torch.randn(1, 6, 4, 4), torch.randn(3, 4, 1, 1))
    with pytest.raises(ValueError, match=r"x has 3 dims"):
        bitfast.ops.std_conv2d(torch.randn(6, 4, 4), torch.randn(3, 6, 1, 1))
    with pytest.raises(ValueError, match=r"bias has shape \(2,\); expected \(3,\)"):
        bitfast.ops.std_conv2d(torch.randn(1, 6, 4, 4), torch.randn(3, 6, 1, 1), torch.randn(2))


# --------------------------------------------------------------------------------------
# The native ops on the native backends
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,label", WS_SHAPES, ids=[s[1] for s in WS_SHAPES])
def test_ws_native_parity(device, backend, dtype, shape, label):
    require(backend, FAMILY, device)
    w = random_weight(shape, dtype, device)
    check_ws_native(w, torch.randn(shape, device=device).to(dtype))


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_ws_native_non_contiguous(device, backend, dtype, layout):
    require(backend, FAMILY, device)
    w = layouts(random_weight((32, 16, 3, 3), dtype, device))[layout]
    g = layouts(torch.randn(32, 16, 3, 3, device=device).to(dtype))[layout]
    assert not w.is_contiguous()
    check_ws_native(w, g)


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("w_layout,g_layout", [("channels_last", "contiguous"), ("contiguous", "channels_last")])
def test_ws_native_gradient_in_another_layout(device, backend, dtype, w_layout, g_layout):
    # the gradient comes in w's layout whatever the incoming gradient's
    require(backend, FAMILY, device)
    w = layouts(random_weight((32, 16, 3, 3), dtype, device))[w_layout]
    g = layouts(torch.randn(32, 16, 3, 3, device=device).to(dtype))[g_layout]
    check_ws_native(w, g)


@pytest.mark.parametrize("device,backend", native_backends())
def test_ws_autograd_channels_last(device, backend):
    require(backend, FAMILY, device)
    w = random_weight((64, 32, 3, 3), torch.float32, device).contiguous(memory_format=torch.channels_last)
    check_ws_autograd(w, backend)


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("eps", [1e-10, 1e-5, 0.5])
def test_ws_native_eps(device, backend, eps):
    require(backend, FAMILY, device)
    w = random_weight((16, 8, 3, 3), torch.float32, device)
    check_ws_native(w, torch.randn(16, 8, 3, 3, device=device), eps)


@pytest.mark.parametrize("device,backend", native_backends())
def test_ws_native_constant_rows_are_finite(device, backend):
    require(backend, FAMILY, device)
    w = torch.zeros(4, 3, 3, 3, device=device)
    w[1] = 0.5
    w[2] = -3.0
    w[3] = torch.randn(3, 3, 3)
    for dtype in ALL_DTYPES:
        out, mean, rstd = torch.ops.bitfast.native_weight_standardize_fwd(w.to(dtype), EPS)
        dw = torch.ops.bitfast.native_weight_standardize_bwd(
            torch.ones(w.shape, dtype=dtype, device=device), w.to(dtype), mean, rstd
        )
        assert torch.isfinite(out).all() and torch.isfinite(dw).all(), dtype
        assert (out[:3] == 0).all(), dtype


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,label", WS_SHAPES[:4], ids=[s[1] for s in WS_SHAPES[:4]])
def test_ws_autograd_parity(device, backend, dtype, shape, label):
    require(backend, FAMILY, device)
    check_ws_autograd(random_weight(shape, dtype, device), backend)


@pytest.mark.parametrize("device,backend", native_backends())
def test_ws_autograd_non_contiguous(device, backend):
    require(backend, FAMILY, device)
    w = torch.randn(3, 3, 12, 16, device=device).permute(3, 2, 0, 1)  # (16, 12, 3, 3)
    check_ws_autograd(w, backend)


@pytest.mark.parametrize("device,backend", native_backends())
def test_ws_gradcheck_float64(device, backend):
    require(backend, FAMILY, device)
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: bitfast.ops.weight_standardize(t, 1e-5, backend=backend), (w,))


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_ws(device, backend, layout, dtype):
    require(backend, FAMILY, device)
    opcheck_ws(device, layout, dtype)
