"""``ImageFolder``: users' own images laid out as ``root/<class>/<image>``.

Class folders sorted by name give the labels 0..K-1. Images are checked when the folder is
scanned (Pillow opens each file and runs its cheap ``verify()``, in a thread pool), so a
corrupt or non-image file is counted in ``.skipped``, named in one warning, and never
reaches training. ``verify()`` does not decode every pixel, so a file that passes it can
still fail to decode later; ``__getitem__`` then warns and serves the next readable
sample instead of crashing an epoch that may be hours in.

Images are served as 8-bit RGB. 8-bit modes (RGB, L, P, RGBA, CMYK, LA, 1, ...) go through
Pillow's ``convert("RGB")`` unchanged. Deeper grayscale images are scaled to 8 bits first,
since ``convert`` would clip them to 255 (all white):

* ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit, e.g. 16-bit PNG): ``v / 257`` rounded to
  the nearest integer (0 -> 0, 65535 -> 255; 257 is odd, so there are no ties).
* ``I`` (32-bit integers; some Pillow versions read 16-bit PNGs so): taken as 16-bit, scaled
  the same way, when every value lies in 0..65535; otherwise refused.
* ``F`` (32-bit float): ``v * 255`` rounded to nearest (halves up) when every value is finite
  and lies in [0, 1]; otherwise refused.

A refused image raises ``ValueError`` naming the file and what to do (save it as 8- or
16-bit). The scan checks this too, so such files are skipped and counted at the start, not
mid-epoch: the mode comes from the header already opened, and only ``I`` / ``F`` images
(rare) are decoded once more at scan time to check their value range.

Pillow is needed (``pip install pillow``) and imported only when an ImageFolder is built.
"""

from __future__ import annotations

import concurrent.futures
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["IMG_EXTENSIONS", "ImageFolder"]

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _require_pil():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("bitfast.data.ImageFolder needs Pillow to read images: pip install pillow") from exc
    return Image


_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # unsigned 16-bit grayscale, any byte order
_WIDE_MODES = ("I", "F")  # 32-bit modes whose value range decides whether they can be served


def _to_8bit(img, path: str):
    """``img`` as an 8-bit PIL image ready for ``convert("RGB")``; ``img`` itself for 8-bit modes.

    Raises ``ValueError`` (naming ``path``) for an ``I`` image with values outside 0..65535
    or an ``F`` image with values outside [0, 1] (or not finite).
    """
    Image = _require_pil()
    mode = img.mode
    if mode in _16BIT_MODES:
        values = np.asarray(img).astype(np.uint32)
    elif mode == "I":
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"ImageFolder: {path!r} is a 32-bit integer image with values {values.min()}..{values.max()}, "
                "outside the 16-bit range 0..65535; save it as an 8- or 16-bit image"
            )
        values = values.astype(np.uint32)
    elif mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ValueError(
                f"ImageFolder: {path!r} is a 32-bit float image with values outside [0, 1] (or not finite); "
                "scale it to [0, 1] or save it as an 8- or 16-bit image"
            )
        return Image.fromarray(np.floor(values * 255.0 + 0.5).astype(np.uint8))
    else:
        return img
    # 16-bit -> 8-bit, rounded to nearest: (v + 128) // 257 == round(v / 257) (257 is odd: no ties).
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))


def _readable(path: str) -> tuple[str | None, tuple[int, int] | None]:
    """``(None, (height, width))`` when ``path`` can be served, else ``(reason, None)``.

    One open reads the header (size, mode) and runs Pillow's cheap ``verify()``; only
    ``I`` / ``F`` images are decoded again, to check that their values can be scaled to 8 bits.
    """
    Image = _require_pil()
    try:
        with Image.open(path) as img:
            width, height = img.size
            mode = img.mode
            img.verify()
        if mode in _WIDE_MODES:
            with Image.open(path) as img:
                _to_8bit(img, path)
    except Exception as exc:  # any failure means "not a usable image"; the reason is reported
        return f"{type(exc).__name__}: {exc}", None
    return None, (height, width)


