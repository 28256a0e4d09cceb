"""BiT preprocessing, written with torch ops (and Pillow for PIL input, when installed).

Kolesnikov et al., 2020, "Big Transfer (BiT)", section 3.3, and docs/bit.md (HyperRule, upstream training):

* fine-tuning train (:func:`train_transform`): resize to ``(resize, resize)`` ignoring the
  aspect ratio -> random ``crop x crop`` crop -> random horizontal flip -> [-1, 1];
* upstream train (``inception=True``): an Inception-style random-resized crop (area scale
  (0.08, 1), aspect ratio (3/4, 4/3)) resized to ``crop`` -> flip -> [-1, 1];
* eval (:func:`eval_transform`): resize straight to ``(crop, crop)``, no center crop;
* :func:`augment_tensor`: random crops of images that are already tensors in their final
  value range (the embedded digits), flips off by default (a flipped digit is another glyph).

Inputs: a PIL image, a ``uint8`` tensor ``(C, H, W)`` in 0..255, or a float tensor
``(C, H, W)`` in [0, 1] (``(H, W)`` is taken as one channel). Outputs: float32
``(C, crop, crop)``, normalized to BiT's [-1, 1] (``normalize="bit"``: ``x * 2 - 1``), or
``(x - mean) / std`` with ImageNet's statistics (``"imagenet"``) or a ``(mean, std)`` pair
of your dataset. Randomness comes from ``generator`` when given, else from torch's global
generator, which DataLoader seeds per worker (see :func:`bitfast.data.make_loader`).
Resizing is bilinear, antialiased when shrinking (Pillow's BILINEAR for PIL input).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "Normalize",
    "TensorAugment",
    "TrainTransform",
    "augment_tensor",
    "eval_transform",
    "random_resized_crop_params",
    "to_tensor",
    "train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_SCALE = (0.08, 1.0)
INCEPTION_RATIO = (3 / 4, 4 / 3)


def _is_pil(img) -> bool:
    # Checked by name so that Pillow is imported only by those who pass PIL images.
    return any(c.__module__.startswith("PIL.") and c.__name__ == "Image" for c in type(img).__mro__)


def _side(fn: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{fn}: {name} must be an int >= 1; got {value!r}")
    return int(value)


def _range(fn: str, name: str, value, positive: bool = True) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name} must be a pair (low, high); got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi or (positive and lo <= 0):
        raise ValueError(f"{fn}: {name} must be a pair 0 < low <= high; got {value!r}")
    return lo, hi


def _image_size(img) -> tuple[int, int]:
    if _is_pil(img):
        return img.height, img.width
    return int(img.shape[-2]), int(img.shape[-1])


def _check_image(fn: str, img) -> None:
    if _is_pil(img):
        return
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{fn}: expected a PIL image or a (C, H, W) tensor; got {type(img).__name__}")
    if img.dim() not in (2, 3):
        raise ValueError(f"{fn}: expected a (C, H, W) or (H, W) image tensor; got shape {tuple(img.shape)}")
    if img.dtype != torch.uint8 and not img.is_floating_point():
        raise TypeError(f"{fn}: image tensors must be uint8 (0..255) or floating point (0..1); got {img.dtype}")


def to_tensor(img) -> torch.Tensor:
    """A PIL image or an image tensor as float32 ``(C, H, W)`` in [0, 1].

    PIL images are converted to RGB (grey, palette and RGBA images included); ``uint8``
    tensors are divided by 255; float tensors are taken to be in [0, 1] already and are only
    cast to float32; an ``(H, W)`` tensor gets one channel.
    """
    _check_image("to_tensor", img)
    if _is_pil(img):
        import numpy as np

        if img.mode != "RGB":
            img = img.convert("RGB")
        array = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
    x = img if img.dim() == 3 else img.unsqueeze(0)
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)


def _resize(img, height: int, width: int):
    """Bilinear resize of a PIL image (Pillow) or a float (C, H, W) tensor (antialiased when shrinking)."""
    if _is_pil(img):
        from PIL import Image

        return img.resize((width, height), Image.Resampling.BILINEAR)
    if tuple(img.shape[-2:]) == (height, width):
        return img
    shrink = height < img.shape[-2] or width < img.shape[-1]
    out = F.interpolate(img.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False, antialias=shrink)
    return out.squeeze(0)


def _crop(img, top: int, left: int, height: int, width: int):
    if _is_pil(img):
        return img.crop((left, top, left + width, top + height))
    return img[..., top : top + height, left : left + width]


def _randint(high: int, generator: torch.Generator | None) -> int:
    """A uniform int in [0, high]."""
    return int(torch.randint(0, high + 1, (1,), generator=generator).item())


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return float(torch.empty((), dtype=torch.float64).uniform_(lo, hi, generator=generator).item())


def random_resized_crop_params(
    height: int,
    width: int,
    scale: Sequence[float] = INCEPTION_SCALE,
    ratio: Sequence[float] = INCEPTION_RATIO,
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of an Inception-style random crop of a ``height x width`` image.

    The crop's area is a uniform fraction in ``scale`` of the image's, its aspect ratio
    (w / h) log-uniform in ``ratio``; a draw that does not fit is redrawn, up to
    ``attempts`` times, after which the largest centred crop with an aspect ratio inside
    ``ratio`` is used.
    """
    scale = _range("random_resized_crop_params", "scale", scale)
    ratio = _range("random_resized_crop_params", "ratio", ratio)
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_lo, log_hi, generator))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(height - h, generator), _randint(width - w, generator), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, min(height, max(1, round(width / ratio[0])))
    elif aspect > ratio[1]:
        h, w = height, min(width, max(1, round(height * ratio[1])))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


