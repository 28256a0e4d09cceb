"""The eager fast path of the public ops (``bitfast.ops._register.eager``/``eager_forward``).

In plain eager execution the public ops call their kernels directly, with the C++
autograd of csrc/autograd/ (native backends) or a Python ``autograd.Function``
(Triton, or a build without the C++ autograd), instead of going through the registered
``torch.ops.bitfast.*`` op. Both paths run the same kernels, so outputs and gradients must
be bitwise equal; every tool that traces or intercepts ops (modes, compile, vmap) must
still see the registered op.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import bitfast
from bitfast import backends
from bitfast.ops import _register

from ._util import require_backend


class Passthrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: under it the public ops take the registered
    ``torch.ops.bitfast.*`` path."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# (device, backend); the CUDA ones run on a GPU machine (tools/gpu_check.sh)
BACKENDS = [
    pytest.param(d, b, id=f"{d}-{b}") for d, b in (("cpu", "cpp"), ("cpu", "triton"), ("cuda", "cuda"), ("cuda", "triton"))
]
LAYOUTS = [pytest.param(f, id=n) for n, f in (("nchw", torch.contiguous_format), ("cl", torch.channels_last))]
DTYPES = [pytest.param(d, id=str(d).split(".")[1]) for d in (torch.float32, torch.bfloat16)]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone(memory_format=torch.preserve_format).requires_grad_()


def _run_both(fn, inputs, grads_of_outputs):
    """Outputs and input gradients of ``fn(*inputs)`` on the eager path and on the
    registered path (under Passthrough), from fresh leaf copies of ``inputs``."""
    results = []
    for registered in (False, True):
        leaves = [_leaf(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
        mode = Passthrough()
        if registered:
            with mode:
                outs = fn(*leaves)
            assert any(op.startswith("bitfast.") and "native" not in op for op in mode.ops), mode.ops
        else:
            outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        diff = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(outs, diff, grads_of_outputs(outs))
        results.append(([o.detach() for o in outs], list(grads)))
    return results


def _assert_same(a, b, what):
    (oa, ga), (ob, gb) = a, b
    for i, (x, y) in enumerate(zip(oa + ga, ob + gb)):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: result {i}"
        assert x.stride() == y.stride(), f"{what}: result {i} strides {x.stride()} vs {y.stride()}"
        assert torch.equal(x, y), f"{what}: result {i} differs between the eager and the registered path"


def _cases(backend, dtype, fmt, device):
    """(name, fn, inputs, output-gradient maker) for every public op with an eager path."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    x = rnd(2, 8, 5, 5).contiguous(memory_format=fmt)
    x2 = rnd(2, 8, 5, 5).contiguous(memory_format=fmt)
    w = (1 + 0.1 * torch.randn(8, generator=g)).to(device)
    b = (0.1 * torch.randn(8, generator=g)).to(device)
    cw = rnd(6, 8, 3, 3, scale=0.1)

    def dys(outs):
        gen = torch.Generator().manual_seed(1)
        return [torch.randn(o.shape, generator=gen).to(device=device, dtype=o.dtype) for o in outs]

    def bn(training):
        def f(x, w, b):
            rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
            return bitfast.ops.batch_norm_relu(x, rm, rv, w, b, training=training, backend=backend)

        return f

    return [
        ("group_norm_relu", lambda x, w, b: bitfast.ops.group_norm_relu(x, 4, w, b, backend=backend), (x, w, b)),
        ("group_norm_relu no affine", lambda x: bitfast.ops.group_norm_relu(x, 2, relu=False, backend=backend), (x,)),
        (
            "group_norm_relu_add",
            lambda a, c, w, b: bitfast.ops.group_norm_relu_add(a, c, 4, w, b, backend=backend),
            (x, x2, w, b),
        ),
        ("batch_norm_relu train", bn(True), (x, w, b)),
        ("batch_norm_relu eval", bn(False), (x, w, b)),
        ("weight_standardize", lambda w: bitfast.ops.weight_standardize(w, backend=backend), (cw,)),
        (
            "std_conv2d",
            lambda x, w: bitfast.ops.std_conv2d(x, w.to(x.dtype), None, padding=1, backend=backend),
            (x, cw),
        ),
    ], dys


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("python_autograd", [False, True], ids=["native-autograd", "python-autograd"])
def test_eager_path_equals_registered_op(device, backend, fmt, dtype, python_autograd, monkeypatch):
    for family in ("group_norm_relu", "batch_norm_relu", "weight_standardize"):
        require_backend(backend, family, device, dtype)
    if python_autograd:
        if backend == "triton":
            pytest.skip("triton has no C++ autograd: its eager path always records the Python one (the other parameter)")
        # a build without csrc/autograd/: the eager path records a Python autograd.Function
        monkeypatch.setattr(_register, "native_autograd", lambda op: False)
    cases, dys = _cases(backend, dtype, fmt, device)
    for name, fn, inputs in cases:
        op = name.split()[0]
        family = "weight_standardize" if op == "std_conv2d" else op
        if backends.not_supported_reasons(backend, family, device, dtype):
            continue  # e.g. group_norm_relu_add, which the cuda backend has no kernel for
        eager, registered = _run_both(fn, inputs, dys)
        _assert_same(eager, registered, f"{name} [{backend}, {dtype}, {fmt}]")