def _header_size(path: str) -> tuple[tuple[int, int] | None, str | None]:
    """``((height, width), None)`` from the header of ``path`` (no decoding), else ``(None, reason)``."""
    Image = _require_pil()
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception as exc:  # reported by the caller
        return None, f"{type(exc).__name__}: {exc}"
    return (height, width), None


class ImageFolder(torch.utils.data.Dataset):
    """A classification dataset read from ``root/<class name>/**/<image file>``.

    Args:
        root: the folder holding one subfolder per class (hidden folders are ignored).
        transform: optional callable applied to each PIL image (RGB), e.g.
            :func:`bitfast.data.train_transform`; without one, items are the PIL images.
        extensions: file suffixes counted as images (any case).
        verify: open and ``verify()`` every file at scan time (default); unreadable files are
            skipped and counted. ``False`` trusts the suffixes (faster start on huge trees).
        workers: threads for the verification, and for reading :attr:`image_sizes` lazily when
            ``verify=False`` (default ``min(32, 4 * cpus)``).

    Attributes: ``classes`` (sorted folder names), ``class_to_idx``, ``samples``
    (``(path, label)`` pairs), ``targets`` (int64 tensor), ``image_sizes`` (each sample's
    ``(height, width)``, see :attr:`image_sizes`), ``skipped`` (how many files were left out
    as unreadable or unservable, e.g. a 32-bit image out of range, including any that failed
    later in ``__getitem__`` or :attr:`image_sizes`) and ``skipped_files`` (their paths and
    reasons).

    Raises ``FileNotFoundError`` for a missing root, ``NotADirectoryError`` for a root that is
    a file, ``ValueError`` for a root without class folders or a class folder without a
    readable image, each naming the folder and what to change.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        verify: bool = True,
        workers: int | None = None,
    ) -> None:
        _require_pil()
        root = os.fspath(root)
        if not os.path.exists(root):
            raise FileNotFoundError(
                f"ImageFolder: {root!r} does not exist; pass the folder that holds one subfolder per class"
            )
        if not os.path.isdir(root):
            raise NotADirectoryError(
                f"ImageFolder: {root!r} is a file; pass the folder that holds one subfolder per class"
            )
        if transform is not None and not callable(transform):
            raise TypeError(f"ImageFolder: transform must be callable or None; got {type(transform).__name__}")
        if isinstance(extensions, str):
            extensions = (extensions,)
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not exts:
            raise ValueError("ImageFolder: extensions is empty; pass image suffixes such as ('.jpg', '.png')")
        self.root, self.transform, self.extensions = root, transform, exts
        if workers is None:
            workers = min(32, 4 * (os.cpu_count() or 1))
        self._workers = max(1, int(workers))

        with os.scandir(root) as entries:
            classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise ValueError(
                f"ImageFolder: {root!r} has no class folders; expected {root}/<class name>/<image>, "
                "e.g. train/cat/001.jpg and train/dog/002.jpg"
            )
        files: list[tuple[str, int]] = []
        for label, name in enumerate(classes):
            found = []
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(exts))
            if not found:
                raise ValueError(
                    f"ImageFolder: class folder {os.path.join(root, name)!r} has no image files (suffixes {exts}); "
                    "add images or remove the folder (in Python, ImageFolder(extensions=...) accepts other suffixes)"
                )
            files.extend((path, label) for path in found)

        self.skipped_files: list[tuple[str, str]] = []
        self._image_sizes: list[tuple[int, int] | None] | None = None
        if verify:
            with concurrent.futures.ThreadPoolExecutor(max_workers=self._workers) as pool:
                results = list(pool.map(_readable, (path for path, _ in files), chunksize=64))
            self.skipped_files = [(path, why) for (path, _), (why, _) in zip(files, results) if why is not None]
            files = [item for item, (why, _) in zip(files, results) if why is None]
            self._image_sizes = [size for why, size in results if why is None]
            if self.skipped_files:
                shown = ", ".join(os.path.relpath(p, root) for p, _ in self.skipped_files[:5])
                more = f" and {len(self.skipped_files) - 5} more" if len(self.skipped_files) > 5 else ""
                warnings.warn(
                    f"ImageFolder: skipped {len(self.skipped_files)} unreadable file(s) under {root!r}: {shown}{more} "
                    f"(not an image, corrupt, or an unsupported pixel format; first reason: "
                    f"{self.skipped_files[0][1]}; see .skipped_files for all)",
                    stacklevel=2,
                )
            counts = torch.bincount(torch.tensor([lab for _, lab in files], dtype=torch.int64), minlength=len(classes))
            empty = torch.nonzero(counts == 0).flatten().tolist()
            if empty:
                raise ValueError(
                    f"ImageFolder: class folder {os.path.join(root, classes[empty[0]])!r} has no readable image "
                    "(all its files failed to open; see the warning); fix or remove them"
                )

        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.samples = files
        self.targets = torch.tensor([label for _, label in files], dtype=torch.int64)

    @property
    def image_sizes(self) -> list[tuple[int, int] | None]:
        """Each sample's ``(height, width)`` as stored in its file header, aligned with ``samples``.

        With ``verify=True`` the sizes were read during the scan (same open, no extra cost) and
        every entry is a tuple. With ``verify=False`` the headers are read on first access (no
        pixel decoding, in a thread pool of ``workers``) and cached. A file whose header cannot
        be read then stays in ``samples`` (indices do not shift under a running loader), gets
        ``None`` here, and is added to ``skipped_files`` with one warning, as ``__getitem__``
        would when it reaches it. Sizes are before any EXIF rotation, as ``load`` serves them.
        """
        if self._image_sizes is None:
            paths = [path for path, _ in self.samples]
            with concurrent.futures.ThreadPoolExecutor(max_workers=self._workers) as pool:
                results = list(pool.map(_header_size, paths, chunksize=64))
            sizes = [size for size, _ in results]
            known = {p for p, _ in self.skipped_files}
            failed = [(p, why) for p, (_, why) in zip(paths, results) if why is not None and p not in known]
            bad = [p for p, _ in failed]
            if bad:
                self.skipped_files.extend(failed)
                shown = ", ".join(os.path.relpath(p, self.root) for p in bad[:5])
                more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                warnings.warn(
                    f"ImageFolder: cannot read the size of {len(bad)} file(s) under {self.root!r}: {shown}{more}; "
                    "their image_sizes are None and loading them will serve the next sample",
                    stacklevel=2,
                )
            self._image_sizes = sizes
        return self._image_sizes

    @property
    def skipped(self) -> int:
        """How many files were left out as unreadable."""
        return len(self.skipped_files)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        """The RGB PIL image of sample ``index`` (no transform).

        16-bit and in-range 32-bit images are scaled to 8 bits first (see the module notes);
        raises ``ValueError`` naming the file for one that cannot be (``verify=False`` only:
        the scan skips those).
        """
        Image = _require_pil()
        path = self.samples[index][0]
        with Image.open(path) as img:
            return _to_8bit(img, path).convert("RGB")

    def __getitem__(self, index: int):
        n = len(self.samples)
        for attempt in range(n):
            i = (index + attempt) % n
            path, label = self.samples[i]
            try:
                img = self.load(i)
            except Exception as exc:  # corrupt past verify(): skip it, do not end the epoch
                if all(p != path for p, _ in self.skipped_files):
                    self.skipped_files.append((path, f"{type(exc).__name__}: {exc}"))
                    warnings.warn(
                        f"ImageFolder: cannot decode {path!r} ({exc}); serving the next sample instead", stacklevel=2
                    )
                continue
            return (self.transform(img) if self.transform is not None else img), label
        raise RuntimeError(f"ImageFolder: no image under {self.root!r} could be decoded")

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, classes={len(self.classes)}, n={len(self)}, skipped={self.skipped})"
