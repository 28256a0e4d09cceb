"""The BiT layers the benchmarks measure: the real activations of BiT-R50x1 and BiT-R101x3 (at batch
128 and 32, 224x224 images, on a GPU; batch 2 and 1 on a CPU), their conv weights and their
parameters."""

from __future__ import annotations

import functools

__all__ = ["activations", "conv_shapes", "param_shapes", "weights"]

# (label, model, channels, spatial size at 224x224 input)
_ACTS = (
    ("R50x1 s1 mid", "r50x1", 64, 56),
    ("R50x1 s1 out", "r50x1", 256, 56),
    ("R50x1 s2 mid", "r50x1", 128, 28),
    ("R50x1 s3 out", "r50x1", 1024, 14),
    ("R50x1 s4 out", "r50x1", 2048, 7),
    ("R101x3 s1 out", "r101x3", 768, 56),
    ("R101x3 s3 mid", "r101x3", 768, 14),
    ("R101x3 s4 out", "r101x3", 6144, 7),
)
_BATCH = {"cuda": {"r50x1": 128, "r101x3": 32}, "cpu": {"r50x1": 2, "r101x3": 1}}
_ACT_SETS = {
    ("cuda", False): [a[0] for a in _ACTS],
    ("cuda", True): ["R50x1 s1 mid", "R50x1 s3 out", "R101x3 s1 out"],
    ("cpu", False): ["R50x1 s1 mid", "R50x1 s3 out", "R101x3 s3 mid"],
    ("cpu", True): ["R50x1 s1 mid", "R101x3 s3 mid"],
}

_MODEL_NAMES = {"r50x1": "resnetv2_50x1_bit", "r101x3": "resnetv2_101x3_bit"}


@functools.cache
def conv_shapes(model: str) -> tuple[tuple[int, ...], ...]:
    """The weight shapes of every standardized conv of ``model`` (built on the meta device)."""
    import bitfast

    m = bitfast.create_model(_MODEL_NAMES[model], device="meta")
    return tuple(tuple(mod.weight.shape) for mod in m.modules() if isinstance(mod, bitfast.nn.StdConv2d))


@functools.cache
def param_shapes(model: str) -> tuple[tuple[int, ...], ...]:
    """The shapes of every parameter of ``model`` (built on the meta device)."""
    import bitfast

    m = bitfast.create_model(_MODEL_NAMES[model], device="meta")
    return tuple(tuple(p.shape) for p in m.parameters())


def weights(label: str) -> list[tuple[int, ...]]:
    """The conv weight shapes named ``label``: one real layer, or every conv of a model
    (``"R50x1 all convs"``)."""
    table = {
        "R50x1 s1 conv2 3x3": [(64, 64, 3, 3)],
        "R50x1 s4 conv2 3x3": [(512, 512, 3, 3)],
        "R101x3 s4 conv2 3x3": [(1536, 1536, 3, 3)],
    }
    if label in table:
        return table[label]
    model = label.split()[0].lower()
    return list(conv_shapes(model))


def activations(device: str, quick: bool) -> dict[str, tuple[int, int, int, int]]:
    """The (N, C, H, W) activations the norms are measured at, by name."""
    out = {}
    for label, model, c, hw in _ACTS:
        if label in _ACT_SETS[(device, quick)]:
            n = _BATCH[device][model]
            out[f"{label} {n}x{c}x{hw}x{hw}"] = (n, c, hw, hw)
    return out
