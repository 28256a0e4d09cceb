"""ImageFolder: labels from sorted class folders, corrupt files skipped and counted, clear errors."""

from __future__ import annotations

import warnings

import numpy as np
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


# 16-bit grayscale values and what they become in 8 bits: round(v / 257).
_DEEP = [0, 1000, 30000, 65535]
_DEEP_8BIT = [0, 4, 117, 255]


def _deep(path, mode, values=_DEEP, dtype="<u2"):
    """A 4x1 image of ``mode`` holding ``values``, written to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes(mode, (len(values), 1), np.array(values, dtype=dtype).tobytes()).save(path)


@pytest.mark.parametrize(
    "name, mode, dtype",
    [("g16.png", "I;16", "<u2"), ("g16b.tif", "I;16B", ">u2"), ("g32.tif", "I", "<i4")],
)
def test_16bit_grayscale_is_scaled_not_white(tmp_path, name, mode, dtype):
    _deep(tmp_path / "deep" / name, mode, dtype=dtype)
    with Image.open(tmp_path / "deep" / name) as img:
        assert img.mode.startswith("I")  # the file really is 16/32-bit
    for verify in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = ImageFolder(tmp_path, verify=verify)
        img, _ = ds[0]
        assert img.mode == "RGB" and img.size == (4, 1)
        assert [img.getpixel((x, 0)) for x in range(4)] == [(v, v, v) for v in _DEEP_8BIT]


@pytest.mark.parametrize("mode, dtype", [("I;16L", "<u2"), ("I;16N", "=u2"), ("I;16B", ">u2")])
def test_16bit_byte_orders_scale_alike(mode, dtype):
    # Pillow cannot write I;16L / I;16N files, so these are checked on in-memory images.
    from bitfast.data.folder import _to_8bit

    img = Image.frombytes(mode, (4, 1), np.array(_DEEP, dtype=dtype).tobytes())
    assert np.asarray(_to_8bit(img, "mem").convert("RGB"))[0, :, 0].tolist() == _DEEP_8BIT


def test_float_image_in_unit_range_is_scaled(tmp_path):
    path = tmp_path / "f" / "unit.tif"
    path.parent.mkdir()
    Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)).save(path)
    img, _ = ImageFolder(tmp_path)[0]
    assert [img.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]  # v * 255, halves up


def test_out_of_range_32bit_images_are_skipped_at_scan(tree):
    _deep(tree / "cat" / "wide.tif", "I", [0, 70000, 5, 6], dtype="<i4")
    (tree / "dog" / "hot.tif").parent.mkdir(exist_ok=True)
    Image.fromarray(np.array([[0.0, 2.5]], dtype=np.float32)).save(tree / "dog" / "hot.tif")
    exts = (".png", ".tif")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable.*wide\.tif.*hot\.tif"):
        ds = ImageFolder(tree, extensions=exts)
    assert len(ds) == 4 and ds.skipped == 2
    reasons = dict(ds.skipped_files)
    why = reasons[str(tree / "cat" / "wide.tif")]
    assert "wide.tif" in why and "0..65535" in why and "8- or 16-bit" in why
    assert "hot.tif" in reasons[str(tree / "dog" / "hot.tif")]
    # verify=False: load refuses it with the same message; __getitem__ serves the next sample.
    ds = ImageFolder(tree, extensions=exts, verify=False)
    i = [p for p, _ in ds.samples].index(str(tree / "cat" / "wide.tif"))
    with pytest.raises(ValueError, match=r"wide\.tif.*8- or 16-bit"):
        ds.load(i)
    with pytest.warns(UserWarning, match="cannot decode"):
        img, label = ds[i]
    assert label == 1 and img.getpixel((0, 0)) == (10, 10, 10)  # dog/a.png, the next sample
    assert ds.skipped == 1


def test_8bit_images_are_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (5, 7, 4), dtype=np.uint8), "RGBA")
    images = {
        "rgb.png": rgba.convert("RGB"),
        "l.png": rgba.convert("L"),
        "p.png": rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "rgba.png": rgba,
        "la.png": rgba.convert("LA"),
        "one.png": rgba.convert("1"),
        "cmyk.jpg": rgba.convert("CMYK"),
        "rgb.jpg": rgba.convert("RGB"),
    }
    (tmp_path / "c").mkdir()
    for name, img in images.items():
        img.save(tmp_path / "c" / name)
    ds = ImageFolder(tmp_path)
    assert len(ds) == len(images)
    for i, (path, _) in enumerate(ds.samples):
        with Image.open(path) as img:
            assert img.mode == images[path.split("/")[-1]].mode
            assert ds.load(i).tobytes() == img.convert("RGB").tobytes()


def test_image_sizes_follow_samples(tmp_path):
    sizes = {"cat/a.png": (6, 5), "cat/b.png": (3, 9), "dog/c.png": (8, 2), "dog/d.png": (4, 4)}
    for name, size in sizes.items():
        _png(tmp_path / name, 50, size=size)  # size is (width, height)
    _deep(tmp_path / "dog" / "e.png", "I;16")
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")

    def expected(ds):
        out = []
        for path, _ in ds.samples:
            with Image.open(path) as img:
                out.append((img.height, img.width))
        return out

    with pytest.warns(UserWarning, match="skipped 1"):
        ds = ImageFolder(tmp_path)
    assert ds._image_sizes is not None  # read during the scan
    assert ds.image_sizes == expected(ds) and len(ds.image_sizes) == len(ds.samples) == 5
    assert ds.image_sizes[0] == (5, 6) and ds.image_sizes[-1] == (1, 4)

    # verify=False: read lazily from the headers on first access, then cached; the file that
    # cannot be opened stays in samples with None and is recorded as skipped.
    lazy = ImageFolder(tmp_path, verify=False)
    assert lazy._image_sizes is None and len(lazy) == 6
    with pytest.warns(UserWarning, match=r"cannot read the size of 1 file.*broken\.png"):
        got = lazy.image_sizes
    names = [p.split("/")[-1] for p, _ in lazy.samples]
    assert got[names.index("broken.png")] is None
    assert [s for s in got if s is not None] == ds.image_sizes
    assert lazy.skipped == 1 and lazy.skipped_files[0][0].endswith("broken.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lazy.image_sizes is got  # cached: no second pass, no second warning
