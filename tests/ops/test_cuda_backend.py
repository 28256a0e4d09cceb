"""What only bitfast's CUDA kernels for weight standardization and the SGD step (the
``cuda`` backend, ``bitfast._C_cuda``) have.

The tests that every native backend shares (the cases of tests/ops/_native_cases.py:
parity with the spec in ``bitfast.ops.reference``, opcheck, error messages) are in
test_weight_std.py and test_sgd_momentum.py, parametrized over
``tests/ops/_util.native_backends``. Here: BiT-sized weights (the largest of BiT-R50x1 and
one beyond a block's threads), agreement with the CPU kernel, whole BiT-R50x1 SGD steps
(multi-tensor launches over about 150 tensors) against the reference and the CPU kernel,
the learning rate in a tensor and the moving average over the kernel's vector and scalar
paths, a step captured in a CUDA graph, the current-stream contract, and the backend's
selection. Every test needs a GPU and the CUDA build; they skip otherwise. The norms' are in
test_cuda_backend_norms.py.
"""

from __future__ import annotations

import pytest
import torch

import bitfast
from bitfast import backends
from bitfast.ops import reference
from tests.ops._native_cases import (
    ALL_DTYPES,
    check_sgd,
    check_ws_autograd,
    check_ws_native,
    make_strided,
    random_weight,
    require,
)

DEVICE, BACKEND = "cuda", "cuda"

pytestmark = pytest.mark.cuda

# The weights of BiT-R50x1 where K or O is largest, and one beyond a block's 256 threads x 4
BIT_WS_SHAPES = [
    ((2048, 512, 1, 1), "stage4-conv3"),
    ((512, 512, 3, 3), "stage4-conv2"),
    ((2048, 1024, 1, 1), "stage4-downsample"),
    ((1000, 2048, 1, 1), "head"),
    ((64, 3, 7, 7), "stem"),
]


def bit_r50x1_shapes(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """Parameter shapes of BiT-R50x1 (ResNetV2-50, pre-activation bottlenecks with
    GroupNorm): stem conv, per block GN/conv pairs and a projection in each stage's first
    block, the final GN and the 1x1 conv head. About 25.5M parameters in 153 tensors."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7)]
    in_chs = 64
    for depth, mid in zip((3, 4, 6, 3), (64, 128, 256, 512)):
        out = mid * 4
        for block in range(depth):
            shapes += [(in_chs,), (in_chs,)]  # norm1
            if block == 0:
                shapes.append((out, in_chs, 1, 1))  # downsample
            shapes += [(mid, in_chs, 1, 1), (mid,), (mid,), (mid, mid, 3, 3), (mid,), (mid,), (out, mid, 1, 1)]
            in_chs = out
    shapes += [(in_chs,), (in_chs,), (num_classes, in_chs, 1, 1), (num_classes,)]
    return shapes


@pytest.fixture(autouse=True)
def _needs_cuda():
    require(BACKEND, "weight_standardize", DEVICE)
    require(BACKEND, "sgd_momentum", DEVICE)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,label", BIT_WS_SHAPES, ids=[s[1] for s in BIT_WS_SHAPES])
def test_ws_native_bit_shapes(dtype, shape, label):
    """test_weight_std.py::test_ws_native_parity at BiT's sizes."""
    w = random_weight(shape, dtype, DEVICE)
    check_ws_native(w, torch.randn(shape, device=DEVICE).to(dtype))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_ws_matches_cpu_kernel(dtype):
    """The CUDA and CPU kernels agree on the same BiT weight (when both are built)."""
    require("cpp", "weight_standardize", "cpu", dtype)
    w = random_weight((512, 512, 3, 3), dtype, DEVICE)
    g = torch.randn(w.shape, device=DEVICE).to(dtype)
    out, mean, rstd = torch.ops.bitfast.native_weight_standardize_fwd(w, 1e-8)
    out_c, mean_c, rstd_c = torch.ops.bitfast.native_weight_standardize_fwd(w.cpu(), 1e-8)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.cpu(), mean_c, **tol)
    torch.testing.assert_close(rstd.cpu(), rstd_c, **tol)
    # fp16/bf16 outputs may round differently in the last bit
    low = dtype in (torch.float16, torch.bfloat16)
    torch.testing.assert_close(out.cpu(), out_c, **(dict(rtol=1e-2, atol=1e-2) if low else tol))
    dw = torch.ops.bitfast.native_weight_standardize_bwd(g, w, mean, rstd)
    dw_c = torch.ops.bitfast.native_weight_standardize_bwd(g.cpu(), w.cpu(), mean_c, rstd_c)
    torch.testing.assert_close(dw.cpu(), dw_c, **(dict(rtol=2e-2, atol=2e-2) if low else dict(rtol=1e-4, atol=1e-4)))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,label", BIT_WS_SHAPES[:2], ids=[s[1] for s in BIT_WS_SHAPES[:2]])
