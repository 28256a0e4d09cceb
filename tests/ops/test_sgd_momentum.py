"""Parity of the multi-tensor SGD step on every backend, against a float64 evaluation of
the reference over many steps, with PyTorch's own SGD in the same dtype as the baseline."""

import itertools

import pytest
import torch

import bitfast
from bitfast.ops import reference
from tests.ops._util import DTYPES, assert_parity, device_backends, require_backend

FAMILY = "sgd_momentum"

SHAPES = [(1,), (7,), (64, 3, 7, 7), (33, 17), (256, 64, 1, 1), (1000,)]

OPTIONS = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
    for m, d, wd, n, mx in itertools.product((0.0, 0.9), (0.0, 0.1), (0.0, 1e-2), (False, True), (False, True))
    if not (n and (m == 0 or d != 0))
]


def _ids(o):
    return "-".join(f"{k}={v}" for k, v in o.items())


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=_ids)
def test_sgd_momentum_parity(device, backend, dtype, opts):
    require_backend("reference" if backend.startswith("reference") else backend, FAMILY, device, dtype)
    torch.manual_seed(1)
    params = [torch.randn(s, device=device) for s in SHAPES]
    p64 = [p.double() for p in params]
    ours = [p.to(dtype).clone() for p in params]
    base = [p.to(dtype).clone().requires_grad_() for p in params]
    b64 = [torch.zeros_like(p) for p in p64]
    bufs = [torch.zeros_like(p) for p in ours]
    torch_opt = torch.optim.SGD(base, lr=0.05, **opts)
    momentum = opts["momentum"]
    for step in range(12):
        lr = 0.05 if step < 6 else 0.01  # a schedule change mid-run
        for group in torch_opt.param_groups:
            group["lr"] = lr
        grads = [torch.randn(s, device=device) for s in SHAPES]
        g_low = [g.to(dtype) for g in grads]
        kwargs = dict(lr=lr, momentum=momentum, dampening=opts["dampening"], weight_decay=opts["weight_decay"],
                      nesterov=opts["nesterov"], maximize=opts["maximize"], is_first_step=step == 0)
        if backend == "reference-op":
            torch.ops.bitfast.sgd_momentum_(ours, g_low, bufs if momentum else [], *kwargs.values(), "reference")
        else:
            bitfast.ops.sgd_momentum_(ours, g_low, bufs if momentum else [], backend=backend, **kwargs)
        reference.sgd_momentum_(p64, [g.double() for g in grads], b64, *kwargs.values())
        for p, g in zip(base, g_low):
            p.grad = g
        torch_opt.step()
    for i, (a, r, b) in enumerate(zip(ours, p64, base)):
        assert_parity(a, r, b.detach(), dtype, f"param {i} {tuple(a.shape)}")
    if momentum:
        for i, (a, r) in enumerate(zip(bufs, b64)):
            b = torch_opt.state[base[i]]["momentum_buffer"]
            assert_parity(a, r, b, dtype, f"momentum buffer {i}")


@pytest.mark.parametrize("device,backend", device_backends())
def test_non_contiguous_params(device, backend):
    require_backend("reference" if backend.startswith("reference") else backend, FAMILY, device, torch.float32)
    if backend == "reference-op":
        pytest.skip("the registered op is covered above; this checks the public API")
    p = torch.randn(6, 5, device=device).t()
    g = torch.randn(6, 5, device=device).t()
    buf = torch.randn(6, 5, device=device).t()
    p64, g64, b64 = p.double(), g.double(), buf.double()
    bitfast.ops.sgd_momentum_([p], [g], [buf], lr=0.1, momentum=0.9, weight_decay=0.01, backend=backend)
    reference.sgd_momentum_([p64], [g64], [b64], 0.1, 0.9, 0.0, 0.01, False, False, False)
    assert_parity(p, p64, None, torch.float32, "param")
    assert_parity(buf, b64, None, torch.float32, "buffer")


def test_bad_input_messages():
    f = bitfast.ops.sgd_momentum_
    p, g = [torch.randn(3)], [torch.randn(3)]
    with pytest.raises(ValueError, match=r"momentum=0.9 needs one buffer per param"):
        f(p, g, [], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"got 1 params but 2 grads"):
        f(p, g + g, [], lr=0.1)
    with pytest.raises(ValueError, match=r"lr must be a finite value >= 0; got -0.1"):
        f(p, g, [], lr=-0.1)
    with pytest.raises(ValueError, match=r"nesterov requires momentum > 0 and dampening == 0"):
        f(p, g, [torch.zeros(3)], lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"grads\[0\] is torch.float32 \(4,\)"):
        f(p, [torch.randn(4)], [], lr=0.1)
    with pytest.raises(TypeError, match=r"params must be a list of tensors"):
        f(p[0], g, [], lr=0.1)
