"""BiT-HyperRule: the fine-tuning hyper-parameters of Big Transfer as plain functions.

Kolesnikov et al., 2020, "Big Transfer (BiT): General Visual Representation Learning",
section 3.3, and the authors' released fine-tuning code. The rule picks everything from two
facts about the downstream task: the number of training examples ``n`` (for few-shot,
``k * classes``) and the image size.

* resolution: images with area below 96x96 are resized to 160 and randomly cropped to 128;
  larger ones to 512 / 480 (the release) or 448 / 384 (the paper's text, which keeps
  512 / 480 for R152x4 only). ``variant`` picks.
* schedule ``[warmup, d1, d2, d3, total]`` in steps: 100..500 below 20k examples,
  500..10k below 500k, 500..20k above.
* learning rate: 0.003 at batch 512 (scaled linearly for other batches), linear warm-up
  from 0, divided by 10 at each decay point *strictly* below the step, ``None`` once the
  step reaches ``total`` (training is over).
* MixUp: alpha 0.1 from 20k examples up, none below.

Everything else of the rule (SGD momentum 0.9, no weight decay, zero-initialised head)
is the loop's business; :func:`settings` gathers the whole rule in one dict.
"""

from __future__ import annotations

import numbers

from bitfast.ops import checks

__all__ = [
    "BASE_BATCH",
    "BASE_LR",
    "VARIANTS",
    "dataset_image_size",
    "lr",
    "mixup_alpha",
    "resolution",
    "schedule",
    "settings",
]

BASE_LR = 0.003
BASE_BATCH = 512
# "release": the authors' released code (and bitfast's default); "paper": the paper's text.
VARIANTS: tuple[str, ...] = ("release", "paper")

_SMALL_AREA = 96 * 96
_SMALL_N = 20_000
_MEDIUM_N = 500_000


def resolution(image_size, variant: str = "release") -> tuple[int, int]:
    """The HyperRule's ``(resize, crop)`` for images of ``image_size = (h, w)`` (or one int).

    Area below 96*96 pixels: ``(160, 128)``. Otherwise ``(512, 480)`` with
    ``variant="release"`` (the authors' code) or ``(448, 384)`` with ``variant="paper"``
    (the paper's text; it reserves 512 / 480 for R152x4, so pass ``"release"`` there).
    Train images are resized to ``(resize, resize)`` and randomly cropped to ``crop``;
    eval images are resized straight to ``(crop, crop)``.
    """
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise TypeError(f"resolution: image_size must be (height, width) or an int; got {image_size!r}")
    h = checks.int_at_least("resolution", "height", image_size[0], 1)
    w = checks.int_at_least("resolution", "width", image_size[1], 1)
    if variant not in VARIANTS:
        raise ValueError(f"resolution: variant must be one of {VARIANTS}; got {variant!r}")
    if h * w < _SMALL_AREA:
        return 160, 128
    return (512, 480) if variant == "release" else (448, 384)


def dataset_image_size(sizes) -> tuple[tuple[int, int], float]:
    """The image size the resolution rule is decided on for a dataset of images of ``sizes``
    (``(height, width)`` each; ``None`` entries, unreadable images, are left out): the size of
    the image of median area (the lower median), so that the small-image table is chosen
    exactly when at least half of the images are below 96x96 pixels. Returns ``(size,
    fraction of the images below 96x96)``."""
    known = [(int(h), int(w)) for h, w in (s for s in sizes if s is not None)]
    if not known:
        raise ValueError("dataset_image_size: no image sizes to decide the resolution on")
    known.sort(key=lambda s: s[0] * s[1])
    small = sum(1 for h, w in known if h * w < _SMALL_AREA) / len(known)
    return known[(len(known) - 1) // 2], small


def schedule(n: int) -> list[int]:
    """The HyperRule's step schedule ``[warmup, d1, d2, d3, total]`` for ``n`` training examples.

    ``n < 20_000``: ``[100, 200, 300, 400, 500]``; ``n < 500_000``:
    ``[500, 3000, 6000, 9000, 10000]``; otherwise ``[500, 6000, 12000, 18000, 20000]``.
    """
    n = checks.int_at_least("schedule", "n (the number of training examples)", n, 1)
    if n < _SMALL_N:
        return [100, 200, 300, 400, 500]
    if n < _MEDIUM_N:
        return [500, 3000, 6000, 9000, 10000]
    return [500, 6000, 12000, 18000, 20000]


def lr(step: int, n: int, base_lr: float = BASE_LR, batch_size: int = BASE_BATCH) -> float | None:
    """The HyperRule learning rate at ``step`` for ``n`` training examples; ``None`` once
    ``step >= total`` (training is over).

    The peak is ``base_lr * batch_size / 512`` (linear scaling; 0.003 at batch 512). While
    ``step < warmup`` it ramps linearly from 0: ``peak * step / warmup``. Afterwards it is
    ``peak / 10**m`` where ``m`` counts the decay points ``d`` with ``d < step`` (strictly),
    so with ``n = 50_000``: ``lr(0) = 0``, ``lr(500) = lr(3000) = 0.003``,
    ``lr(3001) = 0.0003``, ``lr(10000) is None``.
    """
    step = checks.int_at_least("lr", "step", step, 0)
    base_lr = checks.real("lr", "base_lr", base_lr, strict=True)
    batch_size = checks.int_at_least("lr", "batch_size", batch_size, 1)
    warmup, *decays, total = schedule(n)
    peak = base_lr * batch_size / BASE_BATCH
    if step >= total:
        return None
    if step < warmup:
        return peak * step / warmup
    return peak / 10 ** sum(1 for d in decays if d < step)


def mixup_alpha(n: int) -> float:
    """The HyperRule's MixUp alpha for ``n`` training examples: 0.1 when ``n >= 20_000``,
    else 0.0 (no MixUp). One mixing weight ~ Beta(alpha, alpha) is drawn per step."""
    n = checks.int_at_least("mixup_alpha", "n (the number of training examples)", n, 1)
    return 0.1 if n >= _SMALL_N else 0.0


def settings(
    n: int,
    image_size=None,
    batch_size: int = BASE_BATCH,
    base_lr: float = BASE_LR,
    variant: str = "release",
) -> dict:
    """The whole HyperRule for a task of ``n`` training examples, as a dict.

    Keys: ``schedule`` ([warmup, d1, d2, d3, total]), ``steps`` (total), ``lr`` (the peak,
    scaled to ``batch_size``), ``batch_size``, ``mixup_alpha``, ``momentum`` (0.9),
    ``weight_decay`` (0.0), ``nesterov`` (False), ``zero_head`` (True) and, when
    ``image_size`` is given, ``resize`` and ``crop`` (see :func:`resolution`).
    """
    sched = schedule(n)
    batch_size = checks.int_at_least("settings", "batch_size", batch_size, 1)
    out = {
        "schedule": sched,
        "steps": sched[-1],
        "lr": checks.real("settings", "base_lr", base_lr, strict=True) * batch_size / BASE_BATCH,
        "batch_size": batch_size,
        "mixup_alpha": mixup_alpha(n),
        "momentum": 0.9,
        "weight_decay": 0.0,
        "nesterov": False,
        "zero_head": True,
    }
    if image_size is not None:
        out["resize"], out["crop"] = resolution(image_size, variant)
    return out
