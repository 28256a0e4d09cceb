"""Wiring of the public ops to their backends: one Python kernel per op for CPU and CUDA
that hands the work to the backend named by the op's last argument, and the fakes."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bitfast import backends
from bitfast.ops import _library, reference

_REFERENCE: dict[str, Callable] = {
    "weight_standardize_fwd": reference.weight_standardize_forward,
    "weight_standardize_bwd": reference.weight_standardize_backward,
    "group_norm_relu_fwd": reference.group_norm_relu_forward,
    "group_norm_relu_bwd": reference.group_norm_relu_backward,
    "group_norm_relu_add_fwd": reference.group_norm_relu_add_forward,
    "group_norm_relu_add_bwd": reference.group_norm_relu_add_backward,
    "batch_norm_relu_fwd": reference.batch_norm_relu_forward,
    "batch_norm_relu_bwd": reference.batch_norm_relu_backward,
    "batch_norm_update_stats_": reference.batch_norm_update_stats_,
    "sgd_momentum_": reference.sgd_momentum_,
}


def run(op: str, backend: str, *args):
    """Compute ``op`` on ``backend`` (the kernel behind ``torch.ops.bitfast.<op>``)."""
    if backend == "reference":
        return _REFERENCE[op](*args)
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.bitfast, "native_" + op)(*args)
    if backend == "triton":
        return backends.triton_launcher(op)(*args)
    raise ValueError(f"bitfast::{op}: unknown backend {backend!r}; expected one of {backends.BACKENDS}")


def register(op: str, fake: Callable) -> None:
    """Attach the backend-dispatching kernel of ``op`` and the fake of ``op`` and
    ``native_<op>``. ``fake`` takes the native op's arguments (no backend)."""

    def kernel(*args):
        return run(op, args[-1], *args[:-1])

    def fake_public(*args):
        return fake(*args[:-1])

    torch.library.register_kernel(_library.qualname(op), ("cpu", "cuda"), kernel, lib=_library.lib)
    torch.library.register_fake(_library.qualname(op), fake_public, lib=_library.lib)
    torch.library.register_fake(_library.qualname("native_" + op), fake, lib=_library.lib)
