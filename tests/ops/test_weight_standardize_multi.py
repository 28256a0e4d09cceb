"""``weight_standardize_multi``: every weight of a list standardized in one call of one kernel.

Against the per-weight op on every backend, dtype and layout it takes, forward and backward:
bit for bit on the reference and C++ backends (the rows run the same arithmetic), within the
parity rule on Triton (one tile size for the whole list, so sums may be ordered otherwise);
``out_dtype`` (autocast's low-precision copy) on every backend; the registered op against the
eager path; ``opcheck`` of the public and native ops; float64 gradcheck; compile with
``fullgraph``; a CUDA graph capture of the Triton kernels (GPU); and the errors of bad calls,
in Python and in the native checks.
"""

import pytest
import torch

import bitfast
from bitfast import backends
from bitfast.ops import weight_standardize, weight_standardize_multi
from tests.ops._util import DTYPES, REFERENCE_OP, assert_parity, device_backends

FAMILY = "weight_standardize_multi"
# BiT's stem, a projection, a 3x3 conv, odd sizes, a 2-D weight with a long row.
SHAPES = [(64, 3, 7, 7), (256, 64, 1, 1), (32, 16, 3, 3), (7, 5, 3, 3), (3, 4609)]


def _require(backend: str, device: str, dtype: torch.dtype) -> None:
    name = "reference" if backend == REFERENCE_OP else backend
    reasons = backends.not_supported_reasons(name, FAMILY, device, dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def _weights(device, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]
    if layout == "channels_last":
        ws = [w.contiguous(memory_format=torch.channels_last) if w.dim() == 4 else w for w in ws]
    return [w.to(device).requires_grad_() for w in ws]


def _multi(backend):
    if backend == REFERENCE_OP:
        return lambda ws: list(torch.ops.bitfast.weight_standardize_multi_fwd(ws, 1e-8, None, "reference")[0])
    return lambda ws: weight_standardize_multi(ws, 1e-8, backend=backend)


def _single(backend):
    if backend == REFERENCE_OP:
        return lambda w: torch.ops.bitfast.weight_standardize_fwd(w, 1e-8, "reference")[0]
    return lambda w: weight_standardize(w, 1e-8, backend=backend)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_equals_the_per_weight_op_bit_for_bit(device, backend, dtype, layout):
    _require(backend, device, dtype)
    ws = _weights(device, dtype, layout)
    outs = _multi(backend)(ws)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    multi_grads = [w.grad for w in ws]
    for w in ws:
        w.grad = None
    singles = [_single(backend)(w) for w in ws]
    torch.autograd.backward(singles, grads)
    for i, (a, b, w) in enumerate(zip(outs, singles, ws)):
        assert a.dtype == w.dtype and a.stride() == b.stride(), i  # the weight's dtype and memory format
        assert multi_grads[i].stride() == w.grad.stride(), i
        if backend == "triton":
            w64 = w.detach().double().requires_grad_()
            ref = torch.ops.bitfast.weight_standardize_fwd(w64, 1e-8, "reference")[0]
            (g64,) = torch.autograd.grad(ref, w64, grads[i].double())
            assert_parity(a, ref, b, dtype, f"output {i}")
            assert_parity(multi_grads[i], g64, w.grad, dtype, f"gradient {i}")
        else:
            assert torch.equal(a, b), f"output {i}"
            assert torch.equal(multi_grads[i], w.grad), f"gradient {i}"


@pytest.mark.parametrize("device,backend", device_backends())
def test_statistics_are_every_weights_one_after_the_other(device, backend):
    _require(backend, device, torch.float32)
    name = "reference" if backend == REFERENCE_OP else backend
    ws = [w.detach() for w in _weights(device, torch.float32, "contiguous")]
    _, mean, rstd = torch.ops.bitfast.weight_standardize_multi_fwd(ws, 1e-8, None, name)
    singles = [torch.ops.bitfast.weight_standardize_fwd(w, 1e-8, name) for w in ws]
    same = torch.equal if backend != "triton" else lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert same(mean, torch.cat([s[1] for s in singles]))
    assert same(rstd, torch.cat([s[2] for s in singles]))
    assert mean.dtype == torch.float32 and mean.shape == (sum(s[0] for s in SHAPES),)


@pytest.mark.parametrize("device,backend", [p for p in device_backends() if p.values[1] == "triton"])
def test_triton_launch_tables_follow_the_tensors(device, backend):
    """The Triton launcher reuses a launch table when the same addresses come again: the same
    weights give the same results, and other weights of the same shapes their own."""
    _require(backend, device, torch.float32)
    a = [w.detach() for w in _weights(device, torch.float32, "contiguous", seed=1)]
    b = [w.detach() for w in _weights(device, torch.float32, "contiguous", seed=2)]
    from bitfast.kernels import weight_std as kernels

    first = weight_standardize_multi(a, backend=backend)
    tables = dict(kernels._TABLES)
    again = weight_standardize_multi(a, backend=backend)
    # the same weights: the same table, not a new one
    assert list(kernels._TABLES) == list(tables) and all(kernels._TABLES[k] is t for k, t in tables.items())
    other = weight_standardize_multi(b, backend=backend)
    for x, y, z, wb in zip(first, again, other, b):
        assert torch.equal(x, y)
        assert torch.equal(z, weight_standardize(wb, backend=backend)) or torch.allclose(
            z, weight_standardize(wb, backend=backend), rtol=1e-5, atol=1e-6)
        assert not torch.equal(x, z)


def test_registered_op_equals_the_eager_path():
    """Outside plain eager execution (here: the registered op called directly, its autograd
    through torch.library) the same kernels give the same numbers."""
    ws = _weights("cpu", torch.bfloat16, "channels_last", seed=3)
    eager = weight_standardize_multi(ws, backend="cpp")
    torch.autograd.backward(eager, [torch.ones_like(o) for o in eager])
    g_eager = [w.grad.clone() for w in ws]
    for w in ws:
        w.grad = None
    registered = torch.ops.bitfast.weight_standardize_multi_fwd(ws, 1e-8, None, "cpp")[0]
    torch.autograd.backward(registered, [torch.ones_like(o) for o in registered])
    for a, b, ga, w in zip(eager, registered, g_eager, ws):
        assert torch.equal(a, b) and torch.equal(ga, w.grad)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_outputs_outside_the_loss_get_zero_gradients(backend):
    _require(backend, "cpu", torch.float32)
    ws = _weights("cpu", torch.float32, "contiguous")
    outs = weight_standardize_multi(ws, backend=backend)
    (outs[0] * torch.randn_like(outs[0])).sum().backward()
    assert ws[0].grad.abs().sum() > 0
    assert all(w.grad is None or torch.count_nonzero(w.grad) == 0 for w in ws[1:])


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gradcheck_float64(backend):
    _require(backend, "cpu", torch.float64)
    ws = [torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True),
          torch.randn(5, 6, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda a, b: tuple(weight_standardize_multi([a, b], backend=backend)), ws)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_opcheck(backend):
    _require(backend, "cpu", torch.float32)
    ws = [w.detach().requires_grad_() for w in _weights("cpu", torch.float32, "channels_last")[:3]]
    torch.library.opcheck(torch.ops.bitfast.weight_standardize_multi_fwd.default, (ws, 1e-8, None, backend))
    torch.library.opcheck(torch.ops.bitfast.weight_standardize_multi_fwd.default, (ws, 1e-8, torch.bfloat16, backend))
    if backend == "cpp":
        plain = [w.detach() for w in ws]
        _, mean, rstd = torch.ops.bitfast.native_weight_standardize_multi_fwd(plain, 1e-8, None)
        torch.library.opcheck(torch.ops.bitfast.native_weight_standardize_multi_fwd.default, (plain, 1e-8, None))
        grads = [torch.randn_like(w) for w in plain]
        torch.library.opcheck(torch.ops.bitfast.native_weight_standardize_multi_bwd.default,
                              (grads, plain, mean, rstd))


def test_compiles_in_one_graph():
    ws = _weights("cpu", torch.float32, "contiguous")

    def f(*w):
        return sum((o * o).sum() for o in weight_standardize_multi(list(w)))

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(*ws)
    loss.backward()
    g_compiled = [w.grad.clone() for w in ws]
    for w in ws:
        w.grad = None
    ref = f(*ws)
    ref.backward()
    assert torch.equal(loss, ref)
    assert all(torch.equal(a, w.grad) for a, w in zip(g_compiled, ws))


def test_bad_calls():
    w = torch.randn(4, 3, 3, 3)
    for bad, exc, pattern in [
        ([], ValueError, "non-empty list"),
        (w, ValueError, "non-empty list"),
        ([w, torch.randn(4)], ValueError, r"ws\[1\].*dims"),
        ([w, w.double()], ValueError, "one dtype and device"),
        ([w, torch.zeros(0, 3)], ValueError, "no elements"),
        ([w, torch.arange(6).reshape(2, 3)], TypeError, "floating"),
    ]:
        with pytest.raises(exc, match=pattern):
            weight_standardize_multi(bad)
    with pytest.raises(ValueError, match="eps"):
        weight_standardize_multi([w], eps=-1.0)
    with pytest.raises(ValueError, match="out_dtype must be a floating"):
        weight_standardize_multi([w], out_dtype=torch.int32)


def test_native_argument_errors():
    if "cpp" not in bitfast.available_backends():
        pytest.skip("the C++ extension is not built")
    op = torch.ops.bitfast.native_weight_standardize_multi_fwd
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="empty list"):
        op([], 1e-8, None)
    with pytest.raises(RuntimeError, match=r"ws\[1\] has dtype"):
        op([w, w.double()], 1e-8, None)
    with pytest.raises(RuntimeError, match=r"ws\[1\] has 1 dims"):
        op([w, torch.randn(3)], 1e-8, None)
    with pytest.raises(RuntimeError, match="out_dtype is Long"):
        op([w], 1e-8, torch.int64)
    _, mean, rstd = op([w], 1e-8, None)
    bwd = torch.ops.bitfast.native_weight_standardize_multi_bwd
    with pytest.raises(RuntimeError, match="grad_outs for"):
        bwd([], [w], mean, rstd)
    with pytest.raises(RuntimeError, match="must match"):
        bwd([torch.randn(4, 3, 3, 2)], [w], mean, rstd)
    with pytest.raises(RuntimeError, match="one value per output channel"):
        bwd([w], [w], mean[:2], rstd)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_out_dtype_writes_the_low_precision_copy(device, backend, out_dtype, layout):
    """``out_dtype`` gives what autocast would hand a conv: the float32 result rounded once to
    the low-precision dtype (bit for bit where the arithmetic is the per-weight op's; within the
    parity rule on Triton); the gradients, fed in that dtype, come back in float32."""
    _require(backend, device, torch.float32)
    ws = _weights(device, torch.float32, layout, seed=5)
    if backend == REFERENCE_OP:
        outs = list(torch.ops.bitfast.weight_standardize_multi_fwd(ws, 1e-8, out_dtype, "reference")[0])
    else:
        outs = weight_standardize_multi(ws, 1e-8, out_dtype=out_dtype, backend=backend)
    grads = [torch.randn(o.shape, device=device).to(out_dtype).contiguous(memory_format=torch.channels_last)
             if o.dim() == 4 and layout == "channels_last" else torch.randn(o.shape, device=device).to(out_dtype)
             for o in outs]
    torch.autograd.backward(outs, grads)
    for i, (o, w, g) in enumerate(zip(outs, ws, grads)):
        leaf = w.detach().requires_grad_()
        single = _single(backend)(leaf)
        (g_single,) = torch.autograd.grad(single, leaf, g.float())
        assert o.dtype == out_dtype and o.stride() == single.stride(), i
        assert w.grad.dtype == torch.float32 and w.grad.stride() == w.stride(), i
        if backend == "triton":
            assert_parity(o, single.detach().double(), single.detach().to(out_dtype), out_dtype, f"output {i}")
            assert_parity(w.grad, g_single.double(), g_single, torch.float32, f"gradient {i}")
        else:
            assert torch.equal(o, single.detach().to(out_dtype)), f"output {i}"
            assert torch.equal(w.grad, g_single), f"gradient {i}"


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16], ids=str)
def test_triton_list_op_replays_in_a_cuda_graph(out_dtype):
    """Captured in a CUDA graph (as ``--cuda-graphs`` captures a whole step) the one-launch
    Triton kernels give, on every replay with new weights, what an eager call gives: their
    launch table holds only the weights' addresses and fixed offsets, made by the warm-up and
    reused by the capture."""
    _require("triton", "cuda", torch.float32)
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(s, device="cuda", generator=g).requires_grad_() for s in SHAPES]
    grads = [torch.randn(s, device="cuda", generator=g).to(out_dtype or torch.float32) for s in SHAPES]

    def step():
        outs = weight_standardize_multi(ws, out_dtype=out_dtype, backend="triton")
        torch.autograd.backward(outs, grads)
        return outs

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for w in ws:
        w.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (1, 2):
        with torch.no_grad():
            for w in ws:
                w.copy_(torch.randn(w.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        leaves = [w.detach().clone().requires_grad_() for w in ws]
        expected = weight_standardize_multi(leaves, out_dtype=out_dtype, backend="triton")
        torch.autograd.backward(expected, grads)
        for i in range(len(ws)):
            assert torch.equal(outs[i], expected[i]), (seed, i)
            assert torch.equal(ws[i].grad, leaves[i].grad), (seed, i)
