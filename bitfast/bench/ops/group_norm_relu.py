"""The benchmark of ``group_norm_relu``: every backend against timm's ``F.group_norm`` + ReLU and its
``torch.compile``, at the real BiT activations, forward, backward and both."""

from __future__ import annotations

from bitfast.bench import harness as h
from bitfast.bench.layers import activations
from bitfast.bench.norms import activation_dtypes, activation_layouts, norm_case

h.register(h.BenchOp(
    "group_norm_relu", modes=("fwd", "bwd", "full"), baselines=("eager", "compile"),
    shapes=activations, dtypes=activation_dtypes, layouts=activation_layouts, factory=norm_case,
    baseline_notes="`eager` (`F.group_norm` + in-place ReLU, under autocast for bf16), `compile`", order=20,
))
