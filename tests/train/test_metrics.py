"""Metrics on hand-computed cases: top-k, ECE and reliability bins, confusion matrix, ensembles."""

from __future__ import annotations

import pytest
import torch

from bitfast.train.metrics import (
    confusion_matrix,
    ensemble_logits,
    expected_calibration_error,
    reliability_bins,
    topk_accuracy,
    topk_correct,
)


def test_topk_accuracy():
    logits = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.01, 0.005, 0.005],  # target 0: top-1
            [0.1, 0.5, 0.2, 0.15, 0.03, 0.02],  # target 2: 2nd
            [0.6, 0.1, 0.05, 0.05, 0.1, 0.1],  # target 3: 5th or 6th (ties broken by topk)
            [0.01, 0.02, 0.03, 0.04, 0.05, 0.85],  # target 4: 2nd
        ]
    )
    targets = torch.tensor([0, 2, 5, 4])
    assert topk_accuracy(logits, targets, ks=(1, 2, 5)) == {1: 0.25, 2: 0.75, 5: 1.0}
    assert topk_correct(logits, targets, ks=(1, 2)) == {1: 1, 2: 3}
    # k capped at the number of classes.
    three = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert topk_accuracy(three, torch.tensor([2, 0]), ks=(1, 5)) == {1: 0.0, 5: 1.0}


def test_ece_hand_computed():
    # Two classes, 15 bins of width 1/15. Confidences 0.9 (bin 13: (13/15, 14/15]) and 0.65
    # (bin 9: (9/15, 10/15]).
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.65, 0.35], [0.35, 0.65]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 1, 0, 0])
    # bin 13: 3 predictions, 2 right: |2/3 - 0.9|; bin 9: 2 predictions, 1 right: |1/2 - 0.65|.
    want = 3 / 5 * abs(2 / 3 - 0.9) + 2 / 5 * abs(0.5 - 0.65)
    assert expected_calibration_error(probs, targets) == pytest.approx(want, abs=1e-12)
    bins = reliability_bins(probs, targets)
    assert len(bins["edges"]) == 16 and bins["edges"][0] == 0.0 and bins["edges"][-1] == 1.0
    assert bins["counts"][13] == 3 and bins["counts"][9] == 2 and sum(bins["counts"]) == 5
    assert bins["accuracy"][13] == pytest.approx(2 / 3) and bins["confidence"][9] == pytest.approx(0.65)
    assert bins["accuracy"][0] == 0.0 and bins["confidence"][0] == 0.0  # empty bin
    assert bins["ece"] == pytest.approx(want)


def test_ece_perfectly_calibrated_and_overconfident():
    # Confidence 1.0 and always right: 0. Confidence 1.0 and always wrong: 1.
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == 0.0
    assert expected_calibration_error(probs, torch.tensor([1, 0])) == 1.0
    # Confidence 0.75 on four examples, three right: calibrated.
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_bin_edges_are_right_closed():
    # Confidence exactly 0.5 belongs to (0.4, 0.5] with 10 bins, i.e. bin 4.
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.25]])
    bins = reliability_bins(probs, torch.tensor([0, 0]), n_bins=10)
    assert bins["counts"][4] == 2


def test_ece_single_bin_is_accuracy_gap():
    probs = torch.softmax(torch.randn(50, 4), dim=1)
    targets = torch.randint(0, 4, (50,))
    conf, pred = probs.max(dim=1)
    want = abs(float((pred == targets).float().mean()) - float(conf.mean()))
    assert expected_calibration_error(probs, targets, n_bins=1) == pytest.approx(want, abs=1e-6)


def test_confusion_matrix():
    preds = torch.tensor([0, 1, 1, 2, 2, 2])
    targets = torch.tensor([0, 1, 2, 2, 2, 0])
    cm = confusion_matrix(preds, targets, 3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]
    scores = torch.nn.functional.one_hot(preds, 3).float()
    assert torch.equal(confusion_matrix(scores, targets, 3), cm)
    assert int(cm.trace()) == int((preds == targets).sum())


def test_ensemble_logits():
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 4.0], [1.0, 1.0]])
    assert torch.allclose(ensemble_logits([a, b]), torch.tensor([[1.0, 2.0], [0.5, 1.0]]))
    mixed = ensemble_logits([a, b], mode="mean_probs")
    want = (a.softmax(1) + b.softmax(1)) / 2
    assert torch.allclose(mixed.softmax(1), want) and torch.allclose(mixed.exp().sum(1), torch.ones(2))
    assert torch.equal(ensemble_logits([a]), a)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: topk_accuracy(torch.zeros(3), torch.zeros(3, dtype=torch.long)), r"\(N, C\)"),
        (lambda: topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 3])), r"\[0, 3\)"),
        (lambda: topk_accuracy(torch.zeros(2, 3), torch.tensor([0])), "rows"),
        (lambda: topk_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), "no examples"),
        (lambda: topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 1]), ks=(0,)), "k"),
        (lambda: expected_calibration_error(torch.tensor([[3.0, -1.0]]), torch.tensor([0])), "softmax"),
        (lambda: expected_calibration_error(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), n_bins=0), "n_bins"),
        (lambda: confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3), "preds"),
        (lambda: confusion_matrix(torch.tensor([0]), torch.tensor([0, 1]), 3), r"\(N,\)"),
        (lambda: ensemble_logits([]), "no logits"),
        (lambda: ensemble_logits([torch.zeros(2, 3), torch.zeros(2, 4)]), "one shape"),
        (lambda: ensemble_logits([torch.zeros(2, 3)], mode="vote"), "mode"),
    ],
)
def test_bad_input(call, words):
    with pytest.raises(ValueError, match=words):
        call()