def test_eager_path_records_the_cpp_autograd_node():
    require_backend("cpp", "group_norm_relu", "cpu", torch.float32)
    if not _register.native_autograd("group_norm_relu_fwd"):
        pytest.skip("bitfast._C was built without csrc/autograd/")
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    y = bitfast.ops.group_norm_relu(x, 4, backend="cpp")
    assert "GroupNormReLU" in y.grad_fn.name()
    with torch.no_grad():
        assert bitfast.ops.group_norm_relu(x, 4, backend="cpp").grad_fn is None
    # the running statistics of BatchNorm are updated on the eager path as on the registered one
    rm, rv = torch.zeros(8), torch.ones(8)
    bitfast.ops.batch_norm_relu(x, rm, rv, training=True, momentum=0.5, backend="cpp")
    torch.testing.assert_close(rm, 0.5 * x.detach().mean((0, 2, 3)))


def test_native_forward_without_a_gradient_to_record():
    """The C++ autograd kernels run the forward directly when autograd has nothing to record
    (grad mode off, or no input requiring grad): same outputs, bit for bit, as when the node
    is recorded, and no grad_fn."""
    require_backend("cpp", "group_norm_relu", "cpu", torch.float32)
    if not _register.native_autograd("group_norm_relu_fwd"):
        pytest.skip("bitfast._C was built without csrc/autograd/")
    ops = torch.ops.bitfast
    x, a = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    w, b, cw = torch.randn(8), torch.randn(8), torch.randn(8, 4, 3, 3)
    rm, rv = torch.randn(8), torch.rand(8) + 0.5
    calls = {
        "group_norm_relu": (lambda x, a, w, b, cw: ops.native_group_norm_relu_fwd(x, w, b, 4, 1e-5, True), (0, 2, 3)),
        "group_norm_relu_add": (
            lambda x, a, w, b, cw: ops.native_group_norm_relu_add_fwd(x, a, w, b, 4, 1e-5, True), (0, 1, 2, 3)),
        "batch_norm_relu": (
            lambda x, a, w, b, cw: ops.native_batch_norm_relu_fwd(x, None, None, w, b, True, 1e-5, True), (0, 2, 3)),
        "batch_norm_relu (eval)": (
            lambda x, a, w, b, cw: ops.native_batch_norm_relu_fwd(x, rm, rv, w, b, False, 1e-5, True), (0, 2, 3)),
        "weight_standardize": (lambda x, a, w, b, cw: ops.native_weight_standardize_fwd(cw, 1e-6), (4,)),
    }
    for name, (fn, differentiable) in calls.items():
        inputs = [x, a, w, b, cw]
        recorded = fn(*[_leaf(t) if i in differentiable else t for i, t in enumerate(inputs)])
        assert recorded[0].grad_fn is not None, name
        for plain in (fn(*inputs), _no_grad(fn, [_leaf(t) for t in inputs])):
            assert all(not t.requires_grad and t.grad_fn is None for t in plain), name
            for got, want in zip(plain, recorded):
                assert torch.equal(got, want.detach()), name


