"""Few-shot transfer with frozen features and a closed-form ridge-regression head.

Kolesnikov et al., 2020, "Big Transfer (BiT)", section 4 (few-shot): draw ``k`` examples
of every class (:func:`kshot_indices`), embed them with the frozen pre-trained network
(:func:`extract_features`), fit a linear head to one-hot targets by ridge regression,

    phi = (Z^T Z + lambda I)^-1 Z^T Y,

with an unregularised bias (:func:`ridge_head`), choose ``lambda`` on a held-out part of the
k-shot set (:func:`select_lambda`), and report the mean and spread of the test accuracy over
several random draws (:func:`run_ridge_episodes`). All solves run in float64.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from bitfast.ops import checks

__all__ = [
    "DEFAULT_LAMBDAS",
    "extract_features",
    "kshot_indices",
    "ridge_head",
    "ridge_predict",
    "run_ridge_episodes",
    "select_lambda",
]

# A log grid 1e-3 .. 1e3, two points a decade.
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(10.0 ** (e / 2) for e in range(-6, 7))


def _labels(fn: str, y) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{fn}: labels must be an int tensor (N,); got {y.dtype} {tuple(y.shape)}")
    return y.long()


def kshot_indices(targets, k: int, seed: int, classes: Iterable[int] | None = None) -> torch.Tensor:
    """Indices of a balanced k-shot subset: exactly ``k`` examples of each class, drawn
    without replacement from ``seed``.

    ``classes`` (default: every label in ``targets``) selects the classes. A class's draw
    depends on the seed and the class only, and the subset for ``k`` contains the one for
    any smaller ``k`` with the same seed. Returns sorted int64 indices into ``targets``;
    raises ``ValueError`` naming a class with fewer than ``k`` examples.
    """
    targets = _labels("kshot_indices", targets).cpu()
    k = checks.int_at_least("kshot_indices", "k", k, 1)
    classes = torch.unique(targets).tolist() if classes is None else [int(c) for c in classes]
    if not classes:
        raise ValueError("kshot_indices: no classes to draw from")
    chosen = []
    for c in classes:
        members = torch.nonzero(targets == c).flatten()
        if len(members) < k:
            raise ValueError(
                f"kshot_indices: class {c} has {len(members)} example(s); k={k} needs at least {k} per class "
                "(lower k or drop the class)"
            )
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + c) % 2**63)
        chosen.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(chosen).sort().values


@torch.no_grad()
def extract_features(
    model: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every batch of ``loader`` with ``model``: ``(Z float32 (N, D), y int64 (N,))`` on CPU.

    ``model`` is typically a ResNetV2 built with ``num_classes=0`` (it returns the pooled
    pre-logits features), but any callable mapping a batch to ``(N, ...)`` works (outputs are
    flattened). An ``nn.Module`` runs in eval mode (its previous mode is restored) under
    ``no_grad``. ``loader`` yields ``(x, y)`` pairs. ``device`` defaults to the module's
    parameters' device (CPU for other callables).
    """
    if not callable(model):
        raise TypeError(f"extract_features: model must be callable; got {type(model).__name__}")
    module = model if isinstance(model, torch.nn.Module) else None
    if device is None:
        param = next(module.parameters(), None) if module is not None else None
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("extract_features: the loader must yield (inputs, labels) pairs")
            x, y = batch[0], batch[1]
            z = model(x.to(device, non_blocking=True))
            feats.append(z.reshape(len(z), -1).float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    finally:
        if module is not None:
            module.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


def _targets(fn: str, Y, n: int, num_classes: int | None) -> torch.Tensor:
    Y = torch.as_tensor(Y)
    if Y.dim() == 1:
        Y = _labels(fn, Y)
        if num_classes is None:
            num_classes = int(Y.max()) + 1 if len(Y) else 0
        if len(Y) and (int(Y.min()) < 0 or int(Y.max()) >= num_classes):
            raise ValueError(f"{fn}: labels must be in [0, {num_classes}); got [{int(Y.min())}, {int(Y.max())}]")
        Y = F.one_hot(Y, num_classes)
    if Y.dim() != 2 or len(Y) != n:
        raise ValueError(f"{fn}: targets must be labels (N,) or one-hot/regression targets (N, C) with N = {n}")
    return Y.to(torch.float64)


def ridge_head(
    Z: torch.Tensor,
    Y: torch.Tensor,
    lam: float,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit a ridge-regression head: ``(W (D, C), b (C,))``, float64, on ``Z``'s device.

    Minimises ``|Z W + b - Y|^2 + lam |W|^2`` with the bias ``b`` unregularised: with the
    centred ``Zc = Z - mean(Z)``, ``Yc = Y - mean(Y)``, ``W = (Zc^T Zc + lam I)^-1 Zc^T Yc``
    and ``b = mean(Y) - mean(Z) W``. When features outnumber examples (``D > N``, usual in
    few-shot) the same ``W`` is computed as ``Zc^T (Zc Zc^T + lam I)^-1 Yc``, an ``N x N``
    solve. ``Y`` is int labels ``(N,)`` (one-hot encoded to ``num_classes``, default
    ``max + 1``) or a float target matrix ``(N, C)``. ``lam`` must be > 0.
    """
    fn = "ridge_head"
    if not isinstance(Z, torch.Tensor) or Z.dim() != 2 or len(Z) == 0:
        raise ValueError(f"{fn}: Z must be a non-empty (N, D) feature tensor")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"{fn}: lam must be a finite number > 0; got {lam!r}")
    Z64 = Z.detach().to(torch.float64)
    Y64 = _targets(fn, Y, len(Z), num_classes).to(Z64.device)
    z_mean, y_mean = Z64.mean(dim=0), Y64.mean(dim=0)
    Zc, Yc = Z64 - z_mean, Y64 - y_mean
    n, d = Zc.shape
    if d <= n:
        gram = Zc.T @ Zc
        gram.diagonal().add_(lam)
        W = torch.linalg.solve(gram, Zc.T @ Yc)
    else:
        gram = Zc @ Zc.T
        gram.diagonal().add_(lam)
        W = Zc.T @ torch.linalg.solve(gram, Yc)
    return W, y_mean - z_mean @ W


def ridge_predict(Z: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Scores ``Z W + b`` (float64, ``(N, C)``) of a head from :func:`ridge_head`; argmax
    gives the class."""
    if Z.dim() != 2 or W.dim() != 2 or Z.shape[1] != W.shape[0] or b.shape != (W.shape[1],):
        raise ValueError(
            f"ridge_predict: expected Z (N, D), W (D, C), b (C,); got {tuple(Z.shape)}, {tuple(W.shape)}, {tuple(b.shape)}"
        )
    return Z.detach().to(device=W.device, dtype=torch.float64) @ W + b


def _holdout_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed((int(seed) * 7_919 + 17) % 2**63)
    order = torch.randperm(len(y), generator=g)
    fit, held = [], []
    for c in torch.unique(y).tolist():
        members = order[y[order] == c]
        n_held = min(max(round(fraction * len(members)), 1), len(members) - 1)
        held.append(members[:n_held])
        fit.append(members[n_held:])
    return torch.cat(fit), torch.cat(held)


def _loo_errors(Z: torch.Tensor, Y: torch.Tensor, lambdas: Sequence[float]) -> list[float]:
    """Exact leave-one-out squared error of the ridge head (with its free bias) for each
    lambda: ``sum_i |r_i / (1 - H_ii)|^2`` with the hat matrix ``H = 11^T/N + Zc (Zc^T Zc +
    lam I)^-1 Zc^T``, computed from one eigendecomposition of ``Zc Zc^T``."""
    n = len(Z)
    Zc = Z - Z.mean(dim=0)
    Yc = Y - Y.mean(dim=0)
    evals, evecs = torch.linalg.eigh(Zc @ Zc.T)
    evals = evals.clamp(min=0.0)
    proj = evecs.T @ Yc
    errors = []
    for lam in lambdas:
        shrink = evals / (evals + lam)
        h = (evecs**2) @ shrink + 1.0 / n
        fitted = evecs @ (shrink.unsqueeze(1) * proj)
        resid = (Yc - fitted) / (1.0 - h).clamp(min=1e-12).unsqueeze(1)
        errors.append(float((resid**2).sum()))
    return errors


def select_lambda(
    Z: torch.Tensor,
    y,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    num_classes: int | None = None,
) -> float:
    """Choose the ridge ``lambda`` for the few-shot set ``(Z, y)`` from ``lambdas``.

    When every class has at least two examples: a stratified hold-out split (about
    ``holdout_fraction`` of each class, at least one, drawn from ``seed``); the head is fitted
    on the rest, and the lambda with the best held-out accuracy wins, ties going to the lower
    held-out squared error, then to the larger lambda. With one example of some class (1-shot)
    a hold-out would remove the class, so the exact leave-one-out squared error of the
    one-hot regression (closed form, no refits) decides instead. It favours strong
    shrinkage, the limit in which the head scores ``z`` by its inner product with each
    class's (centred) example: a prototype classifier, a sound default for one shot.
    """
    fn = "select_lambda"
    y = _labels(fn, y)
    if not isinstance(Z, torch.Tensor) or Z.dim() != 2 or len(Z) != len(y) or len(y) < 2:
        raise ValueError(f"{fn}: Z must be (N, D) with N = len(y) >= 2; got Z {tuple(Z.shape)}, {len(y)} labels")
    lambdas = [float(v) for v in lambdas]
    if not lambdas or any(not math.isfinite(v) or v <= 0 for v in lambdas):
        raise ValueError(f"{fn}: lambdas must be a non-empty sequence of finite numbers > 0; got {lambdas}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"{fn}: holdout_fraction must be in (0, 1); got {holdout_fraction}")
    if num_classes is None:
        num_classes = int(y.max()) + 1
    Z64 = Z.detach().to(torch.float64)
    y = y.to(Z64.device)
    Y = F.one_hot(y, num_classes).to(torch.float64)
    counts = torch.bincount(y)
    if int(counts[counts > 0].min()) < 2:
        errors = _loo_errors(Z64, Y, lambdas)
        best = min(range(len(lambdas)), key=lambda i: (errors[i], -lambdas[i]))
        return lambdas[best]
    fit, held = _holdout_split(y.cpu(), holdout_fraction, seed)
    fit, held = fit.to(Z64.device), held.to(Z64.device)
    scores = []
    for lam in lambdas:
        W, b = ridge_head(Z64[fit], Y[fit], lam)
        pred = ridge_predict(Z64[held], W, b)
        acc = float((pred.argmax(dim=1) == y[held]).double().mean())
        err = float(((pred - Y[held]) ** 2).sum())
        scores.append((-acc, err, -lam))
    return lambdas[min(range(len(lambdas)), key=lambda i: scores[i])]


def run_ridge_episodes(
    Z_train: torch.Tensor,
    y_train,
    Z_test: torch.Tensor,
    y_test,
    shots: Sequence[int] = (1, 5, 10),
    seeds: Sequence[int] = (0, 1, 2),
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    holdout_fraction: float = 0.2,
) -> dict[int, dict]:
    """Few-shot accuracy of ridge heads over episodes: for each ``k`` in ``shots`` and each
    seed, a k-shot subset of the training features (:func:`kshot_indices`), lambda chosen on
    it (:func:`select_lambda`), a head fitted on all of it, accuracy on the whole test set.

    Labels are class indices ``0..C-1`` (C from the largest label in either set). Returns
    ``{k: {"mean", "std", "accuracies", "lambdas", "seeds"}}``: accuracies as fractions, the
    sample standard deviation over episodes (0.0 for one episode).
    """
    fn = "run_ridge_episodes"
    y_train, y_test = _labels(fn, y_train), _labels(fn, y_test)
    if Z_train.dim() != 2 or Z_test.dim() != 2 or Z_train.shape[1] != Z_test.shape[1]:
        raise ValueError(f"{fn}: Z_train {tuple(Z_train.shape)} and Z_test {tuple(Z_test.shape)} must be (N, D) alike")
    if len(Z_train) != len(y_train) or len(Z_test) != len(y_test) or len(y_test) == 0:
        raise ValueError(f"{fn}: features and labels disagree in length (or the test set is empty)")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError(f"{fn}: seeds is empty; pass at least one seed")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    classes = torch.unique(y_train).tolist()
    y_test_dev = y_test.to(Z_test.device)
    results: dict[int, dict] = {}
    for k in shots:
        k = checks.int_at_least(fn, "each shot count", k, 1)
        accs, lams = [], []
        for seed in seeds:
            idx = kshot_indices(y_train, k, seed, classes).to(Z_train.device)
            Z, y = Z_train[idx], y_train.to(Z_train.device)[idx]
            lam = select_lambda(Z, y, lambdas, holdout_fraction, seed, num_classes)
            W, b = ridge_head(Z, y, lam, num_classes)
            pred = ridge_predict(Z_test, W, b).argmax(dim=1).to(y_test_dev.device)
            accs.append(float((pred == y_test_dev).double().mean()))
            lams.append(lam)
        t = torch.tensor(accs, dtype=torch.float64)
        std = float(t.std(unbiased=True)) if len(accs) > 1 else 0.0
        results[k] = {"mean": float(t.mean()), "std": std, "accuracies": accs, "lambdas": lams, "seeds": seeds}
    return results
