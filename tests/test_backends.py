"""Backend choice: auto selection, explicit requests, the context manager and the env var; and
the order in which ``auto`` tries backends on CUDA (no GPU needed): cuda, triton, then
reference for every family; a family in ``CUDA_UNVALIDATED`` (CUDA kernels not yet run on a
GPU) tries triton first; an explicit ``backend="cuda"`` is honoured."""

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


# The CUDA priority order.

def test_priority_lists():
    for family in ("group_norm_relu", "batch_norm_relu", "weight_standardize", "sgd_momentum"):
        assert family not in backends.CUDA_UNVALIDATED
        assert backends.priority(family, "cuda") == ("cuda", "triton", "reference")
        assert backends.priority(family, "cpu") == ("cpp", "reference")
    assert backends.priority("group_norm_relu_add", "cuda") == ("triton", "cuda", "reference")
    assert backends.priority("group_norm_relu", "mps") == ()
    # every registered family gets a permutation of its device's list
    for family in backends.families():
        assert sorted(backends.priority(family, "cuda")) == ["cuda", "reference", "triton"]


def test_unvalidated_families_try_triton_first(monkeypatch):
    monkeypatch.setattr(backends, "CUDA_UNVALIDATED", frozenset({"batch_norm_relu"}))
    assert backends.priority("batch_norm_relu", "cuda") == ("triton", "cuda", "reference")
    assert backends.priority("batch_norm_relu", "cpu") == ("cpp", "reference")
    assert backends.priority("group_norm_relu", "cuda") == ("cuda", "triton", "reference")


@pytest.fixture
def able(monkeypatch):
    """Pretend the backends in the returned set can serve every op (as on a GPU machine
    with every build), whatever this machine has."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    serving: set[str] = set()

    def reasons(backend, op, device_type, dtype):
        return [] if backend in serving else [f"{backend}: not here"]

    monkeypatch.setattr(backends, "not_supported_reasons", reasons)
    return serving


def test_auto_on_cuda_prefers_the_cuda_kernels(able, monkeypatch):
    able.update({"cuda", "triton", "reference"})
    for family in ("group_norm_relu", "batch_norm_relu", "weight_standardize", "sgd_momentum"):
        assert backends.resolve(family, "cuda", torch.bfloat16) == "cuda"
    # a family marked unvalidated goes to triton, unless cuda is asked for
    monkeypatch.setattr(backends, "CUDA_UNVALIDATED", frozenset({"group_norm_relu"}))
    assert backends.resolve("group_norm_relu", "cuda", torch.bfloat16) == "triton"
    assert backends.resolve("group_norm_relu", "cuda", torch.bfloat16, "cuda") == "cuda"
    assert backends.resolve("batch_norm_relu", "cuda", torch.float32) == "cuda"


def test_auto_on_cuda_falls_back_in_order(able):
    able.update({"triton", "reference"})
    assert backends.resolve("group_norm_relu", "cuda", torch.float32) == "triton"
    assert backends.resolve("batch_norm_relu", "cuda", torch.float32) == "triton"
    able.discard("triton")
    assert backends.resolve("group_norm_relu", "cuda", torch.float32) == "reference"
