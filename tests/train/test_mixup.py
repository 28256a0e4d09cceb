"""MixUp: the Beta draw, the mixing of inputs and targets, alpha 0, soft cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bitfast.train.mixup import mixup, sample_beta, soft_cross_entropy


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 4.0])
def test_sample_beta_moments(alpha):
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_beta(alpha, generator=g) for _ in range(3000)], dtype=torch.float64)
    assert float(draws.min()) >= 0.0 and float(draws.max()) <= 1.0
    var = 1.0 / (4.0 * (2.0 * alpha + 1.0))  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert abs(float(draws.mean()) - 0.5) < 4 * math.sqrt(var / 3000)
    assert float(draws.var()) == pytest.approx(var, rel=0.12)


def test_sample_beta_asymmetric_mean_and_determinism():
    g = torch.Generator().manual_seed(1)
    draws = torch.tensor([sample_beta(2.0, 6.0, generator=g) for _ in range(3000)])
    assert float(draws.mean()) == pytest.approx(0.25, abs=0.01)
    a = [sample_beta(0.1, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert a[0] == a[1]
    torch.manual_seed(9)
    first = sample_beta(0.3)
    torch.manual_seed(9)
    assert sample_beta(0.3) == first  # the global generator when none is given


def test_mixup_blends_inputs_and_targets():
    x = torch.randn(6, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    g = torch.Generator().manual_seed(0)
    xm, ym, lam = mixup(x, y, 0.4, num_classes=5, generator=g)
    assert 0.0 <= lam <= 1.0 and xm.shape == x.shape and ym.shape == (6, 5)
    # Recover the pairing the permutation made, and check both blends against it.
    g = torch.Generator().manual_seed(0)
    assert sample_beta(0.4, generator=g) == lam
    perm = torch.randperm(6, generator=g)
    assert torch.allclose(xm, lam * x + (1 - lam) * x[perm])
    onehot = F.one_hot(y, 5).float()
    assert torch.allclose(ym, lam * onehot + (1 - lam) * onehot[perm])
    assert torch.allclose(ym.sum(dim=1), torch.ones(6))


def test_mixup_alpha_zero_is_identity():
    x, y = torch.randn(4, 2), torch.tensor([1, 0, 2, 1])
    state = torch.get_rng_state()
    xm, ym, lam = mixup(x, y, 0.0, num_classes=3)
    assert xm is x and lam == 1.0
    assert torch.equal(ym, F.one_hot(y, 3).float())
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn


def test_mixup_soft_targets_and_dtypes():
    x = torch.randn(4, 2, dtype=torch.bfloat16)
    y = torch.softmax(torch.randn(4, 3), dim=1)
    xm, ym, lam = mixup(x, y, 1.0, num_classes=3, generator=torch.Generator().manual_seed(2))
    assert xm.dtype == ym.dtype == torch.bfloat16
    assert torch.allclose(ym.float().sum(dim=1), torch.ones(4), atol=1e-2)


def test_soft_cross_entropy():
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 1, 2])
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(y, 4).float()), F.cross_entropy(logits, y))
    soft = torch.tensor([[0.25, 0.75, 0.0, 0.0]]).expand(5, 4)
    want = 0.25 * F.cross_entropy(logits, torch.zeros(5, dtype=torch.long)) + 0.75 * F.cross_entropy(
        logits, torch.ones(5, dtype=torch.long)
    )
    assert torch.allclose(soft_cross_entropy(logits, soft), want)
    # Gradients flow, and low-precision logits are upcast.
    lg = logits.clone().bfloat16().requires_grad_()
    loss = soft_cross_entropy(lg, soft)
    loss.backward()
    assert loss.dtype == torch.float32 and lg.grad is not None


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: mixup(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), 0.1, 2), "same number"),
        (lambda: mixup(torch.zeros(2, 2), torch.tensor([0, 2]), 0.1, 2), r"\[0, 2\)"),
        (lambda: mixup(torch.zeros(2, 2), torch.tensor([0, 1]), -0.1, 2), "alpha"),
        (lambda: mixup(torch.zeros(2, 2), torch.tensor([0, 1]), 0.1, 0), "num_classes"),
        (lambda: mixup(torch.zeros(2, 2), torch.zeros(2, 3), 0.1, 2), "soft targets"),
        (lambda: sample_beta(0.0), "alpha"),
        (lambda: soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4)), "logits"),
    ],
)
def test_bad_input(call, words):
    with pytest.raises(ValueError, match=words):
        call()
