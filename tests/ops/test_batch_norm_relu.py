"""Parity of BatchNorm+ReLU on every backend: training (batch statistics and the
running-statistics update) and eval, against F.batch_norm.

Then the native ops (``torch.ops.bitfast.native_batch_norm_relu_fwd/bwd`` and
``native_batch_norm_update_stats_``) on the native backends (``cpp`` on the CPU, ``cuda``
with a GPU; tests/ops/_util.py's ``native_backends``): every dtype, NCHW, channels_last
and other layouts, training and eval, float32 parameters with half-precision inputs, with
and without affine and ReLU, and the running-statistics update; against a float64
evaluation of the reference with the reference in the input's dtype as the error baseline
(the cases of tests/ops/_native_cases.py). The tests of both native norms (short rows,
opcheck, error messages) are in test_group_norm_relu.py; what only one backend's kernels
have is in test_cpp_backend.py and test_cuda_backend_norms.py.
"""

import pytest
import torch
import torch.nn.functional as F

import bitfast
from bitfast.nn import BatchNormReLU
from tests.ops import _util as U
from tests.ops._native_cases import (
    ALL_DTYPES,
    BN_SHAPES,
    NORM_LAYOUTS,
    check_bn_native,
    check_bn_update_stats,
    make_activation,
    norm_params,
    require,
)
from tests.ops._util import DTYPES, assert_parity, device_backends, native_backends, require_backend

FAMILY = "batch_norm_relu"

SHAPES = [
    (2, 1, 2, 1, "minimal"),
    (3, 5, 7, 3, "odd"),
    (4, 64, 14, 14, "bit-C64"),
    (2, 512, 7, 7, "bit-late"),
]


def _make(shape, dtype, layout, device):
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("n,c,h,w,label", SHAPES, ids=[s[-1] for s in SHAPES])
def test_batch_norm_relu_parity(device, backend, dtype, layout, training, n, c, h, w, label):
    require_backend(backend, FAMILY, device, dtype)
    x = _make((n, c, h, w), dtype, layout, device)
    weight = torch.randn(c, device=device) * 0.5 + 1
    bias = torch.randn(c, device=device) * 0.5
    rm0 = torch.randn(c, device=device) * 0.1
    rv0 = torch.rand(c, device=device) + 0.5
    g = torch.randn(n, c, h, w, device=device)

    def run(fn, xx, wt, b, rm, rv, gg):
        xx, wt, b = (t.detach().clone().requires_grad_() for t in (xx, wt, b))
        y = fn(xx, rm, rv, wt, b)
        grads = torch.autograd.grad(y, (xx, wt, b), gg.to(y.dtype))
        return y.detach(), grads

    rm, rv = rm0.clone(), rv0.clone()
    y, grads = run(
        lambda a, m, v, wt, b: U.batch_norm_relu(backend)(a, m, v, wt, b, training, 0.1, 1e-5),
        x, weight, bias, rm, rv, g,
    )
    assert y.dtype == dtype
    if layout == "channels_last" and c > 1 and h * w > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)

    def torch_op(a, m, v, wt, b):
        return F.relu(F.batch_norm(a, m, v, wt.to(a.dtype), b.to(a.dtype), training, 0.1, 1e-5))

    rm64, rv64 = rm0.double(), rv0.double()
    y64, grads64 = run(torch_op, x.double(), weight.double(), bias.double(), rm64, rv64, g.double())
    if dtype == torch.float32:
        baseline = (None, (None, None, None))
    else:
        # PyTorch's own op with parameters and statistics all in x's dtype.
        baseline = run(torch_op, x, weight.to(dtype), bias.to(dtype), rm0.to(dtype), rv0.to(dtype), g.to(dtype))
    assert_parity(y, y64, baseline[0], dtype, "forward")
    for name, a, r, b in zip(("x", "weight", "bias"), grads, grads64, baseline[1]):
        assert_parity(a, r, b, dtype, f"grad {name}")
    # Running statistics: float32 buffers updated from the batch in training, untouched in eval.
    assert_parity(rm, rm64, None, torch.float32 if dtype == torch.float32 else dtype, "running_mean")
    assert_parity(rv, rv64, None, torch.float32 if dtype == torch.float32 else dtype, "running_var")
    if not training:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("device,backend", device_backends())
