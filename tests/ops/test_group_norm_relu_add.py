"""The residual add fused with GroupNorm+ReLU (``bitfast.ops.group_norm_relu_add``) on
every backend: parity of both outputs and of the gradients of a, b, weight and bias with
``F.group_norm`` applied to ``a + b`` in float64 (and PyTorch's own error in the dtype as
the tolerance), opcheck, torch.compile and the argument checks."""

import pytest
import torch
import torch.nn.functional as F

import bitfast
from tests.ops._util import (
    DTYPES,
    REFERENCE_OP,
    assert_parity,
    device_backends,
    require_backend,
)

FAMILY = "group_norm_relu_add"

# (N, C, H, W, G, label)
SHAPES = [
    (1, 2, 3, 3, 1, "minimal"),
    (2, 6, 5, 3, 1, "one-group"),
    (3, 40, 7, 9, 8, "non-pow2-odd-spatial"),
    (1, 64, 7, 7, 32, "bit-groups"),
    (2, 1024, 4, 4, 16, "whole-groups"),
]
LAYOUTS = ["nchw", "channels_last"]


def fused(backend):
    """``(s, y)`` of the fused op on ``backend`` (REFERENCE_OP: the registered op with the
    reference's explicit forward/backward formulas)."""
    if backend == REFERENCE_OP:
        def f(a, b, num_groups, weight=None, bias=None, eps=1e-5, relu=True):
            s, y, _, _ = torch.ops.bitfast.group_norm_relu_add_fwd(a, b, weight, bias, num_groups, eps, relu, "reference")
            return s, y
        return f
    return lambda *a, **kw: bitfast.ops.group_norm_relu_add(*a, backend=backend, **kw)