def test_ws_autograd_bit_shapes(dtype, shape, label):
    """test_weight_std.py::test_ws_autograd_parity at BiT's sizes."""
    check_ws_autograd(random_weight(shape, dtype, DEVICE), BACKEND)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sgd_bit_r50x1_step(dtype):
    """Five steps over every BiT-R50x1 parameter (two launches of up to 80 tensors each)
    against the float64 reference, as FusedSGD calls it."""
    shapes = bit_r50x1_shapes()
    assert len(shapes) > 96 and sum(torch.Size(s).numel() for s in shapes) > 25_000_000
    opts = dict(momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=False, maximize=False)
    check_sgd(shapes, dtype, DEVICE, BACKEND, opts, steps=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sgd_bit_r50x1_step_lr_tensor_and_ema(dtype):
    """The same with the learning rate in a device tensor and a float32 moving average."""
    opts = dict(momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True, maximize=False)
    check_sgd(bit_r50x1_shapes(), dtype, DEVICE, BACKEND, opts, steps=3, lr_tensor=True, ema_dtype=torch.float32)


@pytest.mark.parametrize(
    "dtype,ema_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32),
     (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float16, torch.float16)],
    ids=str,
)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "offset"])
def test_sgd_lr_tensor_and_ema_parity(dtype, ema_dtype, layout):
    """Vector and scalar paths (aligned, unaligned, working copies) of the kernel with the
    learning rate read on the device and the average in the params' dtype or float32."""
    opts = dict(momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False)
    shapes = [(1,), (7,), (33, 17), (32769,), (300, 70)] if layout == "contiguous" else [(6, 5), (300, 70)]
    check_sgd(shapes, dtype, DEVICE, BACKEND, opts, make=make_strided(layout), lr_tensor=True, ema_dtype=ema_dtype)


def test_sgd_step_captured_in_a_cuda_graph_follows_the_lr_tensor():
    """A step with a tensor lr and an average, captured once in a CUDA graph and replayed
    while the schedule writes into the tensor, equals eager steps with the same values."""
    shapes = [(64, 3, 7, 7), (256,), (33, 17)]
    params = [torch.randn(s, device=DEVICE) for s in shapes]
    grads = [torch.randn(s, device=DEVICE) for s in shapes]
    bufs = [torch.zeros(s, device=DEVICE) for s in shapes]
    emas = [p.clone() for p in params]
    eager = [[t.clone() for t in ts] for ts in (params, bufs, emas)]
    lr_t = torch.tensor(0.1, device=DEVICE)

    def step(ps, bs, es, lr):
        bitfast.ops.sgd_momentum_(ps, grads, bs, lr=lr, momentum=0.9, weight_decay=1e-4, ema_params=es,
                                  ema_decay=0.9, backend=BACKEND)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs ask
        step(params, bufs, emas, lr_t)
    torch.cuda.current_stream().wait_stream(side)
    step(*eager, 0.1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(params, bufs, emas, lr_t)
    for lr in (0.05, 0.02, 0.01):
        lr_t.fill_(lr)
        graph.replay()
        step(*eager, float(lr_t))
    torch.cuda.synchronize()
    for a, b in zip(params + bufs + emas, eager[0] + eager[1] + eager[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sgd_bit_r50x1_matches_cpu_kernel():
    require("cpp", "sgd_momentum", "cpu")
    shapes = bit_r50x1_shapes()
    params = [torch.randn(s, device=DEVICE) for s in shapes]
    bufs = [torch.randn(s, device=DEVICE) for s in shapes]
    grads = [torch.randn(s, device=DEVICE) for s in shapes]
    emas = [torch.randn(s, device=DEVICE) for s in shapes]
    params_c, bufs_c, grads_c, emas_c = ([t.cpu() for t in ts] for ts in (params, bufs, grads, emas))
    args = (0.1, 0.9, 0.0, 1e-4, True, False, False)
    torch.ops.bitfast.native_sgd_momentum_(params, grads, bufs, *args, None, [], 0.0)
    torch.ops.bitfast.native_sgd_momentum_(params_c, grads_c, bufs_c, *args, None, [], 0.0)
    for a, b in zip(params + bufs, params_c + bufs_c):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-6)
    lr_t = torch.tensor(0.05, device=DEVICE)
    torch.ops.bitfast.native_sgd_momentum_(params, grads, bufs, *args, lr_t, emas, 0.99)
    torch.ops.bitfast.native_sgd_momentum_(params_c, grads_c, bufs_c, *args, lr_t.cpu(), emas_c, 0.99)
    for a, b in zip(params + bufs + emas, params_c + bufs_c + emas_c):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-6)


def test_runs_on_the_current_stream():
    """Work launched on a side stream is ordered after what that stream waits for."""
    side = torch.cuda.Stream()
    w = random_weight((512, 512, 3, 3), torch.float32, DEVICE)
    p, g, buf = (torch.randn(1 << 20, device=DEVICE) for _ in range(3))
    p64, g64, b64 = p.double(), g.double(), buf.double()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, _, _ = torch.ops.bitfast.native_weight_standardize_fwd(w, 1e-8)
        torch.ops.bitfast.native_sgd_momentum_([p], [g], [buf], 0.1, 0.9, 0.0, 0.0, False, False, False, None, [], 0.0)
    side.synchronize()
    torch.testing.assert_close(out, reference.weight_standardize_forward(w, 1e-8)[0], rtol=1e-5, atol=1e-5)
    reference.sgd_momentum_([p64], [g64], [b64], 0.1, 0.9, 0.0, 0.0, False, False, False)
    torch.testing.assert_close(p, p64.float(), rtol=1e-6, atol=1e-6)


def test_backend_is_available_with_a_gpu():
    """On a GPU machine with the CUDA build, auto picks the cuda backend for these ops."""
    assert "cuda" in bitfast.available_backends()
    for family in ("weight_standardize", "sgd_momentum"):
        assert backends.resolve(family, "cuda", torch.float32, "auto") == "cuda"
