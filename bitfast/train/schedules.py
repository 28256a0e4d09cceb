"""Learning-rate schedules for upstream (pre-)training, as pure functions of the step.

Kolesnikov et al., 2020, "Big Transfer (BiT)", section 3.2 (BiT-S / BiT-M upstream): SGD
momentum 0.9, lr 0.03 * batch / 256, linear warm-up over 5000 steps, then divided by 10 at
epochs 30, 60 and 80 of 90 (:func:`upstream_step_lr`). The alternative the bitfast brief asks
for is cosine decay after a linear warm-up over 10% of training (:func:`cosine_lr`).

Both return ``None`` once ``step`` reaches the end of training, like
:func:`bitfast.train.hyperrule.lr`, so a loop can run ``while (lr := f(step)) is not None``.
Fine-tuning uses :mod:`bitfast.train.hyperrule` instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bitfast.ops import checks

__all__ = ["cosine_lr", "scaled_lr", "upstream_step_lr"]


def scaled_lr(base: float, batch_size: int, reference_batch: int = 256) -> float:
    """The linear scaling rule: ``base * batch_size / reference_batch``."""
    base = checks.real("scaled_lr", "base", base, strict=True)
    batch_size = checks.int_at_least("scaled_lr", "batch_size", batch_size, 1)
    reference_batch = checks.int_at_least("scaled_lr", "reference_batch", reference_batch, 1)
    return base * batch_size / reference_batch


def upstream_step_lr(
    step: int,
    steps_per_epoch: int,
    batch_size: int = 256,
    base: float = 0.03,
    warmup_steps: int = 5000,
    epochs: int = 90,
    decay_epochs: Sequence[int] = (30, 60, 80),
) -> float | None:
    """BiT's upstream step schedule at ``step``; ``None`` once ``step >= epochs * steps_per_epoch``.

    The peak is ``base * batch_size / 256``. Epoch ``e`` covers steps
    ``[e * steps_per_epoch, (e + 1) * steps_per_epoch)``; from the first step of each epoch in
    ``decay_epochs`` on, the rate is divided by 10 once more. During the first
    ``warmup_steps`` steps the stepped rate is multiplied by ``step / warmup_steps`` (a linear
    ramp from 0), so a warm-up longer than the first decay still ends where the steps are.
    ``warmup_steps=0`` disables the warm-up.
    """
    fn = "upstream_step_lr"
    step = checks.int_at_least(fn, "step", step, 0)
    steps_per_epoch = checks.int_at_least(fn, "steps_per_epoch", steps_per_epoch, 1)
    peak = scaled_lr(base, batch_size, 256)
    warmup_steps = checks.int_at_least(fn, "warmup_steps", warmup_steps, 0)
    epochs = checks.int_at_least(fn, "epochs", epochs, 1)
    decay_epochs = [checks.int_at_least(fn, "each of decay_epochs", e, 1) for e in decay_epochs]
    if any(e >= epochs for e in decay_epochs):
        raise ValueError(f"{fn}: decay_epochs must all be < epochs ({epochs}); got {tuple(decay_epochs)}")
    if step >= epochs * steps_per_epoch:
        return None
    value = peak / 10 ** sum(1 for e in decay_epochs if step >= e * steps_per_epoch)
    if step < warmup_steps:
        value *= step / warmup_steps
    return value


def cosine_lr(
    step: int,
    total_steps: int,
    peak: float,
    warmup_fraction: float = 0.1,
    final: float = 0.0,
) -> float | None:
    """Cosine decay after a linear warm-up; ``None`` once ``step >= total_steps``.

    ``warmup = round(warmup_fraction * total_steps)`` steps ramp linearly from 0 to ``peak``
    (``peak * step / warmup``); then ``final + (peak - final) * (1 + cos(pi * t)) / 2`` with
    ``t = (step - warmup) / (total_steps - warmup)`` going from 0 to (almost) 1. For BiT's
    upstream rule pass ``peak=scaled_lr(0.03, batch_size)``.
    """
    fn = "cosine_lr"
    step = checks.int_at_least(fn, "step", step, 0)
    total_steps = checks.int_at_least(fn, "total_steps", total_steps, 1)
    peak = checks.real(fn, "peak", peak, strict=True)
    warmup_fraction = checks.real(fn, "warmup_fraction", warmup_fraction, 0.0, strict=False, high=1.0)
    final = checks.real(fn, "final", final, 0.0, strict=False)
    if final > peak:
        raise ValueError(f"{fn}: final ({final}) must be <= peak ({peak})")
    if step >= total_steps:
        return None
    warmup = min(round(warmup_fraction * total_steps), total_steps - 1)
    if step < warmup:
        return peak * step / warmup
    t = (step - warmup) / (total_steps - warmup)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * t))
