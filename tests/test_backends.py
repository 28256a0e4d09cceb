"""Backend choice: auto selection, explicit requests, the context manager and the env var."""

import pytest
import torch

import bitfast
from bitfast import backends


def test_reference_is_always_available():
    assert "reference" in bitfast.available_backends()
    assert set(bitfast.available_backends()) <= set(backends.BACKENDS)


def test_triton_available_under_interpreter():
    # tests/conftest.py sets TRITON_INTERPRET=1, so Triton kernels serve CPU tensors.
    pytest.importorskip("triton")
    assert backends.triton_interpreted()
    assert "triton" in bitfast.available_backends()
    assert backends.resolve("weight_standardize", "cpu", torch.float32, "triton") == "triton"


def test_auto_never_picks_the_interpreter_on_cpu():
    for family in backends.families():
        assert backends.resolve(family, "cpu", torch.float32) in ("cpp", "reference")


def test_auto_prefers_cpp_when_it_has_the_kernels():
    for family in backends.families():
        expected = "cpp" if not backends.not_supported_reasons("cpp", family, "cpu", torch.float32) else "reference"
        assert backends.resolve(family, "cpu", torch.float32) == expected


def test_auto_falls_back_to_reference_for_unsupported_dtypes():
    # No native or Triton kernel claims float64 weight standardization on CUDA without CUDA.
    assert backends.resolve("weight_standardize", "cuda", torch.float64) in ("cuda", "reference")


def test_explicit_backend_that_cannot_serve_lists_reasons():
    with pytest.raises(bitfast.BackendError, match=r"backend 'cuda' cannot run weight_standardize on cpu"):
        bitfast.ops.weight_standardize(torch.randn(4, 3), backend="cuda")
    with pytest.raises(bitfast.BackendError, match=r"serves cuda tensors, got cpu tensors"):
        bitfast.ops.weight_standardize(torch.randn(4, 3), backend="cuda")


def test_unknown_names():
    with pytest.raises(ValueError, match=r"unknown backend 'cudnn'"):
        backends.resolve("weight_standardize", "cpu", torch.float32, "cudnn")
    with pytest.raises(ValueError, match=r"unknown op family 'conv'"):
        backends.not_supported_reasons("reference", "conv", "cpu", torch.float32)
    with pytest.raises(TypeError, match=r"backend must be a str"):
        backends.resolve("weight_standardize", "cpu", torch.float32, 3)


def test_use_backend_context_nests_and_restores():
    assert backends.requested_backend() == "auto"
    with bitfast.use_backend("reference"):
        assert backends.requested_backend() == "reference"
        with bitfast.use_backend("auto"):
            assert backends.requested_backend() == "auto"
        assert backends.requested_backend() == "reference"
    assert backends.requested_backend() == "auto"
    with pytest.raises(ValueError):
        with bitfast.use_backend("nope"):
            pass


def test_use_backend_forces_the_ops(monkeypatch):
    calls = []
    real = bitfast.ops.reference.group_norm_relu

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bitfast.ops.reference, "group_norm_relu", spy)
    with bitfast.use_backend("reference"):
        bitfast.ops.group_norm_relu(torch.randn(1, 4, 2, 2), 2)
    assert calls == [1]


def test_env_var(monkeypatch):
    monkeypatch.setenv("BITFAST_BACKEND", "reference")
    assert backends.requested_backend() == "reference"
    monkeypatch.setenv("BITFAST_BACKEND", "CUDA ")
    assert backends.requested_backend() == "cuda"
    monkeypatch.setenv("BITFAST_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"unknown \$BITFAST_BACKEND 'fast'"):
        backends.requested_backend()
    # An explicit argument and a context both beat the variable.
    with bitfast.use_backend("reference"):
        assert backends.requested_backend() == "reference"
    assert backends.requested_backend("auto") == "auto"


def test_module_backend_is_validated_at_construction():
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        bitfast.nn.GroupNormReLU(8, 4, backend="fast")


@pytest.mark.parametrize("module", ["bitfast.nn", "bitfast.backends", "bitfast.optim", "bitfast.models", "bitfast.ops.reference", "bitfast.checkpoint"])
def test_any_submodule_can_be_imported_first(module):
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
