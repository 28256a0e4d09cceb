"""The benchmark of ``weight_standardize_multi``: all of a model's conv weights in one call,
every backend with a kernel for it, against timm's ``F.batch_norm`` formulation per weight and
its ``torch.compile`` (the same baselines as ``weight_standardize`` on the same sets)."""

from __future__ import annotations

from bitfast.bench import harness as h
from bitfast.bench.layers import weights
from bitfast.bench.ops.weight_standardize import weights_case

SETS = {
    ("cuda", False): ["R50x1 all convs", "R101x3 all convs"],
    ("cuda", True): ["R50x1 all convs"],
    ("cpu", False): ["R50x1 all convs"],
    ("cpu", True): ["R50x1 all convs"],
}


def _shapes(device: str, quick: bool) -> dict:
    return {label: weights(label) for label in SETS[(device, quick)]}


def _case(spec: h.Spec, device: str, shape_list, quick: bool) -> h.Case:
    from bitfast.ops import weight_standardize_multi

    return weights_case(spec, device, shape_list,
                        lambda ws, backend: weight_standardize_multi(ws, h.WS_EPS, backend=backend))


h.register(h.BenchOp(
    "weight_standardize_multi", modes=("fwd", "bwd", "full"), baselines=("eager", "compile"),
    shapes=_shapes, dtypes=lambda device, quick: ["fp32"] if quick else ["fp32", "bf16"],
    layouts=lambda device, quick: ["-"], factory=_case,
    baseline_notes="`eager` (timm's `F.batch_norm` formulation, per weight), `compile`",
    own_notes="every backend with a kernel for it (`reference`, `cpp`, `triton`)", order=11,
))
