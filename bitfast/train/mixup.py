"""MixUp (Zhang et al., 2018, "mixup: Beyond Empirical Risk Minimization") as BiT uses it.

One mixing weight ``lam ~ Beta(alpha, alpha)`` per call (per step) for the whole batch; each
example is blended with the example a random permutation pairs it with, and so are the
one-hot targets. BiT-HyperRule turns it on (alpha 0.1) from 20k training examples up
(:func:`bitfast.train.hyperrule.mixup_alpha`). Train on the soft targets with
:func:`soft_cross_entropy`.

The Beta draw is made here from uniform and normal draws (Marsaglia and Tsang's gamma
sampler), because ``torch.distributions.Beta`` cannot take a ``torch.Generator``: with
``generator=None`` the draws come from torch's global generator, so a checkpoint that saves
the RNG state resumes the same mixing weights.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["mixup", "sample_beta", "soft_cross_entropy"]


def _device(generator: torch.Generator | None) -> torch.device:
    # Draws are made where the generator lives (a CUDA generator works too).
    return generator.device if generator is not None else torch.device("cpu")


def _uniform(generator: torch.Generator | None) -> float:
    # In (0, 1]: 1 - U with U in [0, 1), so that log() below never sees 0.
    return 1.0 - float(torch.rand((), dtype=torch.float64, generator=generator, device=_device(generator)))


def _sample_gamma(shape: float, generator: torch.Generator | None) -> float:
    """One Gamma(shape, 1) draw (Marsaglia and Tsang, 2000); shape < 1 via the boost
    Gamma(a) = Gamma(a + 1) * U**(1/a)."""
    if shape < 1.0:
        boost = _uniform(generator) ** (1.0 / shape)
        return _sample_gamma(shape + 1.0, generator) * boost
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = float(torch.randn((), dtype=torch.float64, generator=generator, device=_device(generator)))
        v = 1.0 + c * z
        if v <= 0.0:
            continue
        v = v * v * v
        u = _uniform(generator)
        if math.log(u) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v


def sample_beta(alpha: float, beta: float | None = None, generator: torch.Generator | None = None) -> float:
    """One draw from Beta(alpha, beta) (``beta`` defaults to ``alpha``), from ``generator``
    or torch's global generator."""
    beta = alpha if beta is None else beta
    for name, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"sample_beta: {name} must be a finite number > 0; got {value!r}")
    x = _sample_gamma(float(alpha), generator)
    y = _sample_gamma(float(beta), generator)
    if x + y == 0.0:  # both underflowed (tiny alpha): the limit is a fair coin between 0 and 1
        return float(_uniform(generator) > 0.5)
    return x / (x + y)


def _one_hot(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    if y.dim() == 2:
        if y.shape[1] != num_classes:
            raise ValueError(f"mixup: soft targets have {y.shape[1]} classes; num_classes is {num_classes}")
        return y.to(dtype)
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"mixup: y must be int labels (N,) or soft targets (N, C); got {y.dtype} {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"mixup: labels must be in [0, {num_classes}); got range [{int(y.min())}, {int(y.max())}]")
    return F.one_hot(y, num_classes).to(dtype)


def mixup(
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: float,
    num_classes: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix a batch: ``(lam * x + (1 - lam) * x[perm], lam * Y + (1 - lam) * Y[perm], lam)``.

    Args:
        x: the batch ``(N, ...)``.
        y: int labels ``(N,)`` or soft targets ``(N, num_classes)``; ``Y`` is their one-hot form.
        alpha: the Beta(alpha, alpha) parameter; 0 turns MixUp off: ``x`` is returned as is,
            with one-hot targets and ``lam = 1.0``, and nothing is drawn.
        num_classes: the number of classes of the targets.
        generator: the source of ``lam`` and ``perm`` (default torch's global generator).

    The soft targets have ``x``'s floating dtype (float32 for other dtypes) and device.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("mixup: x and y must be tensors")
    if x.dim() == 0 or len(x) != len(y):
        raise ValueError(f"mixup: x {tuple(x.shape)} and y {tuple(y.shape)} must hold the same number of examples")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"mixup: num_classes must be an int >= 1; got {num_classes!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"mixup: alpha must be a finite number >= 0 (0: no MixUp); got {alpha!r}")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    y_soft = _one_hot(y, int(num_classes), dtype).to(x.device)
    if alpha == 0:
        return x, y_soft, 1.0
    lam = sample_beta(float(alpha), generator=generator)
    perm = torch.randperm(len(x), generator=generator, device=_device(generator)).to(x.device)
    x_mixed = x * lam + x[perm] * (1.0 - lam)
    return x_mixed, y_soft * lam + y_soft[perm] * (1.0 - lam), lam


def soft_cross_entropy(logits: torch.Tensor, y_soft: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c y_soft[:, c] * log_softmax(logits)[:, c]``.

    With one-hot ``y_soft`` this equals ``F.cross_entropy(logits, labels)``. Computed in
    float32 at least (logits from bf16/fp16 autocast are upcast).
    """
    if logits.dim() != 2 or logits.shape != y_soft.shape:
        raise ValueError(
            f"soft_cross_entropy: logits {tuple(logits.shape)} and y_soft {tuple(y_soft.shape)} must both be (N, C)"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = F.log_softmax(logits.to(dtype), dim=-1)
    return -(y_soft.to(dtype) * log_p).sum(dim=-1).mean()
