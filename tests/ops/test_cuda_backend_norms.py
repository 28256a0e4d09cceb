"""What only bitfast's CUDA GroupNorm+ReLU and BatchNorm+ReLU kernels (the ``cuda``
backend, csrc/cuda/group_norm_relu.cu and batch_norm_relu.cu) have.

The tests that every native backend shares (the cases of tests/ops/_native_cases.py: every
dtype, NCHW, channels_last and other layouts, float32 parameters with half-precision
inputs, affine and ReLU options, training and eval, the running-statistics update,
opcheck, error messages) are in test_group_norm_relu.py and test_batch_norm_relu.py,
parametrized over ``tests/ops/_util.native_backends``. Here: real BiT activation sizes in
bf16 channels_last (C = 256 ... 2048, 56x56 ... 7x7, 32 groups), GroupNorm groups too large
for shared memory (the two-phase path), the residual add fused with GroupNorm, unaligned
tensors and inner sizes that are not a multiple of the 16-byte vector (the scalar paths),
half-precision and strided running statistics, bitwise reproducibility, agreement with the
CPU kernels, autograd through the public API, the current-stream contract, the backend's
selection and the statistics' dtypes. Every test needs a GPU and the CUDA build; they skip
otherwise (tools/gpu_check.sh runs them on a lent GPU).
"""

from __future__ import annotations

import pytest
import torch

import bitfast
from bitfast import backends
from bitfast.ops import reference
from tests.ops._native_cases import (
    ALL_DTYPES,
    check_bn_native,
    check_gn_native,
    make_activation,
    norm_params,
    require,
    stat_dtype,
)
from tests.ops._util import assert_parity

DEVICE, BACKEND = "cuda", "cuda"

pytestmark = pytest.mark.cuda

# (shape, groups, label): the GroupNorm inputs of BiT-R50x1 at 224x224 (batch 2), and
# groups that do not fit in shared memory (401 KB in bf16, 3.2 MB in fp32)
BIT_GN_SHAPES = [
    ((2, 64, 56, 56), 32, "stem-out-C64-56"),
    ((2, 256, 56, 56), 32, "stage1-C256-56"),
    ((2, 512, 28, 28), 32, "stage2-C512-28"),
    ((2, 1024, 14, 14), 32, "stage3-C1024-14"),
    ((2, 2048, 7, 7), 32, "stage4-C2048-7"),
]
BIG_GROUP_SHAPES = [
    ((2, 2048, 56, 56), 32, "no-fit-C2048-56"),
    ((1, 64, 112, 112), 1, "no-fit-one-group-112"),
]

# BatchNorm at BiT sizes: many samples of a stage-1 map, the last stage, a wide batch
BIT_BN_SHAPES = [
    ((16, 256, 56, 56), "stage1-C256-56"),
    ((8, 2048, 7, 7), "stage4-C2048-7"),
    ((64, 64, 28, 28), "batch64-C64-28"),
]


@pytest.fixture(autouse=True)
def _needs_cuda():
    require(BACKEND, "group_norm_relu", DEVICE)
    require(BACKEND, "batch_norm_relu", DEVICE)


def _params(c, dtype=torch.float32):
    w, b = norm_params(c, DEVICE)
    return w.to(dtype), b.to(dtype)


def _running(c):
    return torch.randn(c, device=DEVICE) * 0.1, torch.rand(c, device=DEVICE) + 0.5


