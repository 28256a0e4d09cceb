"""Knowledge distillation loss (Hinton et al., 2015, "Distilling the Knowledge in a Neural
Network"), as used to distill large BiT teachers into small students (Beyer et al., 2022,
"Knowledge distillation: A good teacher is patient and consistent").

``loss = (1 - alpha) * CE(student, targets) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))``

The ``T^2`` factor keeps the soft term's gradient on the scale of the hard term's as ``T``
changes (the soft gradient shrinks as ``1 / T^2``).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["distill_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_logits(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"distill_loss: {name} must be a tensor; got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"distill_loss: {name} has shape {tuple(t.shape)}; expected (N, num_classes)")
    if not t.is_floating_point():
        raise TypeError(f"distill_loss: {name} has dtype {t.dtype}; expected a floating dtype")


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.5,
    T: float = 4.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The distillation loss of a student against a teacher and the labels.

    ``(1 - alpha) * CE(s, targets) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))``,
    where the KL divergence of sample ``i`` is ``sum_c p_t[i, c] * (log p_t[i, c] - log p_s[i, c])``.

    Args:
        student_logits: (N, C) logits of the student.
        teacher_logits: (N, C) logits of the teacher, same shape. They are not detached:
            compute them under ``torch.no_grad()`` (teacher in eval mode) so that no
            gradient reaches the teacher.
        targets: class indices (N,) of an integer dtype, or soft targets (N, C) (rows of
            class probabilities, e.g. MixUp's), for the cross-entropy term.
        alpha: weight of the distillation term, in [0, 1] (0: plain cross-entropy, 1: pure
            distillation).
        T: softmax temperature, > 0.
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` (per sample, (N,)).

    Returns:
        The loss, a scalar (or (N,) with ``reduction="none"``), in the student's dtype.

    Raises:
        ValueError: teacher and student logits of different shapes (e.g. different class
            counts), targets of the wrong shape, ``alpha`` outside [0, 1], ``T <= 0``, an
            unknown reduction.
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape[1] != student_logits.shape[1]:
        raise ValueError(
            f"distill_loss: teacher has {teacher_logits.shape[1]} classes and student {student_logits.shape[1]}; "
            "distillation needs both heads over the same classes (reset_classifier one of them)"
        )
    if teacher_logits.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"distill_loss: teacher_logits has batch {teacher_logits.shape[0]} and student_logits "
            f"{student_logits.shape[0]}; expected the logits of the same batch"
        )
    n, c = student_logits.shape
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"distill_loss: targets must be a tensor; got {type(targets).__name__}")
    if targets.is_floating_point():
        if tuple(targets.shape) != (n, c):
            raise ValueError(
                f"distill_loss: soft targets have shape {tuple(targets.shape)}; expected (N, C) = {(n, c)}"
            )
    elif targets.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        if tuple(targets.shape) != (n,):
            raise ValueError(f"distill_loss: class-index targets have shape {tuple(targets.shape)}; expected (N,) = ({n},)")
        targets = targets.long()
    else:
        raise TypeError(
            f"distill_loss: targets have dtype {targets.dtype}; expected class indices (an integer dtype) "
            "or soft targets (a floating dtype)"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"distill_loss: alpha must be a number in [0, 1]; got {alpha!r}")
    if isinstance(T, bool) or not isinstance(T, numbers.Real) or not math.isfinite(T) or T <= 0:
        raise ValueError(f"distill_loss: T (temperature) must be a finite number > 0; got {T!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"distill_loss: reduction must be one of {_REDUCTIONS}; got {reduction!r}")

    alpha, T = float(alpha), float(T)
    ce = F.cross_entropy(student_logits, targets.to(student_logits.dtype) if targets.is_floating_point() else targets,
                         reduction="none")
    log_ps = F.log_softmax(student_logits / T, dim=1)
    log_pt = F.log_softmax(teacher_logits.to(student_logits.dtype) / T, dim=1)
    # KL(p_t || p_s) per sample; xlogy-free form is safe because log_pt is finite.
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    loss = (1.0 - alpha) * ce + alpha * T * T * kl
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
