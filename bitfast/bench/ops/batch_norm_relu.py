"""The benchmark of ``batch_norm_relu`` (training mode): every backend against timm's ``F.batch_norm``
+ ReLU and its ``torch.compile``, at the real BiT activations."""

from __future__ import annotations

from bitfast.bench import harness as h
from bitfast.bench.layers import activations
from bitfast.bench.norms import activation_dtypes, activation_layouts, norm_case

h.register(h.BenchOp(
    "batch_norm_relu", modes=("fwd", "bwd", "full"), baselines=("eager", "compile"),
    shapes=activations, dtypes=activation_dtypes, layouts=activation_layouts, factory=norm_case,
    baseline_notes="`eager` (`F.batch_norm` + in-place ReLU), `compile`", order=40,
))
