"""ImageFolder: labels from sorted class folders, corrupt files skipped and counted, clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from bitfast.data import ImageFolder, eval_transform

Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (pip install pillow)")


def _png(path, value, size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


@pytest.fixture
def tree(tmp_path):
    _png(tmp_path / "dog" / "a.png", 10)
    _png(tmp_path / "dog" / "sub" / "b.PNG", 20)
    _png(tmp_path / "cat" / "c.png", 30)
    _png(tmp_path / "cat" / "d.png", 40)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()
    return tmp_path


def test_labels_samples_targets(tree):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about here
        ds = ImageFolder(tree)
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    names = [p.split("/")[-1] for p, _ in ds.samples]
    assert names == ["c.png", "d.png", "a.png", "b.PNG"]
    assert ds.targets.tolist() == [0, 0, 1, 1] and ds.skipped == 0 and len(ds) == 4
    img, label = ds[3]
    assert img.mode == "RGB" and img.size == (6, 5) and label == 1
    x, label = ImageFolder(tree, transform=eval_transform(4))[0]
    assert x.shape == (3, 4, 4) and label == 0
    assert torch.allclose(x, torch.full((3, 4, 4), 30 / 255 * 2 - 1), atol=1e-6)


def test_corrupt_files_are_skipped_and_counted(tree):
    (tree / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (tree / "dog" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        ds = ImageFolder(tree)
    assert ds.skipped == 2 and len(ds) == 4
    assert sorted(p.split("/")[-1] for p, _ in ds.skipped_files) == ["broken.png", "empty.jpg"]
    assert all(p.split("/")[-1] != "broken.png" for p, _ in ds.samples)


def test_decode_failure_after_scan_serves_the_next_sample(tree):
    ds = ImageFolder(tree)
    (tree / "cat" / "c.png").write_bytes(b"gone bad after the scan")
    with pytest.warns(UserWarning, match="cannot decode"):
        img, label = ds[0]
    assert label == 0 and img.getpixel((0, 0)) == (40, 40, 40)  # d.png, the next sample
    assert ds.skipped == 1


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file"):
        ImageFolder(tmp_path / "file.png")
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolder(root)
    _png(root / "a" / "x.png", 1)
    (root / "b").mkdir()
    with pytest.raises(ValueError, match=r"'.*/b' has no image files"):
        ImageFolder(root)
    (root / "b" / "bad.png").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"'.*/b' has no readable image"):
        ImageFolder(root)
    # verify=False trusts the suffix: the class is there, and decoding it is left to loading.
    assert len(ImageFolder(root, verify=False)) == 2


def test_extensions(tree):
    ds = ImageFolder(tree, extensions=("txt", ".png"), verify=False)
    assert any(p.endswith("notes.txt") for p, _ in ds.samples)
    with pytest.raises(ValueError, match="extensions"):
        ImageFolder(tree, extensions=())
