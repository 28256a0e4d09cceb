"""What the norm benchmarks share: their dtypes and layouts, and the case factory of
GroupNorm+ReLU and BatchNorm+ReLU (``bitfast/bench/ops/group_norm_relu.py`` and
``batch_norm_relu.py`` register it)."""

from __future__ import annotations

import torch

from bitfast import backends
from bitfast.bench import harness as h
from bitfast.bench.baselines import eager_batch_norm_relu, eager_group_norm_relu

__all__ = ["activation_dtypes", "activation_layouts", "norm_case"]


def activation_dtypes(device: str, quick: bool) -> list[str]:
    """Activations: float32 and bfloat16; --quick: bfloat16 on a GPU, float32 on a CPU."""
    if quick:
        return ["bf16"] if device == "cuda" else ["fp32"]
    return ["fp32", "bf16"]


def activation_layouts(device: str, quick: bool) -> list[str]:
    """Activations: NCHW and channels_last; --quick: channels_last (what training uses)."""
    return ["channels_last"] if quick else ["nchw", "channels_last"]


def norm_case(spec: h.Spec, device: str, shape, quick: bool) -> h.Case:
    """The case of GroupNorm+ReLU or BatchNorm+ReLU (training mode) at ``shape`` (N, C, H, W)."""
    from bitfast.ops import batch_norm_relu, group_norm_relu, reference

    dtype = h.DTYPES[spec.dtype]
    fmt = h.LAYOUTS[spec.layout]
    n, c, height, width = shape
    es = torch.tensor([], dtype=dtype).element_size()
    numel = n * c * height * width
    gn = spec.op == "group_norm_relu"
    # The floors of docs/performance.md: fwd reads x and writes y; bwd reads x and dy and writes dx; the
    # float32 affine parameters (and their gradients) are read/written once.
    floor = {"fwd": 2 * numel * es + 2 * c * 4, "bwd": 3 * numel * es + 4 * c * 4, "full": 5 * numel * es + 6 * c * 4}[spec.mode]
    nsets = h.input_sets(device, 3 * numel * es)
    sets = []
    for _ in range(nsets):
        x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt).requires_grad_()
        wt = (1 + 0.1 * torch.randn(c, device=device)).requires_grad_()
        b = (0.1 * torch.randn(c, device=device)).requires_grad_()
        dy = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
        extra = () if gn else (torch.zeros(c, device=device), torch.ones(c, device=device))
        sets.append(((x, wt, b) + extra, (x, wt, b), dy))

    if gn:

        def ref64(x, wt, b):
            return reference.group_norm_relu(x, h.GN_GROUPS, wt, b, h.EPS)

        eager = eager_group_norm_relu
        if spec.impl in backends.BACKENDS:

            def forward(x, wt, b):
                return group_norm_relu(x, h.GN_GROUPS, wt, b, h.EPS, backend=spec.impl)

    else:

        def ref64(x, wt, b):
            return reference.batch_norm_relu(x, None, None, wt, b, True, 0.1, h.EPS)

        def eager(x, wt, b, rm, rv):
            return eager_batch_norm_relu(x, rm, rv, wt, b)

        if spec.impl in backends.BACKENDS:

            def forward(x, wt, b, rm, rv):
                return batch_norm_relu(x, rm, rv, wt, b, training=True, eps=h.EPS, backend=spec.impl)

    if spec.impl in ("eager", "compile"):

        def base(*args):
            with h.autocast(device, dtype):
                return eager(*args)

        forward = base if spec.impl == "eager" else h.compiled((spec.op, spec.shape, spec.dtype, spec.layout, device), base)

    def reference_fn(args, dy, mode):
        return h.ref_autograd(ref64, args[:3], (0, 1, 2), dy, mode)

    fn, check = h.autograd_modes(spec, device, forward, sets, reference_fn)
    return h.Case(spec, device, fn, check, bytes_floor=floor, shape_value=shape)
