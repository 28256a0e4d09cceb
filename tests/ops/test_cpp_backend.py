"""Parity of bitfast's native CPU kernels (the ``cpp`` backend, ``bitfast._C``) with the
spec in ``bitfast.ops.reference``.

Covers the native ops themselves (``torch.ops.bitfast.native_*``) and the public API with
``backend="cpp"``: weight standardization forward and backward (fp32, fp64, bf16, fp16;
BiT and edge shapes; non-contiguous weights and gradients; autograd and fp64 gradcheck) and
the SGD step over many steps for every option combination; GroupNorm+ReLU and
BatchNorm+ReLU forward and backward (every dtype, NCHW, channels_last and other layouts,
float32 parameters with half-precision inputs, with and without affine and ReLU, training
and eval, the running-statistics update, reproducibility across thread counts); all against a float64 evaluation of
the reference with PyTorch's own math in the same dtype as the error baseline (the
tolerance rule of tests/ops/_util.py); ``torch.library.opcheck`` of the native ops; and the
error messages of bad calls.

The shared cases and checks live in tests/ops/_native_cases.py; test_cuda_backend.py runs
them on the ``cuda`` backend.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import bitfast
from bitfast.ops import reference
from tests.ops._native_cases import (
    ALL_DTYPES,
    BN_SHAPES,
    EPS,
    GN_SHAPES,
    NORM_LAYOUTS,
    SGD_OPTIONS,
    WS_SHAPES,
    check_bn_native,
    check_bn_update_stats,
    check_gn_native,
    check_norm_errors,
    check_sgd,
    check_sgd_matches_torch_optim,
    check_ws_autograd,
    check_ws_native,
    layouts,
    make_activation,
    make_strided,
    norm_params,
    opcheck_norms,
    opcheck_sgd,
    opcheck_ws,
    random_weight,
    require,
    run_in_child,
)

DEVICE, BACKEND = "cpu", "cpp"


@pytest.fixture(autouse=True)
def _needs_cpp():
    for family in ("weight_standardize", "sgd_momentum", "group_norm_relu", "batch_norm_relu"):
        require(BACKEND, family, DEVICE)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,label", WS_SHAPES, ids=[s[1] for s in WS_SHAPES])
def test_ws_native_parity(dtype, shape, label):
    w = random_weight(shape, dtype, DEVICE)
    check_ws_native(w, torch.randn(shape).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_ws_native_non_contiguous(dtype, layout):
    w = layouts(random_weight((32, 16, 3, 3), dtype, DEVICE))[layout]
    g = layouts(torch.randn(32, 16, 3, 3).to(dtype))[layout]
    assert not w.is_contiguous()
    check_ws_native(w, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("w_layout,g_layout", [("channels_last", "contiguous"), ("contiguous", "channels_last")])
def test_ws_native_gradient_in_another_layout(dtype, w_layout, g_layout):
    # the gradient comes in w's layout whatever the incoming gradient's
    w = layouts(random_weight((32, 16, 3, 3), dtype, DEVICE))[w_layout]
    g = layouts(torch.randn(32, 16, 3, 3).to(dtype))[g_layout]
    check_ws_native(w, g)


def test_ws_autograd_channels_last():
    check_ws_autograd(random_weight((64, 32, 3, 3), torch.float32, DEVICE).contiguous(memory_format=torch.channels_last), BACKEND)


@pytest.mark.parametrize("eps", [1e-10, 1e-5, 0.5])
def test_ws_native_eps(eps):
    w = random_weight((16, 8, 3, 3), torch.float32, DEVICE)
    check_ws_native(w, torch.randn(16, 8, 3, 3), eps)


def test_ws_native_constant_rows_are_finite():
    w = torch.zeros(4, 3, 3, 3)
    w[1] = 0.5
    w[2] = -3.0
    w[3] = torch.randn(3, 3, 3)
    for dtype in ALL_DTYPES:
        out, mean, rstd = torch.ops.bitfast.native_weight_standardize_fwd(w.to(dtype), EPS)
        dw = torch.ops.bitfast.native_weight_standardize_bwd(torch.ones(w.shape, dtype=dtype), w.to(dtype), mean, rstd)
        assert torch.isfinite(out).all() and torch.isfinite(dw).all(), dtype
        assert (out[:3] == 0).all(), dtype


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,label", WS_SHAPES[:4], ids=[s[1] for s in WS_SHAPES[:4]])
def test_ws_autograd_parity(dtype, shape, label):
    check_ws_autograd(random_weight(shape, dtype, DEVICE), BACKEND)


def test_ws_autograd_non_contiguous():
    w = torch.randn(3, 3, 12, 16).permute(3, 2, 0, 1)  # (16, 12, 3, 3)
    check_ws_autograd(w, BACKEND)


def test_ws_gradcheck_float64():
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: bitfast.ops.weight_standardize(t, 1e-5, backend=BACKEND), (w,))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_sgd_parity(dtype, opts):
    # sizes around the vector width and the kernel's 16384-element chunk
    shapes = [(1,), (7,), (33, 17), (64, 3, 7, 7), (16389,), (256, 64, 1, 1)]
    check_sgd(shapes, dtype, DEVICE, BACKEND, opts)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sgd_native_op_parity(dtype):
    opts = dict(momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True, maximize=False)
    check_sgd([(5,), (40000,), (64, 3, 7, 7)], dtype, DEVICE, BACKEND, opts, native=True)


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced", "offset"])
def test_sgd_non_contiguous(layout):
    opts = dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=False)
    shapes = [(6, 5), (64, 3, 7, 7), (300, 70)]
    check_sgd(shapes, torch.float32, DEVICE, BACKEND, opts, make=make_strided(layout))


def test_sgd_mixed_layouts():
    """A grad and a buffer laid out unlike their channels_last parameter."""
    p = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    g, buf = torch.randn(8, 4, 3, 3), torch.randn(3, 3, 4, 8).permute(3, 2, 0, 1)
    p64, g64, b64 = p.double(), g.double(), buf.double()
    torch.ops.bitfast.native_sgd_momentum_([p], [g], [buf], 0.1, 0.9, 0.0, 0.01, True, False, False, None, [], 0.0)
    reference.sgd_momentum_([p64], [g64], [b64], 0.1, 0.9, 0.0, 0.01, True, False, False)
    assert p.is_contiguous(memory_format=torch.channels_last) and buf.stride() == (1, 8, 96, 32)
    torch.testing.assert_close(p, p64.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(buf, b64.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_sgd_matches_torch_optim(opts):
    check_sgd_matches_torch_optim(DEVICE, BACKEND, opts)


def test_sgd_empty_list_and_zero_size():
    # an empty list has no device to dispatch on: the public API returns before the op
    bitfast.ops.sgd_momentum_([], [], [], lr=0.1, momentum=0.9, backend=BACKEND)
    p, g = torch.randn(0, 3), torch.randn(0, 3)
    torch.ops.bitfast.native_sgd_momentum_([p], [g], [], 0.1, 0.0, 0.0, 0.0, False, False, False, None, [], 0.0)
    e = torch.randn(0, 3)
    torch.ops.bitfast.native_sgd_momentum_([p], [g], [], 0.1, 0.0, 0.0, 0.0, False, False, False, None, [e], 0.5)


def test_sgd_without_momentum_ignores_buffers():
    p, g, buf = torch.randn(10), torch.randn(10), torch.randn(10)
    expect, buf0 = p - 0.1 * g, buf.clone()
    torch.ops.bitfast.native_sgd_momentum_([p], [g], [buf], 0.1, 0.0, 0.0, 0.0, False, False, False, None, [], 0.0)
    torch.testing.assert_close(p, expect)
    assert torch.equal(buf, buf0)


@pytest.mark.parametrize(
    "dtype,ema_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32),
     (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float16, torch.float16)],
    ids=str,
)
@pytest.mark.parametrize("opts", SGD_OPTIONS[::5], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_sgd_lr_tensor_and_ema_parity(dtype, ema_dtype, opts):
    """The learning rate in a tensor and the moving average (in the params' dtype or float32),
    through the public API and the native op, sizes around the chunk and block sizes."""
    shapes = [(1,), (7,), (33, 17), (1025,), (16389,), (256, 64, 1, 1)]
    check_sgd(shapes, dtype, DEVICE, BACKEND, opts, lr_tensor=True, ema_dtype=ema_dtype)
    check_sgd(shapes[:3], dtype, DEVICE, BACKEND, opts, native=True, ema_dtype=ema_dtype, steps=4)


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_sgd_ema_non_contiguous(layout):
    opts = dict(momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False)
    check_sgd([(6, 5), (8, 4, 3, 3), (300, 70)], torch.bfloat16, DEVICE, BACKEND, opts, make=make_strided(layout),
              lr_tensor=True, ema_dtype=torch.float32)


def test_sgd_lr_tensor_equals_float_lr_bitwise():
    """The kernel reads the tensor: the same float32 value gives bitwise the same step."""
    for dtype in ALL_DTYPES:
        p = [torch.randn(s, device=DEVICE).to(dtype) for s in [(3,), (40000,), (7, 9)]]
        q = [t.clone() for t in p]
        g = [torch.randn_like(t) for t in p]
        m, n = [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p]
        lr_t = torch.tensor(0.03, device=DEVICE)
        args = (0.9, 0.0, 1e-3, True, False, True)
        torch.ops.bitfast.native_sgd_momentum_(p, g, m, float(lr_t), *args, None, [], 0.0)
        torch.ops.bitfast.native_sgd_momentum_(q, g, n, 123.0, *args, lr_t, [], 0.0)  # the tensor wins
        for a, b in zip(p + m, q + n):
            assert torch.equal(a, b), dtype


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", NORM_LAYOUTS)
@pytest.mark.parametrize("shape,groups,label", GN_SHAPES, ids=[s[2] for s in GN_SHAPES])
def test_gn_native_parity(dtype, layout, shape, groups, label):
    x = make_activation(shape, dtype, layout, DEVICE)
    weight, bias = norm_params(shape[1], DEVICE)
    check_gn_native(x, weight.to(dtype), bias.to(dtype), groups, relu=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_gn_native_options(layout, relu, affine):
    x = make_activation((3, 24, 5, 6), torch.float32, layout, DEVICE)
    check_gn_native(x, *norm_params(24, DEVICE, affine=affine), 6, relu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_norms_native_short_row_blocks(dtype, relu):
    """The NCHW backward sums of short rows, 16 rows at a time (two GroupNorm groups of 32
    rows of 4x4; a BatchNorm channel of 17 rows: one block and one row), with and without
    the ReLU."""
    x = make_activation((2, 64, 4, 4), dtype, "nchw", DEVICE)
    weight, bias = norm_params(64, DEVICE)
    check_gn_native(x, weight.to(dtype), bias.to(dtype), 2, relu)
    x = make_activation((17, 8, 4, 4), dtype, "nchw", DEVICE)
    weight, bias = norm_params(8, DEVICE)
    check_bn_native(x, None, None, weight.to(dtype), bias.to(dtype), True, relu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("hw", [(3, 5), (4, 4), (1, 17), (3, 11), (7, 7), (3, 21), (8, 8), (5, 51), (16, 16)],
                         ids=lambda hw: f"L{hw[0] * hw[1]}")
def test_norms_native_short_row_lengths(dtype, relu, hw):
    """NCHW rows of 16 to 255 elements (BatchNorm's statistics), GroupNorm groups of 16 to
    1024 elements (their statistics) and bf16 rows of 16 to 63 (the affine pass and the
    backward's dx of both norms) are taken a whole vector of 16 at a time, with one more vector that overlaps the last whole one when the length is not a
    multiple of 16; shorter and longer rows take the loops of other shapes. Each length
    against the reference, and bf16 bitwise the float32 kernels on the widened values."""
    shape = (5, 8, *hw)  # BatchNorm: 5 rows per channel; GroupNorm: groups of 4 rows
    x = make_activation(shape, dtype, "nchw", DEVICE)
    weight, bias = norm_params(8, DEVICE)
    check_gn_native(x, weight.to(dtype), bias.to(dtype), 2, relu)
    check_bn_native(x, None, None, weight.to(dtype), bias.to(dtype), True, relu)
    if dtype == torch.bfloat16:
        ops = torch.ops.bitfast
        g = torch.randn(shape).to(dtype)
        gn, gnf = (ops.native_group_norm_relu_fwd(v, weight, bias, 2, 1e-5, relu) for v in (x, x.float()))
        bn, bnf = (ops.native_batch_norm_relu_fwd(v, None, None, weight, bias, True, 1e-5, relu) for v in (x, x.float()))
        for half, full in (
            (gn, gnf),
            (bn, bnf),
            (ops.native_group_norm_relu_bwd(g, x, weight, bias, gn[1], gn[2], 2, relu),
             ops.native_group_norm_relu_bwd(g.float(), x.float(), weight, bias, gnf[1], gnf[2], 2, relu)),
            (ops.native_batch_norm_relu_bwd(g, x, weight, bias, bn[1], bn[2], True, 1e-5, relu),
             ops.native_batch_norm_relu_bwd(g.float(), x.float(), weight, bias, bnf[1], bnf[2], True, 1e-5, relu)),
        ):
            for h, f in zip(half, full):
                assert torch.equal(h, f.to(h.dtype))


def test_short_row_lengths_without_the_vector_loops():
    """The short-row loops run on CPUs with AVX2; the others (and other architectures) keep
    the plain loops. $BITFAST_CPU_SHORT_ROWS_IN_VECTORS=0 forces those, here in a child
    process that runs test_norms_native_short_row_lengths."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, BITFAST_CPU_SHORT_ROWS_IN_VECTORS="0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::test_norms_native_short_row_lengths"]
    child = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-4000:]
    assert re.search(r"\b36 passed", child.stdout), child.stdout[-2000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gn_native_float32_params(dtype, layout):
    """Half-precision activations with float32 parameters (autocast); the parameter
    gradients come back in float32."""
    x = make_activation((2, 32, 6, 6), dtype, layout, DEVICE)
    check_gn_native(x, *norm_params(32, DEVICE), 8, relu=True)


@pytest.mark.parametrize("eps", [1e-10, 1e-5, 0.5])
def test_gn_native_eps(eps):
    check_gn_native(make_activation((2, 16, 4, 4), torch.float32, "nchw", DEVICE), *norm_params(16, DEVICE), 4,
                    True, eps)


def test_gn_native_constant_groups_are_finite():
    x = torch.zeros(2, 8, 3, 3)
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


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", NORM_LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,label", BN_SHAPES, ids=[s[1] for s in BN_SHAPES])
def test_bn_native_parity(dtype, layout, training, shape, label):
    c = shape[1]
    x = make_activation(shape, dtype, layout, DEVICE)
    rm, rv = torch.randn(c) * 0.1, torch.rand(c) + 0.5
    weight, bias = norm_params(c, DEVICE)
    check_bn_native(x, rm, rv, weight.to(dtype), bias.to(dtype), training, relu=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_native_options(layout, relu, affine, training):
    x = make_activation((3, 24, 5, 6), torch.float32, layout, DEVICE)
    rm, rv = (None, None) if training and affine else (torch.randn(24) * 0.1, torch.rand(24) + 0.5)
    check_bn_native(x, rm, rv, *norm_params(24, DEVICE, affine=affine), training, relu)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_native_float32_params(dtype, layout):
    x = make_activation((4, 16, 5, 5), dtype, layout, DEVICE)
    check_bn_native(x, torch.zeros(16), torch.ones(16), *norm_params(16, DEVICE), True, True)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_bn_native_update_stats(dtype):
    check_bn_update_stats(DEVICE, dtype)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("c,hw", [(256, 12), (2048, 4)], ids=["blocks", "whole-groups"])
def test_norms_reproducible_across_thread_counts(layout, n, c, hw):
    """Fixed blocks and fixed-order sums: one thread and all threads give the same bits
    (with one sample, channels_last GroupNorm takes its per-sample path on one thread and
    its channel-range path on several; 2048 channels at 4x4 take whole groups per task)."""
    x = make_activation((n, c, hw, hw), torch.float32, layout, DEVICE)
    g = torch.randn(x.shape).contiguous(memory_format=reference.memory_format(x))
    w, b = norm_params(c, DEVICE)

    def run():
        out = torch.ops.bitfast.native_group_norm_relu_fwd(x, w, b, 32, 1e-5, True)
        out += torch.ops.bitfast.native_group_norm_relu_bwd(g, x, w, b, out[1], out[2], 32, True)
        bn = torch.ops.bitfast.native_batch_norm_relu_fwd(x, None, None, w, b, True, 1e-5, True)
        bn += torch.ops.bitfast.native_batch_norm_relu_bwd(g, x, w, b, bn[1], bn[2], True, 1e-5, True)
        return out + bn

    threads = torch.get_num_threads()
    many = run()
    torch.set_num_threads(1)
    try:
        one = run()
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(many, one):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gn_group_tasks_match_single_groups(dtype):
    """channels_last GroupNorm of a single sample with small groups takes several groups per
    task (four 24-channel groups: whole 32-lane vectors); each group's outputs and gradients
    are bitwise those of the same channels normalized as one group on their own."""
    n, c, h, w_, groups = 1, 768, 14, 14, 32
    x = make_activation((n, c, h, w_), dtype, "channels_last", DEVICE)
    g = torch.randn(x.shape).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = norm_params(c, DEVICE)
    ops = torch.ops.bitfast
    y, m, r = ops.native_group_norm_relu_fwd(x, w, b, groups, 1e-5, True)
    dx, dw, db = ops.native_group_norm_relu_bwd(g, x, w, b, m, r, groups, True)
    cg = c // groups
    for k in (0, 5, groups - 1):
        sl = slice(k * cg, (k + 1) * cg)
        xs = x[:, sl].contiguous(memory_format=torch.channels_last)
        gs = g[:, sl].contiguous(memory_format=torch.channels_last)
        ys, ms, rs = ops.native_group_norm_relu_fwd(xs, w[sl], b[sl], 1, 1e-5, True)
        assert torch.equal(ys, y[:, sl]) and torch.equal(ms[:, 0], m[:, k]) and torch.equal(rs[:, 0], r[:, k])
        dxs, dws, dbs = ops.native_group_norm_relu_bwd(gs, xs, w[sl], b[sl], ms, rs, 1, True)
        assert torch.equal(dxs, dx[:, sl]) and torch.equal(dws, dw[sl]) and torch.equal(dbs, db[sl])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "shape,groups",
    [((2, 1024, 14, 14), 32), ((2, 64, 28, 28), 32), ((1, 768, 14, 14), 32), ((16, 512, 4, 4), 32), ((3, 48, 9, 7), 1)],
    ids=["per-sample", "blocks", "whole-groups", "many-samples", "one-group"],
)
def test_half_kernels_are_the_float32_kernels_rounded(dtype, layout, shape, groups):
    """fp16/bf16 inputs run the float32 kernels' arithmetic on their exactly widened values
    and round each output once: bitwise the float32 kernels' results on x.float(), rounded
    (bf16 channels_last reads and writes bf16 in place; the others go through float buffers;
    both must agree with this). GroupNorm, GroupNorm with the residual add, BatchNorm."""
    x = make_activation(shape, dtype, layout, DEVICE)
    x2 = make_activation(shape, dtype, layout, DEVICE)
    fmt = reference.memory_format(x)
    g = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    gs = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    w, b = norm_params(shape[1], DEVICE)
    rm, rv = torch.randn(shape[1]) * 0.1, torch.rand(shape[1]) + 0.5
    ops = torch.ops.bitfast

    def same(half, full):
        for h, f in zip(half, full):
            assert torch.equal(h, f.to(h.dtype)) and h.stride() == f.stride()

    y, m, r = ops.native_group_norm_relu_fwd(x, w, b, groups, 1e-5, True)
    yf, mf, rf = ops.native_group_norm_relu_fwd(x.float(), w, b, groups, 1e-5, True)
    same((y, m, r), (yf, mf, rf))
    same(ops.native_group_norm_relu_bwd(g, x, w, b, m, r, groups, True),
         ops.native_group_norm_relu_bwd(g.float(), x.float(), w, b, mf, rf, groups, True))
    s, ya, ma, ra = ops.native_group_norm_relu_add_fwd(x, x2, w, b, groups, 1e-5, True)
    assert torch.equal(s, (x + x2).contiguous(memory_format=fmt))
    same((ya, ma, ra), ops.native_group_norm_relu_fwd(s.float(), w, b, groups, 1e-5, True))
    same(ops.native_group_norm_relu_add_bwd(g, gs, s, w, b, ma, ra, groups, True),
         ops.native_group_norm_relu_add_bwd(g.float(), gs.float(), s.float(), w, b, ma, ra, groups, True))
    for training in (True, False):
        bn = ops.native_batch_norm_relu_fwd(x, rm, rv, w, b, training, 1e-5, True)
        bnf = ops.native_batch_norm_relu_fwd(x.float(), rm, rv, w, b, training, 1e-5, True)
        same(bn, bnf)
        same(ops.native_batch_norm_relu_bwd(g, x, w, b, bn[1], bn[2], training, 1e-5, True),
             ops.native_batch_norm_relu_bwd(g.float(), x.float(), w, b, bnf[1], bnf[2], training, 1e-5, True))


def test_gn_gradcheck_float64_native():
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for inp in (x, xl):
        assert torch.autograd.gradcheck(
            lambda a, ww, bb: bitfast.ops.group_norm_relu(a, 3, ww, bb, backend=BACKEND), (inp, w, b)
        )


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_ws(layout, dtype):
    opcheck_ws(DEVICE, layout, dtype)


@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_opcheck_sgd(non_contiguous, momentum):
    opcheck_sgd(DEVICE, non_contiguous, momentum)


@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contig", "noncontig"])
def test_opcheck_sgd_lr_tensor_and_ema(non_contiguous):
    opcheck_sgd(DEVICE, non_contiguous, 0.9, lr_tensor_and_ema=True)


def test_errors():
    run_in_child("tests.ops._native_cases", "check_errors", DEVICE)


@pytest.mark.parametrize("layout", NORM_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_norms(layout, dtype):
    opcheck_norms(DEVICE, layout, dtype)


def test_norm_errors():
    check_norm_errors(DEVICE)


def test_sums_in_registers_match_the_arrays(tmp_path):
    """The backward sums of short rows have two versions, picked by the CPU (accumulators
    in vector registers for AVX2-only CPUs, in arrays otherwise); both give the same
    gradients. $BITFAST_CPU_SUMS_IN_REGISTERS forces either, in a child process each."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    results = []
    for regs in ("0", "1"):
        path = str(tmp_path / f"regs{regs}.pt")
        code = f"import tests.ops._native_cases as m; m.short_row_backward_outputs({path!r})"
        env = dict(os.environ, BITFAST_CPU_SUMS_IN_REGISTERS=regs)
        child = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                               timeout=600)
        assert child.returncode == 0, child.stderr[-4000:]
        results.append(torch.load(path))
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        for a, b in zip(results[0][key], results[1][key]):
            assert torch.equal(a, b), key