def test_training_without_running_stats(device, backend):
    require_backend(backend, FAMILY, device, torch.float32)
    x = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
    y = U.batch_norm_relu(backend)(x, None, None, training=True)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x64 = x.detach().double().requires_grad_()
    y64 = F.relu(F.batch_norm(x64, None, None, training=True))
    (gx64,) = torch.autograd.grad(y64, x64, torch.ones_like(y64))
    assert_parity(y, y64, None, torch.float32, "forward")
    assert_parity(gx, gx64, None, torch.float32, "grad x")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_matches_batchnorm2d(device, backend, momentum):
    """BatchNormReLU tracks num_batches_tracked and the running stats like nn.BatchNorm2d."""
    require_backend(backend, FAMILY, device, torch.float32)
    if backend == U.REFERENCE_OP:
        pytest.skip("modules take real backend names; the op path is covered by the parity tests")
    ours = BatchNormReLU(6, momentum=momentum, backend=backend).to(device)
    ref = torch.nn.BatchNorm2d(6, momentum=momentum).to(device)
    ref.load_state_dict(ours.state_dict())
    for _ in range(3):
        x = torch.randn(4, 6, 3, 3, device=device)
        torch.testing.assert_close(ours(x), F.relu(ref(x)), rtol=1e-5, atol=1e-5)
    for key, val in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], val, rtol=1e-5, atol=1e-6, msg=key)
    ours.eval()
    ref.eval()
    x = torch.randn(2, 6, 3, 3, device=device)
    torch.testing.assert_close(ours(x), F.relu(ref(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", device_backends())
def test_float64_gradcheck(device, backend):
    require_backend(backend, FAMILY, device, torch.float64)
    x = torch.randn(3, 4, 2, 2, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    for training in (True, False):
        rm = torch.zeros(4, device=device, dtype=torch.float64)
        rv = torch.ones(4, device=device, dtype=torch.float64)

        def f(a, wt, bb, training=training, rm=rm, rv=rv):
            return U.batch_norm_relu(backend)(a, rm.clone(), rv.clone(), wt, bb, training)

        assert torch.autograd.gradcheck(f, (x, w, b))


def test_bad_input_messages():
    f = bitfast.ops.batch_norm_relu
    x = torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"running_mean and running_var are required when training=False"):
        f(x, None, None)
    with pytest.raises(ValueError, match=r"running_mean has shape \(4,\); expected \(3,\)"):
        f(x, torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel when training"):
        f(torch.randn(1, 3, 1, 1), None, None, training=True)
    with pytest.raises(ValueError, match=r"x has 2 dims"):
        f(torch.randn(2, 3), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"momentum must be a finite value >= 0"):
        f(x, torch.zeros(3), torch.ones(3), training=True, momentum=-1.0)


# --------------------------------------------------------------------------------------
# The native ops on the native backends
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", NORM_LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,label", BN_SHAPES, ids=[s[1] for s in BN_SHAPES])
def test_bn_native_parity(device, backend, dtype, layout, training, shape, label):
    require(backend, FAMILY, device)
    c = shape[1]
    x = make_activation(shape, dtype, layout, device)
    rm, rv = torch.randn(c, device=device) * 0.1, torch.rand(c, device=device) + 0.5
    weight, bias = norm_params(c, device)
    check_bn_native(x, rm, rv, weight.to(dtype), bias.to(dtype), training, relu=True)


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_native_options(device, backend, layout, relu, affine, training):
    require(backend, FAMILY, device)
    x = make_activation((3, 24, 5, 6), torch.float32, layout, device)
    if training and affine:
        rm, rv = None, None
    else:
        rm, rv = torch.randn(24, device=device) * 0.1, torch.rand(24, device=device) + 0.5
    check_bn_native(x, rm, rv, *norm_params(24, device, affine=affine), training, relu)


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_native_float32_params(device, backend, dtype, layout):
    require(backend, FAMILY, device)
    x = make_activation((4, 16, 5, 5), dtype, layout, device)
    rm, rv = torch.zeros(16, device=device), torch.ones(16, device=device)
    check_bn_native(x, rm, rv, *norm_params(16, device), True, True)


@pytest.mark.parametrize("device,backend", native_backends())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_bn_native_update_stats(device, backend, dtype):
    require(backend, FAMILY, device)
    check_bn_update_stats(device, dtype)
