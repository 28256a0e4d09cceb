"""``weight_standardize_multi``: every weight of a list standardized in one call of one kernel.

Against the per-weight op on every backend, dtype and layout it takes (bit for bit on the same
backend: the rows run the same arithmetic), forward and backward; the registered op against
the eager path; ``opcheck`` of the public and native ops; float64 gradcheck; compile with
``fullgraph``; and the errors of bad calls, in Python and in the native checks.
"""

import pytest
import torch

import bitfast
from bitfast import backends
from bitfast.ops import weight_standardize, weight_standardize_multi
from tests.ops._util import DTYPES, REFERENCE_OP, device_backends

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
        return lambda ws: list(torch.ops.bitfast.weight_standardize_multi_fwd(ws, 1e-8, "reference")[0])
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
        assert torch.equal(a, b), f"output {i}"
        assert torch.equal(multi_grads[i], w.grad), f"gradient {i}"
        assert multi_grads[i].stride() == w.grad.stride(), i


@pytest.mark.parametrize("device,backend", device_backends())
def test_statistics_are_every_weights_one_after_the_other(device, backend):
    _require(backend, device, torch.float32)
    name = "reference" if backend == REFERENCE_OP else backend
    ws = [w.detach() for w in _weights(device, torch.float32, "contiguous")]
    _, mean, rstd = torch.ops.bitfast.weight_standardize_multi_fwd(ws, 1e-8, name)
    singles = [torch.ops.bitfast.weight_standardize_fwd(w, 1e-8, name) for w in ws]
    assert torch.equal(mean, torch.cat([s[1] for s in singles]))
    assert torch.equal(rstd, torch.cat([s[2] for s in singles]))
    assert mean.dtype == torch.float32 and mean.shape == (sum(s[0] for s in SHAPES),)


def test_registered_op_equals_the_eager_path():
    """Outside plain eager execution (here: the registered op called directly, its autograd
    through torch.library) the same kernels give the same numbers."""
    ws = _weights("cpu", torch.bfloat16, "channels_last", seed=3)
    eager = weight_standardize_multi(ws, backend="cpp")
    torch.autograd.backward(eager, [torch.ones_like(o) for o in eager])
    g_eager = [w.grad.clone() for w in ws]
    for w in ws:
        w.grad = None
    registered = torch.ops.bitfast.weight_standardize_multi_fwd(ws, 1e-8, "cpp")[0]
    torch.autograd.backward(registered, [torch.ones_like(o) for o in registered])
    for a, b, ga, w in zip(eager, registered, g_eager, ws):
        assert torch.equal(a, b) and torch.equal(ga, w.grad)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_outputs_outside_the_loss_get_zero_gradients(backend):
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
    torch.library.opcheck(torch.ops.bitfast.weight_standardize_multi_fwd.default, (ws, 1e-8, backend))
    if backend == "cpp":
        plain = [w.detach() for w in ws]
        _, mean, rstd = torch.ops.bitfast.native_weight_standardize_multi_fwd(plain, 1e-8)
        torch.library.opcheck(torch.ops.bitfast.native_weight_standardize_multi_fwd.default, (plain, 1e-8))
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


def test_native_argument_errors():
    if "cpp" not in bitfast.available_backends():
        pytest.skip("the C++ extension is not built")
    op = torch.ops.bitfast.native_weight_standardize_multi_fwd
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="empty list"):
        op([], 1e-8)
    with pytest.raises(RuntimeError, match=r"ws\[1\] has dtype"):
        op([w, w.double()], 1e-8)
    with pytest.raises(RuntimeError, match=r"ws\[1\] has 1 dims"):
        op([w, torch.randn(3)], 1e-8)
    _, mean, rstd = op([w], 1e-8)
    bwd = torch.ops.bitfast.native_weight_standardize_multi_bwd
    with pytest.raises(RuntimeError, match="grad_outs for"):
        bwd([], [w], mean, rstd)
    with pytest.raises(RuntimeError, match="must match"):
        bwd([torch.randn(4, 3, 3, 2)], [w], mean, rstd)
    with pytest.raises(RuntimeError, match="one value per output channel"):
        bwd([w], [w], mean[:2], rstd)
