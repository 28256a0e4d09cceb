"""The order in which ``auto`` tries backends on CUDA (no GPU needed): cuda, triton, then
reference for every family; a family in ``CUDA_UNVALIDATED`` (CUDA kernels not yet run on a
GPU) tries triton first; an explicit ``backend="cuda"`` is honoured."""

import pytest
import torch

from bitfast import backends


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