def _unaligned(x: torch.Tensor) -> torch.Tensor:
    """x's values and layout (NCHW or channels_last) in storage shifted by one element, so
    that no pointer is 16-byte aligned."""
    cl = reference.memory_format(x) == torch.channels_last
    n, c, h, w = x.shape
    flat = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)
    if cl:
        out = flat[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        out = flat[1:].view(n, c, h, w)
    out.copy_(x)
    assert out.data_ptr() % 16 != 0 and out.is_contiguous(memory_format=reference.memory_format(x))
    return out


# ----------------------------------------------------------------------------------------
# GroupNorm+ReLU
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("shape,groups,label", BIT_GN_SHAPES + BIG_GROUP_SHAPES,
                         ids=[s[2] for s in BIT_GN_SHAPES + BIG_GROUP_SHAPES])
def test_gn_native_bit_shapes(dtype, layout, shape, groups, label):
    """BiT-R50x1's GroupNorm inputs (one block per group, in shared memory) and groups too
    large for shared memory (the two-phase path), in both layouts."""
    x = make_activation(shape, dtype, layout, DEVICE)
    check_gn_native(x, *_params(shape[1]), groups, relu=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,groups", [((2, 256, 28, 28), 32), ((2, 2048, 56, 56), 32)], ids=["smem", "two-phase"])
@pytest.mark.parametrize("with_grad_sum", [True, False], ids=["grad_sum", "no-grad_sum"])
def test_gn_add_native(dtype, layout, shape, groups, with_grad_sum):
    """native_group_norm_relu_add_fwd/bwd on CUDA: the sum is ATen's a + b bitwise, y and
    the statistics are native_group_norm_relu_fwd of it bitwise, and grad_input is the
    GroupNorm gradient plus grad_sum, within 2x the reference's own error of float64."""
    a = make_activation(shape, dtype, layout, DEVICE)
    b = make_activation(shape, dtype, layout, DEVICE)
    w, bias = _params(shape[1])
    fmt = reference.memory_format(a)
    s, y, mean, rstd = torch.ops.bitfast.native_group_norm_relu_add_fwd(a, b, w, bias, groups, 1e-5, True)
    assert s.is_contiguous(memory_format=fmt) and y.is_contiguous(memory_format=fmt)
    assert torch.equal(s, (a + b).contiguous(memory_format=fmt))
    for got, want in zip((y, mean, rstd), torch.ops.bitfast.native_group_norm_relu_fwd(s, w, bias, groups, 1e-5, True)):
        assert torch.equal(got, want)
    gy = torch.randn(shape, device=DEVICE).to(dtype).contiguous(memory_format=fmt)
    gs = torch.randn(shape, device=DEVICE).to(dtype).contiguous(memory_format=fmt) if with_grad_sum else None
    gi, gw, gb = torch.ops.bitfast.native_group_norm_relu_add_bwd(gy, gs, s, w, bias, mean, rstd, groups, True)
    assert gi.dtype == dtype and gi.is_contiguous(memory_format=fmt)
    _, dw, db = torch.ops.bitfast.native_group_norm_relu_bwd(gy, s, w, bias, mean, rstd, groups, True)
    assert torch.equal(gw, dw) and torch.equal(gb, db)
    s64 = s.double()
    _, _, mean64, rstd64 = reference.group_norm_relu_add_forward(s64, torch.zeros_like(s64), w.double(),
                                                                  bias.double(), groups, 1e-5, True)
    ref64 = reference.group_norm_relu_add_backward(gy.double(), None if gs is None else gs.double(), s64, w.double(),
                                                   bias.double(), mean64, rstd64, groups, True)
    base = reference.group_norm_relu_add_backward(gy, gs, s, w, bias, mean, rstd, groups, True)
    assert_parity(gi, ref64[0], base[0], dtype, "grad_input")


def test_gn_add_native_opcheck():
    a = make_activation((2, 8, 5, 5), torch.float32, "channels_last", DEVICE)
    b = make_activation((2, 8, 5, 5), torch.float32, "channels_last", DEVICE)
    w, bias = _params(8)
    torch.library.opcheck(torch.ops.bitfast.native_group_norm_relu_add_fwd.default, (a, b, w, bias, 4, 1e-5, True))
    s, _, mean, rstd = torch.ops.bitfast.native_group_norm_relu_add_fwd(a, b, w, bias, 4, 1e-5, True)
    gy, gs = torch.randn_like(s), torch.randn_like(s)
    torch.library.opcheck(torch.ops.bitfast.native_group_norm_relu_add_bwd.default,
                          (gy, gs, s, w, bias, mean, rstd, 4, True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,groups", [((2, 64, 8, 8), 8), ((2, 2048, 56, 56), 32)], ids=["smem", "two-phase"])
def test_gn_native_unaligned(dtype, layout, shape, groups):
    """Storage offset by one element: the scalar (non-vector) loads and stores."""
    x = _unaligned(make_activation(shape, dtype, layout, DEVICE))
    check_gn_native(x, *_params(shape[1]), groups, relu=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,groups", [((2, 24, 7, 7), 4), ((2, 36, 5, 3), 3), ((3, 40, 7, 9), 8)],
                         ids=["hw49", "cg12-hw15", "cg5"])
def test_gn_native_inner_not_a_vector_multiple(layout, shape, groups):
    """H * W (NCHW) or C / G (channels_last) not a multiple of the 8-element bf16 vector."""
    x = make_activation(shape, torch.bfloat16, layout, DEVICE)
    check_gn_native(x, *_params(shape[1]), groups, relu=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gn_autograd_through_public_api(layout):
    """bitfast.ops.group_norm_relu(backend="cuda") forward and backward against the float64
    reference composite, bf16 activations with float32 parameters (autocast's mix)."""
    x = make_activation((2, 256, 28, 28), torch.bfloat16, layout, DEVICE)
    w, b = norm_params(256, DEVICE)
    g = torch.randn(x.shape, device=DEVICE).to(torch.bfloat16)

    def run(fn, x, w, b):
        x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = fn(x, w, b)
        return (y.detach(), *torch.autograd.grad(y, (x, w, b), g.to(y.dtype)))

    out = run(lambda a, ww, bb: bitfast.ops.group_norm_relu(a, 32, ww, bb, backend=BACKEND), x, w, b)
    ref = run(lambda a, ww, bb: reference.group_norm_relu(a, 32, ww, bb), x.double(), w.double(), b.double())
    base = run(lambda a, ww, bb: reference.group_norm_relu(a, 32, ww, bb), x.float(), w, b)
    assert out[0].is_contiguous(memory_format=reference.memory_format(x))
    for name, o, r, bl in zip(("y", "grad_x", "grad_weight", "grad_bias"), out, ref, base):
        assert_parity(o, r, bl.to(o.dtype), torch.bfloat16, name)


# ----------------------------------------------------------------------------------------
# BatchNorm+ReLU
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,label", BIT_BN_SHAPES, ids=[s[1] for s in BIT_BN_SHAPES])
def test_bn_native_bit_shapes(dtype, layout, training, shape, label):
    c = shape[1]
    x = make_activation(shape, dtype, layout, DEVICE)
    check_bn_native(x, *_running(c), *_params(c), training, relu=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 64, 8, 8), (2, 24, 7, 7)], ids=["vec-inner", "hw49"])
def test_bn_native_unaligned(dtype, layout, shape):
    x = _unaligned(make_activation(shape, dtype, layout, DEVICE))
    check_bn_native(x, *_running(shape[1]), *_params(shape[1]), True, relu=True)


@pytest.mark.parametrize("stats_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bn_native_update_stats_mixed_dtypes(stats_dtype):
    """Half-precision batch statistics (any caller of the native op may pass them) take the
    tensor-arithmetic path; the result is the reference's."""
    c = 9
    mean = torch.randn(c, device=DEVICE).to(stats_dtype)
    var = (torch.rand(c, device=DEVICE) + 0.5).to(stats_dtype)
    rm, rv = torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    torch.ops.bitfast.native_batch_norm_update_stats_(rm, rv, mean, var, 0.1, 40)
    reference.batch_norm_update_stats_(rm_ref, rv_ref, mean, var, 0.1, 40)
    torch.testing.assert_close(rm, rm_ref, rtol=0, atol=0)
    torch.testing.assert_close(rv, rv_ref, rtol=0, atol=0)


def test_bn_native_update_stats_strided_buffers():
    c = 6
    rm, rv = torch.randn(2 * c, device=DEVICE)[::2], (torch.rand(2 * c, device=DEVICE) + 0.5)[::2]
    mean, var = torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    torch.ops.bitfast.native_batch_norm_update_stats_(rm, rv, mean, var, 0.1, 32)
    reference.batch_norm_update_stats_(rm_ref, rv_ref, mean, var, 0.1, 32)
    torch.testing.assert_close(rm, rm_ref, rtol=0, atol=0)
    torch.testing.assert_close(rv, rv_ref, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_training_through_public_api(layout):
    """bitfast.ops.batch_norm_relu(backend="cuda", training=True) against the reference:
    output, gradients and the updated running statistics."""
    x = make_activation((8, 64, 14, 14), torch.float32, layout, DEVICE)
    w, b = norm_params(64, DEVICE)
    g = torch.randn(x.shape, device=DEVICE)
    outs = []
    for fn in (lambda *a, **k: bitfast.ops.batch_norm_relu(*a, backend=BACKEND, **k), reference.batch_norm_relu):
        rm, rv = torch.zeros(64, device=DEVICE), torch.ones(64, device=DEVICE)
        xx, ww, bb = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = fn(xx, rm, rv, ww, bb, training=True, momentum=0.1)
        outs.append((y.detach(), *torch.autograd.grad(y, (xx, ww, bb), g), rm, rv))
    for name, a, r in zip(("y", "grad_x", "grad_weight", "grad_bias", "running_mean", "running_var"), *outs):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------
# both
# ----------------------------------------------------------------------------------------


def _norms(x, g, w, b, relu=True):
    """Forward and backward of both native norms (training BatchNorm), all outputs."""
    gn = torch.ops.bitfast.native_group_norm_relu_fwd(x, w, b, 32, 1e-5, relu)
    gn += torch.ops.bitfast.native_group_norm_relu_bwd(g, x, w, b, gn[1], gn[2], 32, relu)
    bn = torch.ops.bitfast.native_batch_norm_relu_fwd(x, None, None, w, b, True, 1e-5, relu)
    bn += torch.ops.bitfast.native_batch_norm_relu_bwd(g, x, w, b, bn[1], bn[2], True, 1e-5, relu)
    return gn + bn


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 256, 12, 12), (2, 2048, 56, 56)], ids=["smem", "two-phase"])
def test_norms_bitwise_reproducible(layout, shape):
    """No atomics, fixed merge orders: two runs give the same bits."""
    x = make_activation(shape, torch.bfloat16, layout, DEVICE)
    g = torch.randn(x.shape, device=DEVICE).to(x.dtype).contiguous(memory_format=reference.memory_format(x))
    w, b = norm_params(shape[1], DEVICE)
    for a, b_ in zip(_norms(x, g, w, b), _norms(x, g, w, b)):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_norms_match_cpu_kernels(dtype, layout):
    """The CUDA and CPU kernels agree on the same input (when both are built). Without the
    ReLU: statistics that differ in the last bit may flip the mask of an element whose
    pre-activation is within rounding of zero, a legitimate difference."""
    require("cpp", "group_norm_relu", "cpu", dtype)
    x = make_activation((2, 256, 12, 12), dtype, layout, DEVICE)
    g = torch.randn(x.shape, device=DEVICE).to(dtype).contiguous(memory_format=reference.memory_format(x))
    w, b = norm_params(256, DEVICE)
    cuda = _norms(x, g, w, b, relu=False)
    cpu = _norms(x.cpu(), g.cpu(), w.cpu(), b.cpu(), relu=False)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for a, c in zip(cuda, cpu):
        assert a.dtype == c.dtype and a.shape == c.shape
        torch.testing.assert_close(a.cpu(), c, **tol)


def test_runs_on_the_current_stream():
    """Work launched on a side stream is ordered after what that stream waits for."""
    side = torch.cuda.Stream()
    x = make_activation((8, 256, 28, 28), torch.bfloat16, "channels_last", DEVICE)
    w, b = norm_params(256, DEVICE)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y_gn = torch.ops.bitfast.native_group_norm_relu_fwd(x, w, b, 32, 1e-5, True)[0]
        y_bn = torch.ops.bitfast.native_batch_norm_relu_fwd(x, None, None, w, b, True, 1e-5, True)[0]
    side.synchronize()
    ref_gn = reference.group_norm_relu_forward(x, w, b, 32, 1e-5, True)[0]
    ref_bn = reference.batch_norm_relu_forward(x, None, None, w, b, True, 1e-5, True)[0]
    torch.testing.assert_close(y_gn, ref_gn, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y_bn, ref_bn, rtol=2e-2, atol=2e-2)


def test_auto_prefers_triton_until_validated():
    """auto picks triton (or cuda without triton) for the norms on CUDA while they are in
    backends.CUDA_UNVALIDATED; an explicit backend="cuda" runs the CUDA kernels."""
    for family in ("group_norm_relu", "batch_norm_relu"):
        name = backends.resolve(family, DEVICE, torch.bfloat16, "auto")
        if family in backends.CUDA_UNVALIDATED:
            assert name == ("triton" if not backends.not_supported_reasons("triton", family, DEVICE, torch.bfloat16)
                            else "cuda")
        else:
            assert name == "cuda"
        assert backends.resolve(family, DEVICE, torch.bfloat16, BACKEND) == "cuda"


def test_stat_dtypes():
    """Statistics are float32 for half-precision inputs and float64 for float64 inputs."""
    for dtype in ALL_DTYPES:
        x = make_activation((2, 8, 4, 4), dtype, "nchw", DEVICE)
        _, mean, rstd = torch.ops.bitfast.native_group_norm_relu_fwd(x, None, None, 2, 1e-5, True)
        _, bmean, bvar = torch.ops.bitfast.native_batch_norm_relu_fwd(x, None, None, None, None, True, 1e-5, True)
        assert mean.dtype == rstd.dtype == bmean.dtype == bvar.dtype == stat_dtype(dtype)