def _no_grad(fn, inputs):
    with torch.no_grad():
        return fn(*inputs)


@pytest.mark.parametrize("op", ["group_norm_relu", "group_norm_relu_add", "batch_norm_relu", "weight_standardize"])
def test_eager_path_gradcheck_float64(op):
    require_backend("cpp", op if op != "group_norm_relu_add" else "group_norm_relu", "cpu", torch.float64)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    fns = {
        "group_norm_relu": (lambda x, w, b: bitfast.ops.group_norm_relu(x, 3, w, b, backend="cpp"), (x, w, b)),
        "group_norm_relu_add": (
            lambda x, x2, w, b: bitfast.ops.group_norm_relu_add(x, x2, 3, w, b, backend="cpp"),
            (x, x2, w, b),
        ),
        "batch_norm_relu": (
            lambda x, w, b: bitfast.ops.batch_norm_relu(x, None, None, w, b, training=True, backend="cpp"),
            (x, w, b),
        ),
        "weight_standardize": (lambda x: bitfast.ops.weight_standardize(x, backend="cpp"), (x,)),
    }
    fn, inputs = fns[op]
    assert torch.autograd.gradcheck(fn, inputs)
    # only the sum of the fused residual add used: the y output gets no gradient at all
    if op == "group_norm_relu_add":
        s, _y = bitfast.ops.group_norm_relu_add(x, x2, 3, w, b, backend="cpp")
        gx, gx2 = torch.autograd.grad(s.sum(), (x, x2))
        assert torch.equal(gx, torch.ones_like(x)) and torch.equal(gx2, torch.ones_like(x2))


def test_eager_predicate():
    x = torch.randn(2, 3)
    p = torch.nn.Parameter(torch.randn(3))
    assert _register.eager(x, p, None)
    with Passthrough():
        assert not _register.eager(x)
    with TorchFunctionMode():
        assert not _register.eager(x)

    class Sub(torch.Tensor):
        pass

    assert not _register.eager(x.as_subclass(Sub))
    seen = []

    def f(t):
        seen.append(_register.eager(t))
        return t

    torch.func.vmap(f)(torch.randn(4, 3))
    assert seen == [False]
    torch.jit.trace(f, (x,), check_trace=False)
    assert seen == [False, False]


def test_compiled_model_still_traces_the_registered_op():
    """Under torch.compile the public op is captured as ``torch.ops.bitfast.*`` (the eager
    path would put the native op and its C++ autograd in the graph)."""
    require_backend("cpp", "group_norm_relu", "cpu", torch.float32)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda x: bitfast.ops.group_norm_relu(x, 4, backend="cpp"), backend=capture, fullgraph=True)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(fn(x), bitfast.ops.group_norm_relu(x, 4, backend="cpp"))
    code = graphs[0].code
    assert "bitfast.group_norm_relu_fwd" in code and "native_group_norm_relu_fwd" not in code, code


def test_backends_auto_uses_the_eager_path():
    """auto on CPU resolves to cpp, and the call records the C++ node."""
    if backends.resolve("group_norm_relu", "cpu", torch.float32) != "cpp":
        pytest.skip("no cpp backend here")
    if not _register.native_autograd("group_norm_relu_fwd"):
        pytest.skip("bitfast._C was built without csrc/autograd/")
    y = bitfast.ops.group_norm_relu(torch.randn(1, 4, 3, 3, requires_grad=True), 2)
    assert "GroupNormReLU" in y.grad_fn.name()
