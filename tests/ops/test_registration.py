"""torch.library checks of every registered op (opcheck) and torch.compile with zero
graph breaks, on every backend that can serve the op here."""

import pytest
import torch

import bitfast
from bitfast import backends
from bitfast.ops import _library

OPCHECK_BACKENDS = ["reference", "cpp", "triton"]


def _backend_or_skip(backend, family, dtype=torch.float32, device="cpu"):
    reasons = backends.not_supported_reasons(backend, family, device, dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def _maybe_noncontig(x, non_contiguous):
    if not non_contiguous:
        return x
    # Same values, non-contiguous storage: transpose the last two dims of a copy and back.
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _variants():
    for rg in (False, True):
        for nc in (False, True):
            yield pytest.param(rg, nc, id=f"{'grad' if rg else 'nograd'}-{'noncontig' if nc else 'contig'}")


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
@pytest.mark.parametrize("requires_grad,non_contiguous", list(_variants()))
def test_opcheck_weight_standardize(backend, requires_grad, non_contiguous):
    _backend_or_skip(backend, "weight_standardize")
    w = _maybe_noncontig(torch.randn(6, 4, 3, 3), non_contiguous).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.bitfast.weight_standardize_fwd.default, (w, 1e-8, backend))
    _, mean, rstd = torch.ops.bitfast.weight_standardize_fwd(w.detach(), 1e-8, backend)
    g = _maybe_noncontig(torch.randn(6, 4, 3, 3), non_contiguous)
    torch.library.opcheck(torch.ops.bitfast.weight_standardize_bwd.default, (g, w.detach(), mean, rstd, backend))


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
@pytest.mark.parametrize("requires_grad,non_contiguous", list(_variants()))
def test_opcheck_std_conv2d(backend, requires_grad, non_contiguous):
    _backend_or_skip(backend, "weight_standardize")
    x = _maybe_noncontig(torch.randn(2, 4, 7, 7), non_contiguous).requires_grad_(requires_grad)
    w = torch.randn(6, 4, 3, 3, requires_grad=requires_grad)
    torch.library.opcheck(
        torch.ops.bitfast.std_conv2d.default, (x, w, None, [2, 2], [1, 1], [1, 1], 1, 1e-8, backend)
    )


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
@pytest.mark.parametrize("requires_grad,non_contiguous", list(_variants()))
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_group_norm_relu(backend, requires_grad, non_contiguous, affine):
    _backend_or_skip(backend, "group_norm_relu")
    x = _maybe_noncontig(torch.randn(2, 8, 5, 5), non_contiguous).requires_grad_(requires_grad)
    w = torch.randn(8, requires_grad=requires_grad) if affine else None
    b = torch.randn(8, requires_grad=requires_grad) if affine else None
    torch.library.opcheck(torch.ops.bitfast.group_norm_relu_fwd.default, (x, w, b, 4, 1e-5, True, backend))
    xd = x.detach()
    _, mean, rstd = torch.ops.bitfast.group_norm_relu_fwd(xd, w, b, 4, 1e-5, True, backend)
    g = torch.randn_like(xd)
    wd = w.detach() if affine else None
    bd = b.detach() if affine else None
    torch.library.opcheck(
        torch.ops.bitfast.group_norm_relu_bwd.default, (g, xd, wd, bd, mean, rstd, 4, True, backend)
    )


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
@pytest.mark.parametrize("requires_grad,non_contiguous", list(_variants()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_batch_norm_relu(backend, requires_grad, non_contiguous, training):
    _backend_or_skip(backend, "batch_norm_relu")
    x = _maybe_noncontig(torch.randn(3, 4, 5, 5), non_contiguous).requires_grad_(requires_grad)
    w = torch.randn(4, requires_grad=requires_grad)
    b = torch.randn(4, requires_grad=requires_grad)
    rm, rv = torch.zeros(4), torch.ones(4)
    torch.library.opcheck(
        torch.ops.bitfast.batch_norm_relu_fwd.default, (x, rm, rv, w, b, training, 1e-5, True, backend)
    )
    _, mean, var = torch.ops.bitfast.batch_norm_relu_fwd(x.detach(), rm, rv, w.detach(), b.detach(), training, 1e-5, True, backend)
    g = torch.randn_like(x.detach())
    torch.library.opcheck(
        torch.ops.bitfast.batch_norm_relu_bwd.default,
        (g, x.detach(), w.detach(), b.detach(), mean, var, training, 1e-5, True, backend),
    )
    torch.library.opcheck(
        torch.ops.bitfast.batch_norm_update_stats_.default, (rm, rv, mean, var, 0.1, 75, backend)
    )


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
@pytest.mark.parametrize("momentum,first,extras", [(0.0, False, False), (0.9, True, False), (0.9, False, True)])
def test_opcheck_sgd_momentum(backend, momentum, first, extras):
    _backend_or_skip(backend, "sgd_momentum")
    params = [torch.randn(5, 3), torch.randn(7)]
    grads = [torch.randn(5, 3), torch.randn(7)]
    bufs = [torch.randn(5, 3), torch.randn(7)] if momentum else []
    # extras: the learning rate as a tensor and a moving average of the params
    lr_t = torch.tensor(0.1) if extras else None
    emas = [torch.randn(5, 3), torch.randn(7)] if extras else []
    torch.library.opcheck(
        torch.ops.bitfast.sgd_momentum_.default,
        (params, grads, bufs, 0.1, momentum, 0.0, 1e-4, False, False, first, lr_t, emas, 0.9 if extras else 0.0,
         backend),
    )


def test_every_schema_is_defined_once_with_a_native_twin():
    # Every op came from a module's SCHEMAS literal (what the native builds' fingerprint covers).
    from bitfast import _schemas

    assert _library.DEFINED == _schemas.collect()
    for name in _library.DEFINED:
        assert hasattr(torch.ops.bitfast, name)
        assert hasattr(torch.ops.bitfast, "native_" + name)
    assert hasattr(torch.ops.bitfast, "std_conv2d")


# ----------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): the ops trace with zero graph breaks and match eager.
# ----------------------------------------------------------------------------------------


def _block(backend):
    # BatchNorm before GroupNorm: the other order makes GroupNorm's scale invisible to the
    # loss (BatchNorm normalizes it away), and its gradient pure rounding noise.
    conv = bitfast.nn.StdConv2d(8, 16, 3, stride=2, backend=backend)
    bn = bitfast.nn.BatchNormReLU(16, backend=backend)
    gn = bitfast.nn.GroupNormReLU(16, 4, backend=backend)
    return torch.nn.Sequential(conv, bn, gn)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpp", "triton"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend, compiler):
    if backend != "auto":
        for family in ("weight_standardize", "group_norm_relu", "batch_norm_relu"):
            _backend_or_skip(backend, family)
    if compiler == "inductor" and backend not in ("auto", "reference"):
        pytest.skip("inductor is exercised on the default and reference backends; aot_eager covers the rest")
    torch._dynamo.reset()
    model = _block(None if backend == "auto" else backend)
    twin = _block(None if backend == "auto" else backend)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 8, 9, 9)
    compiled = torch.compile(twin, fullgraph=True, backend=compiler)
    y_eager = model(x)
    y_comp = compiled(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-4, atol=1e-4)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)
    for (name, buf), q in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(q, buf, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_channels_last_block_matches_eager(compiler):
    """A channels_last block compiles whole and matches eager: the fake kernels give the
    weights' standardized copies and gradients the channels_last strides the kernels do."""
    torch._dynamo.reset()
    cl = torch.channels_last
    model, twin = _block(None).to(memory_format=cl), _block(None).to(memory_format=cl)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 8, 9, 9).contiguous(memory_format=cl)
    compiled = torch.compile(twin, fullgraph=True, backend=compiler)
    y_eager, y_comp = model(x), compiled(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-4, atol=1e-4)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)
        assert q.grad.stride() == p.grad.stride() == p.stride(), name


