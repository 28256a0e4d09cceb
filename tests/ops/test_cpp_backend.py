"""What only bitfast's native CPU kernels (the ``cpp`` backend, ``bitfast._C``) have.

The tests that every native backend shares (parity of the native ops and of the public API
with ``backend="cpp"`` against the spec in ``bitfast.ops.reference``, opcheck, error
messages) are in the per-op files, parametrized over ``tests/ops/_util.native_backends``:
test_weight_std.py, test_sgd_momentum.py, test_group_norm_relu.py and
test_batch_norm_relu.py. Here: the SGD step with the learning rate in a tensor and the
moving average at sizes around this kernel's chunk; GroupNorm and BatchNorm on short NCHW
rows (the vector loops, also forced off with $BITFAST_CPU_SHORT_ROWS_IN_VECTORS=0, and the
backward sums in registers or in arrays with $BITFAST_CPU_SUMS_IN_REGISTERS); bitwise
reproducibility across thread counts; channels_last GroupNorm with several groups per
task; and half-precision inputs that give bitwise the float32 kernels' results, rounded.
Parity is against a float64 evaluation of the reference with PyTorch's own math in the same
dtype as the error baseline (the tolerance rule of tests/ops/_util.py), with the cases of
tests/ops/_native_cases.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from bitfast.ops import reference
from tests.ops._native_cases import (
    SGD_OPTIONS,
    check_bn_native,
    check_gn_native,
    check_sgd,
    make_activation,
    norm_params,
    require,
)

DEVICE, BACKEND = "cpu", "cpp"


@pytest.fixture(autouse=True)
def _needs_cpp():
    for family in ("weight_standardize", "sgd_momentum", "group_norm_relu", "batch_norm_relu"):
        require(BACKEND, family, DEVICE)


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