def _make(shape, dtype, layout, device, scale=1.0, shift=0.0):
    x = (torch.randn(*shape, device=device) * scale + shift).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _run(fn, tensors, gs, gy):
    """Outputs of ``fn(*tensors)`` and the gradients of ``sum(s * gs) + sum(y * gy)``."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    s, y = fn(*leaves)
    loss = (s.double() * gs.double()).sum() + (y.double() * gy.double()).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return s.detach(), y.detach(), grads


def _torch_op(groups, eps, relu):
    def f(a, b, w, bias):
        s = a + b
        out = F.group_norm(s, groups, w.to(s.dtype) if w is not None else None,
                           bias.to(s.dtype) if bias is not None else None, eps)
        return s, (F.relu(out) if relu else out)
    return f


def _cases():
    # Every shape in both layouts with the ReLU; plain GroupNorm (relu=False) on one shape
    # in both layouts (the kernels branch on it in one place), to bound CI time.
    for *shape, label in SHAPES:
        for layout in LAYOUTS:
            for relu in (True, False):
                if not relu and label != "non-pow2-odd-spatial":
                    continue
                yield pytest.param(*shape, layout, relu, id=f"{label}-{layout}-{'relu' if relu else 'norelu'}")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c,h,w,groups,layout,relu", list(_cases()))
def test_group_norm_relu_add_parity(device, backend, dtype, n, c, h, w, groups, layout, relu):
    require_backend(backend, FAMILY, device, dtype)
    shape = (n, c, h, w)
    a = _make(shape, dtype, layout, device, 1.5, 0.3)
    b = _make(shape, dtype, layout, device, 0.7, -0.1)
    weight = torch.randn(c, device=device) * 0.5 + 1.0
    bias = torch.randn(c, device=device) * 0.5
    gs, gy = torch.randn(shape, device=device), torch.randn(shape, device=device)
    eps = 1e-5

    s, y, grads = _run(lambda *t: fused(backend)(t[0], t[1], groups, t[2], t[3], eps, relu), (a, b, weight, bias), gs, gy)
    for name, out in (("sum", s), ("y", y)):
        assert out.dtype == dtype and out.shape == a.shape, name
        if layout == "channels_last" and c > 1 and h * w > 1:
            assert out.is_contiguous(memory_format=torch.channels_last), f"{name} must keep channels_last"
    if layout == "channels_last" and backend != "reference":
        assert grads[0].is_contiguous(memory_format=torch.channels_last), "grad must keep channels_last"
    # The sum is exactly a + b in the dtype, and a and b get the same gradient.
    torch.testing.assert_close(s, a + b, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)

    op = _torch_op(groups, eps, relu)
    s64, y64, grads64 = _run(op, (a.double(), b.double(), weight.double(), bias.double()), gs, gy)
    # PyTorch's own ops with everything in the dtype (what an eager low-precision model runs).
    sb, yb, gradsb = _run(op, (a, b, weight.to(dtype), bias.to(dtype)), gs, gy)
    assert_parity(s, s64, sb, dtype, f"{backend} sum")
    assert_parity(y, y64, yb, dtype, f"{backend} y")
    for name, g, r, gb in zip(("a", "b", "weight", "bias"), grads, grads64, gradsb):
        assert_parity(g, r, gb, dtype, f"{backend} grad {name}")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("use", ["y-only", "sum-only"])
def test_one_output_used_no_affine(device, backend, use):
    """Gradients when only one output reaches the loss, and without affine parameters."""
    require_backend(backend, FAMILY, device, torch.float32)
    a = torch.randn(2, 8, 4, 5, device=device, requires_grad=True)
    b = torch.randn(2, 8, 4, 5, device=device, requires_grad=True)
    s, y = fused(backend)(a, b, 4)
    out = y if use == "y-only" else s
    ga, gb = torch.autograd.grad(out, (a, b), torch.ones_like(out) * 0.5 + torch.arange(5.0, device=device))
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    s64 = a64 + b64
    y64 = F.relu(F.group_norm(s64, 4))
    out64 = y64 if use == "y-only" else s64
    ga64, gb64 = torch.autograd.grad(out64, (a64, b64), torch.ones_like(out64) * 0.5 + torch.arange(5.0, device=device))
    assert_parity(y, y64, None, torch.float32, "y")
    assert_parity(ga, ga64, None, torch.float32, "grad a")
    assert_parity(gb, gb64, None, torch.float32, "grad b")


@pytest.mark.parametrize("device,backend", device_backends())
def test_mixed_dtype_params(device, backend):
    """bfloat16 activations with float32 affine parameters, as under autocast."""
    require_backend(backend, FAMILY, device, torch.bfloat16)
    a = torch.randn(2, 32, 6, 6, device=device).to(torch.bfloat16).requires_grad_()
    b = torch.randn(2, 32, 6, 6, device=device).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(32, device=device, requires_grad=True)
    bias = torch.randn(32, device=device, requires_grad=True)
    s, y = fused(backend)(a, b, 8, weight, bias)
    assert s.dtype == y.dtype == torch.bfloat16
    ga, gb, gw, gbias = torch.autograd.grad(y, (a, b, weight, bias), torch.ones_like(y))
    assert ga.dtype == torch.bfloat16 and gw.dtype == torch.float32 and gbias.dtype == torch.float32
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    s_ref = (a + b).detach().double().requires_grad_()
    w64, b64 = (t.detach().double().requires_grad_() for t in (weight, bias))
    y64 = F.relu(F.group_norm(s_ref, 8, w64, b64))
    grads64 = torch.autograd.grad(y64, (s_ref, w64, b64), torch.ones_like(y64))
    assert_parity(y, y64, None, torch.bfloat16, "forward")
    for g, r in zip((ga, gw, gbias), grads64):
        assert_parity(g, r, None, torch.bfloat16, "grad")


@pytest.mark.parametrize("device,backend", device_backends())
def test_float64_gradcheck(device, backend):
    require_backend(backend, FAMILY, device, torch.float64)
    a = torch.randn(1, 4, 2, 3, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 4, 2, 3, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: fused(backend)(t[0], t[1], 2, t[2], t[3]), (a, b, w, bias))


# ----------------------------------------------------------------------------------------
# torch.library checks and torch.compile
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize(
    "layout,requires_grad", [("nchw", True), ("channels_last", True), ("non_contiguous", False)]
)
def test_opcheck(backend, layout, requires_grad):
    require_backend(backend, FAMILY, "cpu", torch.float32)

    def make():
        x = torch.randn(2, 4, 3, 3)
        if layout == "channels_last":
            return x.contiguous(memory_format=torch.channels_last)
        if layout == "non_contiguous":
            return x.transpose(-1, -2).contiguous().transpose(-1, -2)
        return x

    a, b = make().requires_grad_(requires_grad), make().requires_grad_(requires_grad)
    w = torch.randn(4, requires_grad=requires_grad)
    bias = torch.randn(4, requires_grad=requires_grad)
    fwd = torch.ops.bitfast.group_norm_relu_add_fwd.default
    torch.library.opcheck(fwd, (a, b, w, bias, 2, 1e-5, True, backend))
    if not requires_grad:
        torch.library.opcheck(fwd, (a, b, None, None, 1, 1e-5, False, backend))
    s, _, mean, rstd = fwd(a.detach(), b.detach(), w.detach(), bias.detach(), 2, 1e-5, True, backend)
    bwd = torch.ops.bitfast.group_norm_relu_add_bwd.default
    gy, gs = make(), make()
    torch.library.opcheck(bwd, (gy, gs, s, w.detach(), bias.detach(), mean, rstd, 2, True, backend))
    torch.library.opcheck(bwd, (gy, None, s, None, None, mean, rstd, 2, True, backend))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_bwd_op_without_grad_sum_is_group_norm_relu_bwd(backend):
    """grad_sum=None gives exactly group_norm_relu_bwd's gradients."""
    require_backend(backend, FAMILY, "cpu", torch.float32)
    require_backend(backend, "group_norm_relu", "cpu", torch.float32)
    s, w, bias, gy = torch.randn(2, 8, 5, 5), torch.randn(8), torch.randn(8), torch.randn(2, 8, 5, 5)
    _, mean, rstd = torch.ops.bitfast.group_norm_relu_fwd(s, w, bias, 4, 1e-5, True, backend)
    got = torch.ops.bitfast.group_norm_relu_add_bwd(gy, None, s, w, bias, mean, rstd, 4, True, backend)
    want = torch.ops.bitfast.group_norm_relu_bwd(gy, s, w, bias, mean, rstd, 4, True, backend)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_compile_fullgraph_matches_eager(backend):
    require_backend(backend, FAMILY, "cpu", torch.float32)
    torch._dynamo.reset()
    w = torch.randn(16, requires_grad=True)

    def f(a, b):
        s, y = bitfast.ops.group_norm_relu_add(a, b, 4, w, None, backend=backend)
        return (s * 0.5 + y).square().sum()

    a, b = torch.randn(2, 16, 6, 6, requires_grad=True), torch.randn(2, 16, 6, 6, requires_grad=True)
    eager = torch.autograd.grad(f(a, b), (a, b, w))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(a, b), (a, b, w))
    for g, r in zip(got, eager):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------


