"""``ImageFolder``: users' own images laid out as ``root/<class>/<image>``.

Class folders sorted by name give the labels 0..K-1. Images are checked when the folder is
scanned (Pillow opens each file and runs its cheap ``verify()``, in a thread pool), so a
corrupt or non-image file is counted in ``.skipped``, named in one warning, and never
reaches training. ``verify()`` does not decode every pixel, so a file that passes it can
still fail to decode later; ``__getitem__`` then warns and serves the next readable
sample instead of crashing an epoch that may be hours in.

Pillow is needed (``pip install pillow``) and imported only when an ImageFolder is built.
"""

from __future__ import annotations

import concurrent.futures
import os
import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = ["IMG_EXTENSIONS", "ImageFolder"]

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _require_pil():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("bitfast.data.ImageFolder needs Pillow to read images: pip install pillow") from exc
    return Image


def _readable(path: str) -> str | None:
    """None when Pillow can open and verify ``path``, else the reason it cannot."""
    Image = _require_pil()
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # any failure means "not a usable image"; the reason is reported
        return f"{type(exc).__name__}: {exc}"
    return None


class ImageFolder(torch.utils.data.Dataset):
    """A classification dataset read from ``root/<class name>/**/<image file>``.

    Args:
        root: the folder holding one subfolder per class (hidden folders are ignored).
        transform: optional callable applied to each PIL image (RGB), e.g.
            :func:`bitfast.data.train_transform`; without one, items are the PIL images.
        extensions: file suffixes counted as images (any case).
        verify: open and ``verify()`` every file at scan time (default); unreadable files are
            skipped and counted. ``False`` trusts the suffixes (faster start on huge trees).
        workers: threads for the verification (default ``min(32, 4 * cpus)``).

    Attributes: ``classes`` (sorted folder names), ``class_to_idx``, ``samples``
    (``(path, label)`` pairs), ``targets`` (int64 tensor), ``skipped`` (how many files were
    left out as unreadable, including any that failed later in ``__getitem__``) and
    ``skipped_files`` (their paths and reasons).

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
                    "add images, remove the folder, or pass extensions="
                )
            files.extend((path, label) for path in found)

        self.skipped_files: list[tuple[str, str]] = []
        if verify:
            if workers is None:
                workers = min(32, 4 * (os.cpu_count() or 1))
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
                reasons = list(pool.map(_readable, (path for path, _ in files), chunksize=64))
            self.skipped_files = [(path, why) for (path, _), why in zip(files, reasons) if why is not None]
            files = [item for item, why in zip(files, reasons) if why is None]
            if self.skipped_files:
                shown = ", ".join(os.path.relpath(p, root) for p, _ in self.skipped_files[:5])
                more = f" and {len(self.skipped_files) - 5} more" if len(self.skipped_files) > 5 else ""
                warnings.warn(
                    f"ImageFolder: skipped {len(self.skipped_files)} unreadable file(s) under {root!r}: {shown}{more} "
                    "(see .skipped_files for the reasons)",
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
    def skipped(self) -> int:
        """How many files were left out as unreadable."""
        return len(self.skipped_files)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        """The RGB PIL image of sample ``index`` (no transform)."""
        Image = _require_pil()
        with Image.open(self.samples[index][0]) as img:
            return img.convert("RGB")

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
