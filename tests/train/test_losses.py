"""bitfast.train.losses.distill_loss against a hand computation, gradcheck, bad input."""

import math

import pytest
import torch

from bitfast.train.losses import distill_loss


def _hand(s, t, y, alpha, T):
    """The loss written out sample by sample with Python floats."""
    total = 0.0
    n, c = len(s), len(s[0])
    for i in range(n):
        lse = math.log(sum(math.exp(v) for v in s[i]))
        if isinstance(y[i], int):
            ce = lse - s[i][y[i]]
        else:
            ce = -sum(y[i][k] * (s[i][k] - lse) for k in range(c))
        zs = sum(math.exp(v / T) for v in s[i])
        zt = sum(math.exp(v / T) for v in t[i])
        ps = [math.exp(v / T) / zs for v in s[i]]
        pt = [math.exp(v / T) / zt for v in t[i]]
        kl = sum(pt[k] * (math.log(pt[k]) - math.log(ps[k])) for k in range(c))
        total += (1 - alpha) * ce + alpha * T * T * kl
    return total / n


@pytest.mark.parametrize("alpha,T", [(0.5, 4.0), (0.0, 1.0), (1.0, 2.0), (0.3, 0.5)])
def test_matches_hand_computation_index_targets(alpha, T):
    s = torch.randn(4, 5, dtype=torch.float64)
    t = torch.randn(4, 5, dtype=torch.float64) * 3
    y = torch.tensor([0, 3, 4, 1])
    want = _hand(s.tolist(), t.tolist(), y.tolist(), alpha, T)
    got = distill_loss(s, t, y, alpha=alpha, T=T)
    assert got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_matches_hand_computation_soft_targets():
    s = torch.randn(3, 4, dtype=torch.float64)
    t = torch.randn(3, 4, dtype=torch.float64)
    y = torch.softmax(torch.randn(3, 4, dtype=torch.float64), dim=1)
    want = _hand(s.tolist(), t.tolist(), y.tolist(), 0.25, 3.0)
    assert distill_loss(s, t, y, alpha=0.25, T=3.0).item() == pytest.approx(want, rel=1e-12)


def test_reductions_and_identical_logits():
    s = torch.randn(6, 7)
    y = torch.randint(0, 7, (6,))
    per = distill_loss(s, s.clone(), y, alpha=0.4, T=2.0, reduction="none")
    assert per.shape == (6,)
    # Same logits: KL is zero, only the weighted cross-entropy remains.
    ce = torch.nn.functional.cross_entropy(s, y, reduction="none")
    torch.testing.assert_close(per, 0.6 * ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(distill_loss(s, s, y, 0.4, 2.0, reduction="sum"), per.sum())
    torch.testing.assert_close(distill_loss(s, s, y, 0.4, 2.0), per.mean())


@pytest.mark.parametrize("soft", [False, True])
def test_gradcheck(soft):
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.softmax(torch.randn(3, 4, dtype=torch.float64), 1) if soft else torch.tensor([1, 0, 3])
    assert torch.autograd.gradcheck(lambda a, b: distill_loss(a, b, y, alpha=0.7, T=2.5), (s, t))
    assert torch.autograd.gradgradcheck(lambda a, b: distill_loss(a, b, y, alpha=0.7, T=2.5), (s, t))


def test_bad_input():
    s, y = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="teacher has 10 classes and student 5"):
        distill_loss(s, torch.randn(2, 10), y)
    with pytest.raises(ValueError, match="batch"):
        distill_loss(s, torch.randn(3, 5), y)
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(s, s, y, alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(s, s, y, alpha=-0.1)
    for bad_t in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            distill_loss(s, s, y, T=bad_t)
    with pytest.raises(ValueError, match=r"expected \(N,\)"):
        distill_loss(s, s, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="soft targets"):
        distill_loss(s, s, torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"expected \(N, num_classes\)"):
        distill_loss(torch.randn(5), s, y)
    with pytest.raises(ValueError, match="reduction"):
        distill_loss(s, s, y, reduction="batchmean")
    with pytest.raises(TypeError, match="targets have dtype"):
        distill_loss(s, s, torch.tensor([True, False]))