def test_bad_input_messages():
    f = bitfast.ops.group_norm_relu_add
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match=r"group_norm_relu_add: a has 3 dims \(shape \(2, 4, 4\)\); expected \(N, C, H, W\)"):
        f(torch.randn(2, 4, 4), torch.randn(2, 4, 4), 2)
    with pytest.raises(ValueError, match=r"b has shape \(1, 6, 4, 4\) but a has shape \(2, 6, 4, 4\); expected equal "
                                         r"shapes \(no broadcasting\)"):
        f(x, torch.randn(1, 6, 4, 4), 3)
    with pytest.raises(TypeError, match=r"b has dtype torch.float16 but a has dtype torch.float32"):
        f(x, x.half(), 3)
    with pytest.raises(TypeError, match=r"group_norm_relu_add: b must be a torch.Tensor; got float"):
        f(x, 1.0, 3)
    with pytest.raises(ValueError, match=r"b is laid out channels_last but a is contiguous \(NCHW\); expected the same "
                                         r"memory format"):
        f(x, x.contiguous(memory_format=torch.channels_last), 3)
    with pytest.raises(ValueError, match=r"a has 6 channels, not divisible by num_groups=4"):
        f(x, x, 4)
    with pytest.raises(TypeError, match=r"num_groups must be an int; got Tensor"):
        f(x, x, torch.ones(6))
    with pytest.raises(ValueError, match=r"weight has shape \(5,\); expected \(6,\)"):
        f(x, x, 3, torch.randn(5))
    with pytest.raises(TypeError, match=r"a has dtype torch.int32"):
        f(x.int(), x.int(), 3)
    with pytest.raises(ValueError, match=r"has a single element; expected more than 1 value per group"):
        f(torch.randn(2, 4, 1, 1), torch.randn(2, 4, 1, 1), 4)
    with pytest.raises(ValueError, match=r"eps must be a finite value >= 0; got -1"):
        f(x, x, 3, eps=-1.0)
    with pytest.raises(TypeError, match=r"relu must be a bool"):
        f(x, x, 3, relu=1)


def test_native_op_errors():
    """The native ops check their arguments themselves (they are callable directly)."""
    require_backend("cpp", FAMILY, "cpu", torch.float32)
    fwd, bwd = torch.ops.bitfast.native_group_norm_relu_add_fwd, torch.ops.bitfast.native_group_norm_relu_add_bwd
    a = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match=r"native_group_norm_relu_add_fwd: b has shape \[2, 4, 3, 1\] but x has shape"):
        fwd(a, a[..., :1], None, None, 2, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"native_group_norm_relu_add_fwd: b has dtype Double but x has dtype Float"):
        fwd(a, a.double(), None, None, 2, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"native_group_norm_relu_add_fwd: x has 4 channels, not divisible by "
                                           r"num_groups=3"):
        fwd(a, a, None, None, 3, 1e-5, True)
    s, _, mean, rstd = fwd(a, a, None, None, 2, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"native_group_norm_relu_add_bwd: grad_sum has shape \[2, 4, 3, 1\]"):
        bwd(a, a[..., :1], s, None, None, mean, rstd, 2, True)
    with pytest.raises(RuntimeError, match=r"native_group_norm_relu_add_bwd: mean has shape \[2\]; expected \[2, 2\]"):
        bwd(a, None, s, None, None, mean[:, 0], rstd, 2, True)


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("impl", ["reference", "cpp", "eager"])
@pytest.mark.parametrize("dtype,layout", [("fp32", "nchw"), ("bf16", "channels_last")])
def test_bench_case_checks_and_runs(mode, impl, dtype, layout):
    """The ``bitfast bench`` case of the op (tiny shape): checked against float64, then run."""
    from bitfast import bench

    spec = bench.Spec(FAMILY, "tiny", dtype, layout, mode, impl)
    try:
        case = bench.make_case(spec, "cpu", shape=(2, 64, 5, 5))
    except bench.Skip as exc:
        pytest.skip(str(exc))
    case.check()
    assert case.fn() is not None
    assert case.bytes_floor > 0
