"""Evaluation metrics: top-k accuracy, calibration (ECE, reliability bins), confusion matrix,
and logit ensembling over checkpoints.

Accuracies are fractions in [0, 1]. For evaluation spread over processes, reduce the
*counts* (:func:`topk_correct`, the ``counts`` / sums of :func:`reliability_bins`, the
confusion matrix) across ranks and derive the rates from the totals. Calibration follows
Guo et al., 2017, "On Calibration of Modern Neural Networks": the confidence of a prediction
is its top probability; equal-width confidence bins; ECE is the example-weighted mean of
``|accuracy - confidence|`` over the bins.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "confusion_matrix",
    "ensemble_logits",
    "expected_calibration_error",
    "reliability_bins",
    "topk_accuracy",
    "topk_correct",
]


def _check_logits_targets(fn: str, scores: torch.Tensor, targets: torch.Tensor, what: str = "logits") -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{fn}: {what} must be a (N, C) tensor; got {got}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.dtype.is_floating_point:
        got = (targets.dtype, tuple(targets.shape)) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"{fn}: targets must be an int tensor (N,); got {got}")
    if len(scores) != len(targets):
        raise ValueError(f"{fn}: {what} has {len(scores)} rows but targets has {len(targets)}")
    if len(targets) == 0:
        raise ValueError(f"{fn}: no examples (N = 0)")
    if int(targets.min()) < 0 or int(targets.max()) >= scores.shape[1]:
        raise ValueError(
            f"{fn}: targets must be in [0, {scores.shape[1]}) for {scores.shape[1]} classes; "
            f"got range [{int(targets.min())}, {int(targets.max())}]"
        )


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many examples have their target among the ``k`` highest scores, for each ``k``
    (``k`` capped at the number of classes). Counts, for reducing across processes."""
    _check_logits_targets("topk_correct", logits, targets)
    ks = list(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"topk_correct: each k must be an int >= 1; got {k!r}")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == targets.to(top.device).unsqueeze(1)
    return {int(k): int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy (a fraction in [0, 1]) for each ``k`` in ``ks``; ``k`` larger than the
    number of classes counts as the number of classes (so top-5 of a 3-class task is 1.0).
    Ties between equal scores are broken by ``torch.topk``."""
    return {k: c / len(targets) for k, c in topk_correct(logits, targets, ks).items()}


def _check_probs(fn: str, probs: torch.Tensor, targets: torch.Tensor, n_bins) -> None:
    _check_logits_targets(fn, probs, targets, "probs")
    if not probs.is_floating_point():
        raise ValueError(f"{fn}: probs must be floating point; got {probs.dtype}")
    if bool((probs < 0).any()) or bool((probs > 1 + 1e-6).any()) or not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{fn}: probs must be probabilities in [0, 1] (pass logits.softmax(-1), not logits)")
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"{fn}: n_bins must be an int >= 1; got {n_bins!r}")


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> dict:
    """Per-bin calibration statistics: the data of a reliability diagram.

    Bin ``i`` holds the predictions whose confidence (top probability) lies in
    ``(edges[i], edges[i + 1]]``, with ``edges = linspace(0, 1, n_bins + 1)``. Returns a dict
    of lists (plain Python, JSON-ready): ``edges`` (``n_bins + 1``), ``counts`` (ints),
    ``accuracy`` and ``confidence`` (the bin's mean correctness and mean confidence; 0.0 for
    an empty bin), ``correct`` and ``confidence_sum`` (the sums, for reducing across ranks),
    and ``ece`` (:func:`expected_calibration_error`).
    """
    _check_probs("reliability_bins", probs, targets, n_bins)
    p = probs.detach().to(torch.float64)
    conf, pred = p.max(dim=1)
    conf = conf.clamp(max=1.0)
    correct = (pred == targets.to(pred.device)).to(torch.float64)
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=p.device)
    # bucketize with right=False: index i such that edges[i] < conf <= edges[i + 1].
    index = torch.bucketize(conf, edges[1:-1], right=False)
    counts = torch.bincount(index, minlength=n_bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=n_bins)
    conf_sum = torch.bincount(index, weights=conf, minlength=n_bins)
    safe = counts.clamp(min=1).to(torch.float64)
    accuracy, confidence = correct_sum / safe, conf_sum / safe
    ece = float(((correct_sum - conf_sum).abs()).sum() / len(conf))
    return {
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "accuracy": accuracy.tolist(),
        "confidence": confidence.tolist(),
        "correct": correct_sum.tolist(),
        "confidence_sum": conf_sum.tolist(),
        "ece": ece,
    }


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins:
    ``sum_b (n_b / N) * |accuracy_b - confidence_b|`` (see :func:`reliability_bins`).
    ``probs`` are class probabilities ``(N, C)`` (softmax of the logits)."""
    return reliability_bins(probs, targets, n_bins)["ece"]


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts; row = true class, column = predicted.
    ``preds`` are class indices ``(N,)`` or scores ``(N, num_classes)`` (argmax taken)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"confusion_matrix: num_classes must be an int >= 1; got {num_classes!r}")
    if preds.dim() == 2:
        if preds.shape[1] != num_classes:
            raise ValueError(f"confusion_matrix: scores have {preds.shape[1]} classes; num_classes is {num_classes}")
        preds = preds.argmax(dim=1)
    if preds.dim() != 1 or targets.dim() != 1 or len(preds) != len(targets):
        raise ValueError(
            f"confusion_matrix: preds {tuple(preds.shape)} and targets {tuple(targets.shape)} must be (N,) alike"
        )
    if preds.dtype.is_floating_point or targets.dtype.is_floating_point:
        raise ValueError("confusion_matrix: preds and targets must be class indices (int tensors)")
    for name, t in (("preds", preds), ("targets", targets)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"confusion_matrix: {name} must be in [0, {num_classes}); got [{int(t.min())}, {int(t.max())}]")
    flat = targets.long() * num_classes + preds.long().to(targets.device)
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def ensemble_logits(logits: Sequence[torch.Tensor], mode: str = "mean_logits") -> torch.Tensor:
    """Combine the logits of several models (or checkpoints) on the same examples.

    ``"mean_logits"``: the mean of the logits. ``"mean_probs"``: the log of the mean of the
    softmax probabilities, so the result's softmax is the averaged distribution (and its
    argmax the averaged vote). Computed in float32 at least.
    """
    if mode not in ("mean_logits", "mean_probs"):
        raise ValueError(f"ensemble_logits: mode must be 'mean_logits' or 'mean_probs'; got {mode!r}")
    logits = list(logits)
    if not logits:
        raise ValueError("ensemble_logits: no logits given; pass one (N, C) tensor per model")
    shape = logits[0].shape
    if any(t.shape != shape for t in logits) or len(shape) != 2:
        raise ValueError(f"ensemble_logits: every member must be (N, C) of one shape; got {[tuple(t.shape) for t in logits]}")
    dtype = torch.promote_types(logits[0].dtype, torch.float32)
    stacked = torch.stack([t.to(dtype) for t in logits])
    if mode == "mean_logits":
        return stacked.mean(dim=0)
    return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - torch.log(
        torch.tensor(float(len(logits)), dtype=dtype, device=stacked.device)
    )