class Normalize:
    """Map float images in [0, 1] to the network's input range.

    ``"bit"``: ``x * 2 - 1`` (BiT's [-1, 1]); ``"imagenet"``: ``(x - mean) / std`` with
    ImageNet's statistics; a pair ``(mean, std)`` of per-channel sequences: your dataset's;
    ``None``: identity. A one-channel image is repeated to the statistics' channel count.
    """

    def __init__(self, normalize="bit") -> None:
        self.mode = normalize
        self.mean = self.std = None
        if normalize in ("bit", None):
            return
        if normalize == "imagenet":
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        elif isinstance(normalize, (tuple, list)) and len(normalize) == 2:
            mean, std = normalize
        else:
            raise ValueError(f"normalize must be 'bit', 'imagenet', a (mean, std) pair or None; got {normalize!r}")
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        if self.mean.shape != self.std.shape or self.mean.numel() == 0:
            raise ValueError(f"normalize: mean and std must have the same, non-zero length; got {mean!r}, {std!r}")
        if not bool((self.std > 0).all()):
            raise ValueError(f"normalize: std must be > 0 everywhere; got {std!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            return x
        if self.mean is None:
            return x * 2.0 - 1.0
        channels = self.mean.shape[0]
        if x.shape[-3] == 1 and channels > 1:
            x = x.expand(*x.shape[:-3], channels, *x.shape[-2:])
        if x.shape[-3] != channels:
            raise ValueError(f"normalize: image has {x.shape[-3]} channels; the statistics have {channels}")
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __repr__(self) -> str:
        return f"Normalize({self.mode!r})"


class TrainTransform:
    """BiT's training preprocessing; see :func:`train_transform`."""

    def __init__(
        self,
        resize: int | None,
        crop: int,
        normalize="bit",
        inception: bool = False,
        flip: bool = True,
        scale: Sequence[float] = INCEPTION_SCALE,
        ratio: Sequence[float] = INCEPTION_RATIO,
        generator: torch.Generator | None = None,
    ) -> None:
        fn = "train_transform"
        self.crop = _side(fn, "crop", crop)
        self.inception = bool(inception)
        if self.inception:
            self.resize = None
            self.scale, self.ratio = _range(fn, "scale", scale), _range(fn, "ratio", ratio)
        else:
            self.resize = _side(fn, "resize", resize)
            if self.resize < self.crop:
                raise ValueError(f"{fn}: resize ({resize}) must be >= crop ({crop}); the HyperRule uses 160/128, 512/480")
        self.flip = bool(flip)
        self.normalize = Normalize(normalize)
        self.generator = generator

    def __call__(self, img) -> torch.Tensor:
        _check_image("train_transform", img)
        if not _is_pil(img):
            img = to_tensor(img)
        g = self.generator
        if self.inception:
            top, left, h, w = random_resized_crop_params(*_image_size(img), self.scale, self.ratio, g)
            img = _resize(_crop(img, top, left, h, w), self.crop, self.crop)
        else:
            img = _resize(img, self.resize, self.resize)
            span = self.resize - self.crop
            top, left = _randint(span, g), _randint(span, g)
            img = _crop(img, top, left, self.crop, self.crop)
        x = to_tensor(img)
        if self.flip and _uniform(0.0, 1.0, g) < 0.5:
            x = x.flip(-1)
        return self.normalize(x)

    def __repr__(self) -> str:
        how = "inception" if self.inception else f"resize={self.resize}"
        return f"TrainTransform({how}, crop={self.crop}, flip={self.flip}, {self.normalize!r})"


class EvalTransform:
    """BiT's evaluation preprocessing; see :func:`eval_transform`."""

    def __init__(self, crop: int, normalize="bit") -> None:
        self.crop = _side("eval_transform", "crop", crop)
        self.normalize = Normalize(normalize)

    def __call__(self, img) -> torch.Tensor:
        _check_image("eval_transform", img)
        if not _is_pil(img):
            img = to_tensor(img)
        return self.normalize(to_tensor(_resize(img, self.crop, self.crop)))

    def __repr__(self) -> str:
        return f"EvalTransform(crop={self.crop}, {self.normalize!r})"


def train_transform(
    resize: int | None,
    crop: int,
    normalize="bit",
    inception: bool = False,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> TrainTransform:
    """BiT's training preprocessing as a callable ``img -> float32 (C, crop, crop)``.

    Default (fine-tuning, the HyperRule): resize to ``(resize, resize)`` ignoring the aspect
    ratio, take a random ``crop x crop`` window, flip left-right with probability 1/2
    (``flip``), normalize (``"bit"``: [-1, 1]; ``"imagenet"``; or ``(mean, std)``).
    ``inception=True`` (upstream): a random-resized crop (area scale (0.08, 1), aspect
    (3/4, 4/3)) resized to ``crop`` replaces resize + crop; ``resize`` is then ignored
    (pass None). Take ``resize, crop`` from :func:`bitfast.train.hyperrule.resolution`.
    """
    return TrainTransform(resize, crop, normalize=normalize, inception=inception, flip=flip, generator=generator)


def eval_transform(crop: int, normalize="bit") -> EvalTransform:
    """BiT's evaluation preprocessing as a callable ``img -> float32 (C, crop, crop)``: a
    resize straight to ``(crop, crop)`` (aspect ratio ignored, no center crop), then
    ``normalize`` as in :func:`train_transform`."""
    return EvalTransform(crop, normalize=normalize)


class TensorAugment:
    """Random crops (and optional flips) of float ``(C, H, W)`` tensors; see :func:`augment_tensor`."""

    def __init__(
        self,
        crop: int,
        pad: int | None = None,
        flip: bool = False,
        scale: Sequence[float] | None = None,
        ratio: Sequence[float] = INCEPTION_RATIO,
        fill: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        fn = "augment_tensor"
        self.crop = _side(fn, "crop", crop)
        self.scale = None if scale is None else _range(fn, "scale", scale)
        self.ratio = _range(fn, "ratio", ratio)
        if pad is None:
            pad = self.crop // 8
        if isinstance(pad, bool) or not isinstance(pad, numbers.Integral) or pad < 0:
            raise ValueError(f"{fn}: pad must be an int >= 0; got {pad!r}")
        self.pad = int(pad)
        self.flip = bool(flip)
        self.fill = None if fill is None else float(fill)
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"augment_tensor: expected a float (C, H, W) tensor; got {got}")
        g = self.generator
        if self.scale is not None:
            top, left, h, w = random_resized_crop_params(x.shape[-2], x.shape[-1], self.scale, self.ratio, g)
            x = _resize(x[..., top : top + h, left : left + w], self.crop, self.crop)
        else:
            p = self.pad
            if p:
                if self.fill is None:
                    x = F.pad(x.unsqueeze(0), (p, p, p, p), mode="replicate").squeeze(0)
                else:
                    x = F.pad(x, (p, p, p, p), mode="constant", value=self.fill)
            h, w = x.shape[-2:]
            if h < self.crop or w < self.crop:
                raise ValueError(
                    f"augment_tensor: a {h}x{w} image (after padding {p}) is smaller than crop {self.crop}; "
                    "lower crop or raise pad"
                )
            top, left = _randint(h - self.crop, g), _randint(w - self.crop, g)
            x = x[..., top : top + self.crop, left : left + self.crop]
        if self.flip and _uniform(0.0, 1.0, g) < 0.5:
            x = x.flip(-1)
        return x.contiguous()

    def __repr__(self) -> str:
        how = f"scale={self.scale}" if self.scale is not None else f"pad={self.pad}"
        return f"TensorAugment(crop={self.crop}, {how}, flip={self.flip})"


def augment_tensor(
    crop: int,
    pad: int | None = None,
    flip: bool = False,
    scale: Sequence[float] | None = None,
    ratio: Sequence[float] = INCEPTION_RATIO,
    fill: float | None = None,
    generator: torch.Generator | None = None,
) -> TensorAugment:
    """Augmentation for images that are already float ``(C, H, W)`` tensors in their final
    range (e.g. ``DigitsDataset(transform=augment_tensor(32))``).

    Default: pad each side by ``pad`` (default ``crop // 8``) and take a random ``crop x crop``
    window; the padding repeats the border pixels (``fill=None``; the digits' border is
    background) or is the constant ``fill``. With ``scale=(lo, hi)``: a random-resized crop
    of that area fraction (aspect in ``ratio``) resized to ``crop`` instead. ``flip``
    (off by default: mirrored digits are other glyphs) flips left-right with probability 1/2.
    """
    return TensorAugment(crop, pad=pad, flip=flip, scale=scale, ratio=ratio, fill=fill, generator=generator)
