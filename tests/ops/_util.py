"""Tolerances and helpers shared by the op parity tests.

The rule (flash-attention's): in a low-precision dtype, bitfast's error against a float64
evaluation of the reference must be at most twice the error of PyTorch's own eager op in
that dtype against the same float64 reference, plus a small per-dtype floor. Errors are
relative: ||out - ref|| / ||ref||.
"""

from __future__ import annotations

import pytest
import torch

import bitfast
from bitfast import backends

FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN or inf"
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def assert_parity(out: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor | None, dtype: torch.dtype, what: str):
    """``out`` is within 2x the baseline's error (plus the dtype's floor) of ``ref64``."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref64.shape)}"
    err = rel_err(out, ref64)
    base = rel_err(baseline, ref64) if baseline is not None else 0.0
    tol = 2 * base + FLOOR[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} > tolerance {tol:.3e} (PyTorch's own: {base:.3e})"


def require_backend(name: str, family: str, device: str, dtype: torch.dtype) -> None:
    """Skip (with the reasons) when ``name`` cannot serve ``family`` here."""
    if name == REFERENCE_OP:
        name = "reference"
    reasons = backends.not_supported_reasons(name, family, device, dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so an unwritten output element cannot pass."""
    return t.fill_(float("nan"))


def device_backends() -> list:
    """(device, backend) pairs to test: every backend that could serve each device here."""
    pairs = [("cpu", "reference"), ("cpu", REFERENCE_OP), ("cpu", "cpp"), ("cpu", "triton")]
    if torch.cuda.is_available():
        pairs += [("cuda", "reference"), ("cuda", REFERENCE_OP), ("cuda", "cuda"), ("cuda", "triton")]
    return [pytest.param(d, b, id=f"{d}-{b}") for d, b in pairs]


def native_backends() -> list:
    """(device, backend) pairs of the native backends, for the tests of their ops
    (``torch.ops.bitfast.native_*``): ``cpp`` on the CPU, and ``cuda`` marked ``cuda`` (so
    that tests/conftest.py skips it without a GPU). Each test also skips, saying why, when
    its backend is not built here (``require`` in tests/ops/_native_cases.py)."""
    return [
        pytest.param("cpu", "cpp", id="cpu-cpp"),
        pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.cuda),
    ]


# "reference-op" runs the registered op with the reference kernels (the explicit
# forward/backward formulas of bitfast.ops.reference), while "reference" through the public
# API runs the differentiable PyTorch composite. Both are tested.
REFERENCE_OP = "reference-op"


def _fmt(x):
    from bitfast.ops.group_norm_relu import memory_format

    return x.contiguous(memory_format=memory_format(x))


def weight_standardize(backend):
    """``bitfast.ops.weight_standardize`` on ``backend`` (or through the op, see REFERENCE_OP)."""
    if backend == REFERENCE_OP:
        return lambda w, eps=1e-8: torch.ops.bitfast.weight_standardize_fwd(w, eps, "reference")[0]
    return lambda w, eps=1e-8: bitfast.ops.weight_standardize(w, eps, backend=backend)


def std_conv2d(backend):
    """``bitfast.ops.std_conv2d`` on ``backend`` (keyword arguments stride, padding, groups, eps)."""
    if backend == REFERENCE_OP:
        def f(x, w, b, stride=1, padding=0, groups=1, eps=1e-8):
            return torch.ops.bitfast.std_conv2d(x, w, b, [stride] * 2, [padding] * 2, [1, 1], groups, eps, "reference")
        return f
    return lambda x, w, b, **kw: bitfast.ops.std_conv2d(x, w, b, backend=backend, **kw)


def group_norm_relu(backend):
    """``bitfast.ops.group_norm_relu`` on ``backend``."""
    if backend == REFERENCE_OP:
        def f(x, num_groups, weight=None, bias=None, eps=1e-5, relu=True):
            return torch.ops.bitfast.group_norm_relu_fwd(_fmt(x), weight, bias, num_groups, eps, relu, "reference")[0]
        return f
    return lambda *a, **kw: bitfast.ops.group_norm_relu(*a, backend=backend, **kw)


def batch_norm_relu(backend):
    """``bitfast.ops.batch_norm_relu`` on ``backend``."""
    if backend == REFERENCE_OP:
        def f(x, rm, rv, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, relu=True):
            y, mean, var = torch.ops.bitfast.batch_norm_relu_fwd(_fmt(x), rm, rv, weight, bias, training, eps, relu, "reference")
            if training and rm is not None:
                count = x.numel() // x.shape[1]
                torch.ops.bitfast.batch_norm_update_stats_(rm, rv, mean, var, momentum, count, "reference")
            return y
        return f
    return lambda *a, **kw: bitfast.ops.batch_norm_relu(*a, backend=backend, **kw)
