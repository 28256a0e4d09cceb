"""The order in which ``auto`` tries backends on CUDA (no GPU needed): GroupNorm+ReLU and
BatchNorm+ReLU prefer triton over their not-yet-GPU-validated CUDA kernels, weight
standardization and SGD keep cuda first, and an explicit ``backend="cuda"`` is honoured."""

import pytest
import torch

from bitfast import backends


def test_priority_lists():
    for family in ("group_norm_relu", "batch_norm_relu"):
        assert family in backends.CUDA_UNVALIDATED
        assert backends.priority(family, "cuda") == ("triton", "cuda", "reference")
        assert backends.priority(family, "cpu") == ("cpp", "reference")
    for family in ("weight_standardize", "sgd_momentum"):
        assert family not in backends.CUDA_UNVALIDATED
        assert backends.priority(family, "cuda") == ("cuda", "triton", "reference")
    assert backends.priority("group_norm_relu", "mps") == ()
    # every registered family gets a permutation of its device's list
    for family in backends.families():
        assert sorted(backends.priority(family, "cuda")) == ["cuda", "reference", "triton"]


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


def test_auto_on_cuda_prefers_triton_for_the_norms(able):
    able.update({"cuda", "triton", "reference"})
    assert backends.resolve("group_norm_relu", "cuda", torch.bfloat16) == "triton"
    assert backends.resolve("batch_norm_relu", "cuda", torch.float32) == "triton"
    assert backends.resolve("weight_standardize", "cuda", torch.float32) == "cuda"
    assert backends.resolve("sgd_momentum", "cuda", torch.float32) == "cuda"
    # an explicit request still runs the CUDA kernels
    assert backends.resolve("group_norm_relu", "cuda", torch.bfloat16, "cuda") == "cuda"
    assert backends.resolve("batch_norm_relu", "cuda", torch.float32, "cuda") == "cuda"


def test_auto_on_cuda_falls_back_to_cuda_without_triton(able):
    able.update({"cuda", "reference"})
    assert backends.resolve("group_norm_relu", "cuda", torch.float64) == "cuda"
    assert backends.resolve("batch_norm_relu", "cuda", torch.float64) == "cuda"
    able.discard("cuda")
    assert backends.resolve("group_norm_relu", "cuda", torch.float32) == "reference"
