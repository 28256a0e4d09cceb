"""Few-shot building blocks: k-shot subsets, feature extraction, the ridge head (against
torch.linalg.lstsq and the closed form), lambda selection, episodes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bitfast.data import DigitsDataset
from bitfast.models import ResNetV2
from bitfast.train import ridge as fewshot
from bitfast.train.ridge import (
    extract_features,
    kshot_indices,
    ridge_head,
    ridge_predict,
    run_ridge_episodes,
    select_lambda,
)


def _clusters(n_per_class=30, classes=4, dim=16, spread=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g, dtype=torch.float64) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    z = centres[y] + spread * torch.randn(len(y), dim, generator=g, dtype=torch.float64)
    return z.float(), y


def test_kshot_indices_balanced_and_deterministic():
    targets = torch.tensor([0] * 7 + [1] * 5 + [2] * 9)
    idx = kshot_indices(targets, 3, seed=0)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == 9
    assert torch.bincount(targets[idx]).tolist() == [3, 3, 3]
    assert torch.equal(kshot_indices(targets, 3, seed=0), idx)
    assert not all(torch.equal(kshot_indices(targets, 3, seed=s), idx) for s in range(1, 5))
    # Nested: the 5-shot draw contains the 3-shot one of the same seed.
    assert set(idx.tolist()) <= set(kshot_indices(targets, 5, seed=0).tolist())
    sub = kshot_indices(targets, 2, seed=1, classes=[2, 0])
    assert sorted(set(targets[sub].tolist())) == [0, 2] and len(sub) == 4


def test_kshot_indices_errors():
    targets = torch.tensor([0] * 7 + [1] * 2)
    with pytest.raises(ValueError, match="class 1 has 2 example"):
        kshot_indices(targets, 3, seed=0)
    with pytest.raises(ValueError, match="class 5 has 0"):
        kshot_indices(targets, 1, seed=0, classes=[0, 5])
    with pytest.raises(ValueError, match="k must be"):
        kshot_indices(targets, 0, seed=0)
    with pytest.raises(ValueError, match="labels"):
        kshot_indices(torch.zeros(3), 1, seed=0)


def _augmented_lstsq(Z, Y, lam):
    """Ridge with a free bias as one least-squares problem:
    [Z 1; sqrt(lam) I 0] [W; b] = [Y; 0]."""
    n, d = Z.shape
    top = torch.cat([Z, torch.ones(n, 1, dtype=Z.dtype)], dim=1)
    bottom = torch.cat([lam**0.5 * torch.eye(d, dtype=Z.dtype), torch.zeros(d, 1, dtype=Z.dtype)], dim=1)
    rhs = torch.cat([Y, torch.zeros(d, Y.shape[1], dtype=Y.dtype)])
    sol = torch.linalg.lstsq(torch.cat([top, bottom]), rhs, driver="gelsd").solution
    return sol[:d], sol[d]


@pytest.mark.parametrize("n, d", [(40, 8), (10, 50)])  # the primal (D <= N) and dual (D > N) solves
@pytest.mark.parametrize("lam", [1e-2, 1.0, 30.0])
def test_ridge_head_matches_lstsq(n, d, lam):
    g = torch.Generator().manual_seed(n + d)
    Z = torch.randn(n, d, generator=g, dtype=torch.float64) + 2.0  # off-centre: the bias matters
    y = torch.randint(0, 3, (n,), generator=g)
    W, b = ridge_head(Z, y, lam, num_classes=3)
    assert W.shape == (d, 3) and b.shape == (3,) and W.dtype == torch.float64
    W_ref, b_ref = _augmented_lstsq(Z, torch.nn.functional.one_hot(y, 3).double(), lam)
    assert torch.allclose(W, W_ref, atol=1e-8) and torch.allclose(b, b_ref, atol=1e-8)


def test_ridge_head_closed_form_on_centred_data():
    # On centred features and targets the bias vanishes and W is phi = (Z^T Z + lam I)^-1 Z^T Y.
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(25, 6, generator=g, dtype=torch.float64)
    Y = torch.randn(25, 4, generator=g, dtype=torch.float64)
    Z, Y = Z - Z.mean(0), Y - Y.mean(0)
    lam = 0.7
    phi = torch.linalg.inv(Z.T @ Z + lam * torch.eye(6, dtype=torch.float64)) @ Z.T @ Y
    W, b = ridge_head(Z, Y, lam)
    assert torch.allclose(W, phi, atol=1e-10) and b.abs().max() < 1e-10
    # float32 input is solved in float64 too.
    W32, _ = ridge_head(Z.float(), Y, lam)
    assert W32.dtype == torch.float64 and torch.allclose(W32, phi, atol=1e-5)
    assert torch.allclose(ridge_predict(Z, W, b), Z @ phi, atol=1e-10)


def test_loo_errors_match_refits():
    Z, y = _clusters(n_per_class=4, classes=3, dim=7, spread=2.0)
    Z, Y = Z.double(), torch.nn.functional.one_hot(y, 3).double()
    lambdas = [0.01, 1.0, 50.0]
    fast = fewshot._loo_errors(Z, Y, lambdas)
    for lam, got in zip(lambdas, fast):
        total = 0.0
        for i in range(len(Z)):
            keep = torch.arange(len(Z)) != i
            W, b = ridge_head(Z[keep], Y[keep], lam)
            total += float(((ridge_predict(Z[i : i + 1], W, b) - Y[i]) ** 2).sum())
        assert got == pytest.approx(total, rel=1e-8)


def test_select_lambda_holdout_picks_the_best_heldout_accuracy():
    Z, y = _clusters(n_per_class=10, classes=3, dim=20, spread=3.0, seed=1)
    lambdas = [1e-3, 1e-1, 10.0, 1e3]
    lam = select_lambda(Z, y, lambdas, holdout_fraction=0.3, seed=4)
    assert lam in lambdas and select_lambda(Z, y, lambdas, holdout_fraction=0.3, seed=4) == lam
    fit, held = fewshot._holdout_split(y, 0.3, 4)
    assert len(held) == 9 and torch.bincount(y[held]).tolist() == [3, 3, 3]
    accs = []
    for v in lambdas:
        W, b = ridge_head(Z[fit], y[fit], v, num_classes=3)
        accs.append(float((ridge_predict(Z[held], W, b).argmax(1) == y[held]).double().mean()))
    assert accs[lambdas.index(lam)] == max(accs)
    assert select_lambda(Z, y, [0.5]) == 0.5


def test_select_lambda_one_shot_uses_leave_one_out():
    Z, y = _clusters(n_per_class=1, classes=5, dim=9)
    lambdas = [1e-3, 1.0, 1e3]
    errors = fewshot._loo_errors(Z.double(), torch.nn.functional.one_hot(y, 5).double(), lambdas)
    assert select_lambda(Z, y, lambdas) == lambdas[min(range(3), key=errors.__getitem__)]
    with pytest.raises(ValueError, match="lambdas"):
        select_lambda(Z, y, [0.0, 1.0])
    with pytest.raises(ValueError, match="holdout_fraction"):
        select_lambda(Z, y, holdout_fraction=1.0)


def test_run_ridge_episodes_on_separable_clusters():
    Z_train, y_train = _clusters(n_per_class=30, classes=4, seed=0)
    Z_test, y_test = Z_train + 0.1 * torch.randn_like(Z_train), y_train
    out = run_ridge_episodes(Z_train, y_train, Z_test, y_test, shots=(1, 5), seeds=(0, 1, 2))
    assert set(out) == {1, 5}
    for k in (1, 5):
        r = out[k]
        assert len(r["accuracies"]) == 3 and len(r["lambdas"]) == 3 and r["seeds"] == [0, 1, 2]
        assert r["mean"] == pytest.approx(sum(r["accuracies"]) / 3)
        assert r["std"] == pytest.approx(float(torch.tensor(r["accuracies"]).std()), abs=1e-9)
    assert out[5]["mean"] > 0.95
    again = run_ridge_episodes(Z_train, y_train, Z_test, y_test, shots=(1, 5), seeds=(0, 1, 2))
    assert again == out
    one = run_ridge_episodes(Z_train, y_train, Z_test, y_test, shots=(2,), seeds=(3,))
    assert one[2]["std"] == 0.0
    with pytest.raises(ValueError, match="class 0 has 30"):
        run_ridge_episodes(Z_train, y_train, Z_test, y_test, shots=(31,))


def test_ridge_on_raw_digit_pixels():
    # The embedded digits 5-9 with raw 8x8 pixels as features: a linear head from 10 examples
    # a class already separates most of the test set (about 0.93 measured; chance is 0.2).
    train = DigitsDataset(classes=range(5, 10), split="train", resolution=8, channels=1)
    test = DigitsDataset(classes=range(5, 10), split="test", resolution=8, channels=1)
    out = run_ridge_episodes(
        train.images.flatten(1), train.targets, test.images.flatten(1), test.targets, shots=(1, 10), seeds=(0, 1)
    )
    assert out[10]["mean"] > 0.85 and out[1]["mean"] > 0.5
    assert out[10]["mean"] > out[1]["mean"]


def test_extract_features_eval_mode_and_callables():
    x = torch.randn(10, 3, 4, 4)
    y = torch.arange(10) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    net = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(48, 5))
    net.train()
    Z, labels = extract_features(net, loader)
    assert Z.shape == (10, 5) and Z.dtype == torch.float32 and torch.equal(labels, y)
    assert net.training  # mode restored
    with torch.no_grad():
        assert torch.allclose(Z, net.eval()(x))  # dropout was off
    Z2, _ = extract_features(lambda t: t.mean(dim=(2, 3), keepdim=True), loader)
    assert Z2.shape == (10, 3)


def test_extract_features_from_a_headless_resnet():
    model = ResNetV2((1, 1, 1, 1), num_classes=0, base_width=32, backend="reference")
    loader = DataLoader(TensorDataset(torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 0])), batch_size=2)
    Z, y = extract_features(model, loader)
    assert Z.shape == (3, model.num_features) and y.tolist() == [0, 1, 0]
    assert torch.isfinite(Z).all()


def test_ridge_bad_input():
    with pytest.raises(ValueError, match="lam"):
        ridge_head(torch.zeros(3, 2), torch.tensor([0, 1, 0]), 0.0)
    with pytest.raises(ValueError, match="N = 3"):
        ridge_head(torch.zeros(3, 2), torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError, match="Z must be"):
        ridge_head(torch.zeros(3), torch.tensor([0, 1, 0]), 1.0)
    with pytest.raises(ValueError, match="W"):
        ridge_predict(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="pairs"):
        extract_features(nn.Identity(), [torch.zeros(2, 3)])
