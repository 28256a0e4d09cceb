"""The benchmark of ``sgd_momentum_``: every backend against ``torch.optim.SGD`` (foreach and fused)
on all of a BiT model's parameters."""

from __future__ import annotations

import math

import torch

from bitfast import backends
from bitfast.bench import harness as h
from bitfast.bench.layers import param_shapes

SETS = {
    ("cuda", False): ["R50x1 all params", "R101x3 all params"],
    ("cuda", True): ["R50x1 all params"],
    ("cpu", False): ["R50x1 all params"],
    ("cpu", True): ["R50x1 all params"],
}


def _shapes(device: str, quick: bool) -> dict:
    return {label: list(param_shapes(label.split()[0].lower())) for label in SETS[(device, quick)]}


def _case(spec: h.Spec, device: str, shape_list, quick: bool) -> h.Case:
    from bitfast.ops import reference, sgd_momentum_

    dtype = h.DTYPES[spec.dtype]
    es = torch.tensor([], dtype=dtype).element_size()
    numel = sum(math.prod(s) for s in shape_list)
    floor = 5 * numel * es  # read p, g, m; write p, m
    params = [torch.randn(s, device=device).to(dtype) for s in shape_list]
    grads = [0.01 * torch.randn(s, device=device).to(dtype) for s in shape_list]
    if spec.impl in backends.BACKENDS:
        bufs = [0.01 * torch.randn(s, device=device).to(dtype) for s in shape_list]

        def fn():
            sgd_momentum_(params, grads, bufs, lr=h.LR, momentum=h.MOMENTUM, weight_decay=h.WEIGHT_DECAY, backend=spec.impl)

        def buffers():
            return bufs

    else:
        for p, g in zip(params, grads):
            p.grad = g
        kw = {"foreach": True} if spec.impl == "sgd_foreach" else {"fused": True}
        opt = torch.optim.SGD(params, lr=h.LR, momentum=h.MOMENTUM, weight_decay=h.WEIGHT_DECAY, **kw)
        opt.step()  # creates the momentum buffers (the first step differs)

        def fn():
            opt.step()

        def buffers():
            return [opt.state[p]["momentum_buffer"] for p in params]

    def check():
        p64 = [p.double() for p in params]
        m64 = [m.double() for m in buffers()]
        g64 = [g.double() for g in grads]
        reference.sgd_momentum_(p64, g64, m64, h.LR, h.MOMENTUM, 0.0, h.WEIGHT_DECAY, False, False, False)
        fn()
        h.close(f"sgd_momentum [{spec.impl}] params", params, p64, dtype)
        h.close(f"sgd_momentum [{spec.impl}] buffers", buffers(), m64, dtype)

    return h.Case(spec, device, fn, check, bytes_floor=floor, shape_value=[len(shape_list), numel])


h.register(h.BenchOp(
    "sgd_momentum", modes=("step",), baselines=("sgd_foreach", "sgd_fused"),
    shapes=_shapes, dtypes=lambda device, quick: ["fp32"],  # parameters stay float32 in mixed precision
    layouts=lambda device, quick: ["-"], factory=_case,
    baseline_notes="`torch.optim.SGD(foreach=True)`, `SGD(fused=True)`", order=50,
))
