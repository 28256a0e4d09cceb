"""The benchmark of ``weight_standardize``: every backend against timm's ``F.batch_norm`` formulation
and its ``torch.compile``, on single BiT conv weights and on all of a model's."""

from __future__ import annotations

import math

import torch

from bitfast import backends
from bitfast.bench import harness as h
from bitfast.bench.baselines import eager_weight_standardize
from bitfast.bench.layers import weights

# The weights measured: one real layer each, or every conv of a model.
SETS = {
    ("cuda", False): ["R50x1 s1 conv2 3x3", "R50x1 s4 conv2 3x3", "R101x3 s4 conv2 3x3", "R50x1 all convs", "R101x3 all convs"],
    ("cuda", True): ["R50x1 s4 conv2 3x3", "R50x1 all convs"],
    ("cpu", False): ["R50x1 s1 conv2 3x3", "R50x1 s4 conv2 3x3", "R50x1 all convs"],
    ("cpu", True): ["R50x1 s1 conv2 3x3", "R50x1 s4 conv2 3x3"],
}


def _shapes(device: str, quick: bool) -> dict:
    return {label: weights(label) for label in SETS[(device, quick)]}


def _dtypes(device: str, quick: bool) -> list[str]:
    # --quick: float32 only, the dtype of the master weights under autocast.
    return ["fp32"] if quick else ["fp32", "bf16"]


def _case(spec: h.Spec, device: str, shape_list, quick: bool) -> h.Case:
    from bitfast.ops import weight_standardize

    return weights_case(spec, device, shape_list,
                        lambda ws, backend: [weight_standardize(w, h.WS_EPS, backend=backend) for w in ws])


def weights_case(spec: h.Spec, device: str, shape_list, own) -> h.Case:
    """The case of standardizing the weights of ``shape_list`` (fwd, bwd or full): bitfast's
    backends through ``own(ws, backend)`` (the standardized list), the baselines through the
    per-weight eager formulation and its compile; shared with ``weight_standardize_multi``."""
    from bitfast.ops import reference

    dtype = h.DTYPES[spec.dtype]
    es = torch.tensor([], dtype=dtype).element_size()
    numel = sum(math.prod(s) for s in shape_list)
    # Forward reads w and writes w_hat; backward reads dy and w and writes dw (the per
    # channel statistics are negligible).
    floor = {"fwd": 2 * numel * es, "bwd": 3 * numel * es, "full": 5 * numel * es}[spec.mode]
    sets = []
    for _ in range(h.input_sets(device, 3 * numel * es)):
        ws = [(0.05 * torch.randn(s, device=device)).to(dtype).requires_grad_() for s in shape_list]
        dys = [torch.randn(s, device=device).to(dtype) for s in shape_list]
        sets.append((tuple(ws), tuple(ws), dys))

    if spec.impl in backends.BACKENDS:

        def forward(*ws):
            return own(list(ws), spec.impl)

    else:

        def base(*ws):
            return [eager_weight_standardize(w, h.WS_EPS) for w in ws]

        forward = base if spec.impl == "eager" else h.compiled((spec.op, spec.shape, spec.dtype, device), base)

    def reference_fn(args, dy, mode):
        k = len(args)
        return h.ref_autograd(lambda *ws: [reference.weight_standardize(w, h.WS_EPS) for w in ws], args, range(k), dy, mode)

    fn, check = h.autograd_modes(spec, device, forward, sets, reference_fn)
    return h.Case(spec, device, fn, check, bytes_floor=floor, shape_value=shape_list)


h.register(h.BenchOp(
    "weight_standardize", modes=("fwd", "bwd", "full"), baselines=("eager", "compile"),
    shapes=_shapes, dtypes=_dtypes, layouts=lambda device, quick: ["-"], factory=_case,
    baseline_notes="`eager` (timm's `F.batch_norm` formulation), `compile` (`torch.compile` of it)",
    own_notes="every backend (`reference`, `cpp`, `cuda`, `triton`)", order=10,
))