def test_compile_sgd_step_fullgraph():
    params = [torch.randn(5, 3), torch.randn(7)]
    grads = [torch.randn(5, 3), torch.randn(7)]
    bufs = [torch.zeros(5, 3), torch.zeros(7)]
    ref = [p.clone() for p in params]
    ref_bufs = [b.clone() for b in bufs]

    def step(ps, gs, bs, first: bool):
        bitfast.ops.sgd_momentum_(ps, gs, bs, lr=0.1, momentum=0.9, weight_decay=1e-4, is_first_step=first)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for first in (True, False, False):
        compiled(params, grads, bufs, first)
        bitfast.ops.reference.sgd_momentum_(ref, grads, ref_bufs, 0.1, 0.9, 0.0, 1e-4, False, False, first)
    for a, b in zip(params + bufs, ref + ref_bufs):
        torch.testing.assert_close(a, b)


def test_compile_sgd_step_with_lr_tensor_and_ema_fullgraph():
    """With the learning rate in a tensor, a schedule that writes into it needs no
    recompilation; the moving average is updated in the same op."""
    torch._dynamo.reset()
    params = [torch.randn(5, 3), torch.randn(7)]
    grads = [torch.randn(5, 3), torch.randn(7)]
    bufs = [torch.zeros(5, 3), torch.zeros(7)]
    emas = [p.clone() for p in params]
    ref, ref_bufs, ref_emas = ([t.clone() for t in ts] for ts in (params, bufs, emas))
    lr_t = torch.tensor(0.1)
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    def step(ps, gs, bs, es, lr):
        bitfast.ops.sgd_momentum_(ps, gs, bs, lr=lr, momentum=0.9, is_first_step=False, ema_params=es, ema_decay=0.5)

    compiled = torch.compile(step, fullgraph=True, backend=counting_backend)
    for lr in (0.1, 0.05, 0.01):
        lr_t.fill_(lr)
        compiled(params, grads, bufs, emas, lr_t)
        bitfast.ops.reference.sgd_momentum_(
            ref, grads, ref_bufs, float(lr_t), 0.9, 0.0, 0.0, False, False, False, None, ref_emas, 0.5
        )
    assert len(compiles) == 1
    for a, b in zip(params + bufs + emas, ref + ref_bufs + ref_emas):
        torch.testing.assert_close(a, b)
