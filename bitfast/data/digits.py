"""The embedded default dataset: the UCI handwritten digits, shipped with bitfast.

1,797 grey 8x8 images of the digits 0..9 (values 0..16), E. Alpaydin and C. Kaynak,
"Optical Recognition of Handwritten Digits", UCI ML repository, CC BY 4.0 (see
``DIGITS_LICENSE.txt`` next to this file). Small enough to ship and to train a narrow BiT
network on a laptop CPU in minutes, so every bitfast example and test runs without a
download. :class:`DigitsDataset` upsamples the images to a network resolution, replicates
them to RGB and scales them to BiT's [-1, 1]; class subsets (e.g. 0-4 upstream, 5-9
downstream) make a transfer-learning story out of it.
"""

from __future__ import annotations

import functools
import gzip
import numbers
from collections.abc import Callable, Iterable
from importlib import resources

import torch
import torch.nn.functional as F

__all__ = ["DIGITS_FILE", "DigitsDataset", "load_digits"]

DIGITS_FILE = "digits.csv.gz"
_NUM_DIGITS = 1797
_SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _read_digits() -> tuple[torch.Tensor, torch.Tensor]:
    ref = resources.files("bitfast.data").joinpath(DIGITS_FILE)
    try:
        raw = ref.read_bytes()
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"bitfast.data: the embedded dataset {DIGITS_FILE} is missing from the installed package "
            "(reinstall bitfast; a build that drops package data loses it)"
        ) from exc
    rows = [line.split(",") for line in gzip.decompress(raw).decode("ascii").splitlines() if line]
    values = torch.tensor([[int(v) for v in row] for row in rows], dtype=torch.int64)
    if values.shape != (_NUM_DIGITS, 65):
        raise ValueError(f"bitfast.data: {DIGITS_FILE} has shape {tuple(values.shape)}; expected ({_NUM_DIGITS}, 65)")
    images = values[:, :64].to(torch.uint8).reshape(-1, 8, 8)
    return images, values[:, 64].clone()


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded UCI digits: images ``uint8 (1797, 8, 8)`` with values 0..16 (ink is high,
    background 0) and labels ``int64 (1797,)`` in 0..9. Read once; each call returns copies."""
    images, labels = _read_digits()
    return images.clone(), labels.clone()


def _check_classes(classes) -> list[int]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):
        raise TypeError(f"DigitsDataset: classes must be a sequence of digits 0..9; got {classes!r}")
    out = list(classes)
    if not out:
        raise ValueError("DigitsDataset: classes is empty; pass the digits to keep, e.g. range(5)")
    for c in out:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= c <= 9:
            raise ValueError(f"DigitsDataset: classes must be digits 0..9; got {c!r} in {out}")
    if len(set(out)) != len(out):
        raise ValueError(f"DigitsDataset: classes has repeated digits: {out}")
    return [int(c) for c in out]


def split_indices(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic stratified split of ``range(len(labels))``: ``(train, test)`` index tensors.

    One permutation of all examples is drawn from ``seed``; each class sends its first
    ``round(test_fraction * count)`` examples in that order to test (at least one, and at
    least one left for train, when the class has two or more), the rest to train. A class's
    split depends only on the seed, not on which other classes are used. Both index tensors
    are sorted.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"split_indices: test_fraction must be in (0, 1); got {test_fraction}")
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(labels), generator=g)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        members = order[labels[order] == c]
        n_test = round(test_fraction * len(members))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


class DigitsDataset(torch.utils.data.Dataset):
    """The embedded digits as a map-style dataset of BiT-ready ``(image, label)`` pairs.

    Args:
        classes: the digits to keep, in label order: digit ``classes[i]`` gets label ``i``
            (``range(5, 10)`` makes 5..9 the labels 0..4).
        split: ``"train"``, ``"test"`` or ``"all"``; train and test come from a stratified split
            (:func:`split_indices`) that depends on ``seed`` and ``test_fraction`` only.
        resolution: the side the 8x8 images are resized to (bilinear).
        test_fraction: the share of each class held out for ``"test"``.
        seed: the seed of the split.
        transform: optional callable applied in ``__getitem__`` to the float ``(C, H, W)``
            image (e.g. :func:`bitfast.data.augment_tensor` for training).
        channels: 3 (RGB, as BiT expects) or any count >= 1; the grey image is replicated.

    Images are float32 ``(channels, resolution, resolution)`` in [-1, 1] (background -1),
    resized once at construction. Attributes: ``classes`` (the digits), ``targets`` (int64
    labels), ``indices`` (rows of :func:`load_digits`), ``images`` (all images, a view).
    """

    # Everything lives in memory: bitfast.data.make_loader uses no worker processes for it.
    in_memory = True

    def __init__(
        self,
        classes: Iterable[int] = range(10),
        split: str = "train",
        resolution: int = 32,
        test_fraction: float = 0.2,
        seed: int = 0,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        channels: int = 3,
    ) -> None:
        self.classes = _check_classes(classes)
        if split not in _SPLITS:
            raise ValueError(f"DigitsDataset: split must be one of {_SPLITS}; got {split!r}")
        for name, value in (("resolution", resolution), ("channels", channels)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"DigitsDataset: {name} must be an int >= 1; got {value!r}")
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
            raise TypeError(f"DigitsDataset: test_fraction must be a float in (0, 1); got {test_fraction!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"DigitsDataset: test_fraction must be in (0, 1); got {test_fraction}")
        if transform is not None and not callable(transform):
            raise TypeError(f"DigitsDataset: transform must be callable or None; got {type(transform).__name__}")
        self.split, self.resolution, self.channels = split, int(resolution), int(channels)
        self.test_fraction, self.seed, self.transform = float(test_fraction), int(seed), transform

        images, labels = _read_digits()
        keep = torch.isin(labels, torch.tensor(self.classes))
        if split == "all":
            rows = torch.nonzero(keep).flatten()
        else:
            train, test = split_indices(labels, self.test_fraction, self.seed)
            rows = train if split == "train" else test
            rows = rows[keep[rows]]
        remap = torch.full((10,), -1, dtype=torch.int64)
        remap[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        self.indices = rows
        self.targets = remap[labels[rows]]
        x = images[rows].unsqueeze(1).to(torch.float32) / 16.0
        if self.resolution != 8:
            # Upsampling needs no antialias; it only matters (and is used) when shrinking.
            x = F.interpolate(
                x, size=(self.resolution,) * 2, mode="bilinear", align_corners=False, antialias=self.resolution < 8
            )
        # Stored once, grey: the channels are an expanded view, not copies.
        self._grey = (x * 2.0 - 1.0).clamp_(-1.0, 1.0).contiguous()

    @property
    def images(self) -> torch.Tensor:
        """All images, ``(N, channels, resolution, resolution)`` in [-1, 1] (an expanded view;
        ``transform`` not applied)."""
        return self._grey.expand(-1, self.channels, -1, -1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A copy, so that an in-place transform cannot alter the stored images.
        x = self._grey[index].repeat(self.channels, 1, 1)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[index])

    def __repr__(self) -> str:
        return (
            f"DigitsDataset(classes={self.classes}, split={self.split!r}, n={len(self)}, "
            f"resolution={self.resolution}, channels={self.channels})"
        )
