"""The benchmark of ``group_norm_relu_add``: every backend against the unfused residual add then
timm's GroupNorm+ReLU, and its ``torch.compile``, at the real BiT activations."""

from __future__ import annotations

import torch

from bitfast import backends
from bitfast.bench import harness as h
from bitfast.bench.baselines import eager_group_norm_relu_add
from bitfast.bench.layers import activations
from bitfast.bench.norms import activation_dtypes, activation_layouts


def _case(spec: h.Spec, device: str, shape, quick: bool) -> h.Case:
    from bitfast.ops import group_norm_relu_add, reference

    dtype = h.DTYPES[spec.dtype]
    fmt = h.LAYOUTS[spec.layout]
    n, c, height, width = shape
    es = torch.tensor([], dtype=dtype).element_size()
    numel = n * c * height * width
    # Floors: fwd reads a and b and writes the sum and y; bwd reads dy, d(sum) and the sum
    # and writes one gradient (a's and b's are the same tensor); parameters once.
    floor = {"fwd": 4 * numel * es + 2 * c * 4, "bwd": 4 * numel * es + 4 * c * 4, "full": 8 * numel * es + 6 * c * 4}[spec.mode]
    sets = []
    for _ in range(h.input_sets(device, 4 * numel * es)):
        a, b = (torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt).requires_grad_() for _ in range(2))
        wt = (1 + 0.1 * torch.randn(c, device=device)).requires_grad_()
        bias = (0.1 * torch.randn(c, device=device)).requires_grad_()
        dys = tuple(torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt) for _ in range(2))
        sets.append(((a, b, wt, bias), (a, b, wt, bias), dys))

    def ref64(a, b, wt, bias):
        return reference.group_norm_relu_add(a, b, h.GN_GROUPS, wt, bias, h.EPS)

    if spec.impl in backends.BACKENDS:

        def forward(a, b, wt, bias):
            return group_norm_relu_add(a, b, h.GN_GROUPS, wt, bias, h.EPS, backend=spec.impl)

    else:

        def base(*args):
            with h.autocast(device, dtype):
                return eager_group_norm_relu_add(*args)

        forward = base if spec.impl == "eager" else h.compiled((spec.op, spec.shape, spec.dtype, spec.layout, device), base)

    def reference_fn(args, dy, mode):
        return h.ref_autograd(ref64, args, (0, 1, 2, 3), dy, mode)

    fn, check = h.autograd_modes(spec, device, forward, sets, reference_fn)
    return h.Case(spec, device, fn, check, bytes_floor=floor, shape_value=shape)


h.register(h.BenchOp(
    "group_norm_relu_add", modes=("fwd", "bwd", "full"), baselines=("eager", "compile"),
    shapes=activations, dtypes=activation_dtypes, layouts=activation_layouts, factory=_case,
    baseline_notes="`eager` (`a + b`, then `F.group_norm` + in-place ReLU, under autocast for bf16), `compile`",
    order=30,
))
