"""The benchmark of ``weight_standardize_multi``: all of a model's conv weights in one call,
every backend with a kernel for it, against timm's ``F.batch_norm`` formulation per weight and
its ``torch.compile`` (the same baselines as ``weight_standardize`` on the same sets)."""

from __future__ import annotations

import math

import torch

from bitfast import backends
from bitfast.bench import harness as h
from bitfast.bench.baselines import eager_weight_standardize
from bitfast.bench.layers import weights

SETS = {
    ("cuda", False): ["R50x1 all convs", "R101x3 all convs"],
    ("cuda", True): ["R50x1 all convs"],
    ("cpu", False): ["R50x1 all convs"],
    ("cpu", True): ["R50x1 all convs"],
}


def _shapes(device: str, quick: bool) -> dict:
    return {label: weights(label) for label in SETS[(device, quick)]}


def _case(spec: h.Spec, device: str, shape_list, quick: bool) -> h.Case:
    from bitfast.ops import reference, weight_standardize_multi

    dtype = h.DTYPES[spec.dtype]
    es = torch.tensor([], dtype=dtype).element_size()
    numel = sum(math.prod(s) for s in shape_list)
    # As weight_standardize: forward reads w, writes w_hat; backward reads dy and w, writes dw.
    floor = {"fwd": 2 * numel * es, "bwd": 3 * numel * es, "full": 5 * numel * es}[spec.mode]
    sets = []
    for _ in range(h.input_sets(device, 3 * numel * es)):
        ws = [(0.05 * torch.randn(s, device=device)).to(dtype).requires_grad_() for s in shape_list]
        dys = [torch.randn(s, device=device).to(dtype) for s in shape_list]
        sets.append((tuple(ws), tuple(ws), dys))

    if spec.impl in backends.BACKENDS:

        def forward(*ws):
            return weight_standardize_multi(list(ws), h.WS_EPS, backend=spec.impl)

    else:

        def base(*ws):
            return [eager_weight_standardize(w, h.WS_EPS) for w in ws]

        key = ("weight_standardize_multi", spec.shape, spec.dtype, device)
        forward = base if spec.impl == "eager" else h.compiled(key, base)

    def reference_fn(args, dy, mode):
        k = len(args)
        return h.ref_autograd(lambda *ws: [reference.weight_standardize(w, h.WS_EPS) for w in ws], args, range(k), dy, mode)

    fn, check = h.autograd_modes(spec, device, forward, sets, reference_fn)
    return h.Case(spec, device, fn, check, bytes_floor=floor, shape_value=shape_list)


h.register(h.BenchOp(
    "weight_standardize_multi", modes=("fwd", "bwd", "full"), baselines=("eager", "compile"),
    shapes=_shapes, dtypes=lambda device, quick: ["fp32"] if quick else ["fp32", "bf16"],
    layouts=lambda device, quick: ["-"], factory=_case,
    baseline_notes="`eager` (timm's `F.batch_norm` formulation, per weight), `compile`",
    own_notes="every backend with a kernel for it (`reference`, `cpp`)", order=11,
))
