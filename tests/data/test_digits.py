"""The embedded UCI digits: the shipped file, the stratified split, class remapping, scaling."""

from __future__ import annotations

import gzip
from importlib import resources

import pytest
import torch

from bitfast.data import DigitsDataset, load_digits, split_indices


def test_shipped_file_and_license():
    folder = resources.files("bitfast.data")
    rows = gzip.decompress(folder.joinpath("digits.csv.gz").read_bytes()).decode().splitlines()
    assert len(rows) == 1797 and all(len(r.split(",")) == 65 for r in rows)
    license_text = folder.joinpath("DIGITS_LICENSE.txt").read_text()
    for words in ("CC BY 4.0", "Alpaydin", "Kaynak", "UCI", "Optical Recognition of Handwritten Digits"):
        assert words in license_text


def test_load_digits():
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == torch.uint8
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert int(images.min()) == 0 and int(images.max()) == 16
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # The first example is a 0: a ring of ink with an empty centre.
    assert labels[0] == 0 and images[0, 3:5, 3:5].sum() == 0 and images[0].sum() > 200
    # Callers get copies: changing them does not change the next call.
    images.zero_()
    assert int(load_digits()[0].max()) == 16


def test_split_is_stratified_disjoint_and_deterministic():
    labels = load_digits()[1]
    train, test = split_indices(labels, 0.2, seed=0)
    assert len(train) + len(test) == 1797
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    counts = torch.bincount(labels)
    test_counts = torch.bincount(labels[test], minlength=10)
    assert torch.equal(test_counts, torch.round(counts * 0.2).long())
    again = split_indices(labels, 0.2, seed=0)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    other = split_indices(labels, 0.2, seed=1)
    assert not torch.equal(test, other[1])


def test_dataset_class_remap_and_subsets():
    ds = DigitsDataset(classes=[7, 3], split="all", resolution=8)
    _, labels = load_digits()
    assert ds.classes == [7, 3]
    assert len(ds) == int((labels == 7).sum() + (labels == 3).sum())
    assert torch.equal(labels[ds.indices][ds.targets == 0], torch.full(((ds.targets == 0).sum(),), 7))
    assert torch.equal(labels[ds.indices][ds.targets == 1], torch.full(((ds.targets == 1).sum(),), 3))
    # A class's split does not depend on which other classes are selected, nor their order.
    a = DigitsDataset(classes=range(5, 10), split="test", resolution=8)
    b = DigitsDataset(classes=[9, 8, 7, 6, 5], split="test", resolution=8)
    c = DigitsDataset(classes=range(10), split="test", resolution=8)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.indices, c.indices[labels[c.indices] >= 5])
    assert torch.equal(b.targets, 9 - labels[b.indices])
    tr = DigitsDataset(classes=range(5, 10), split="train", resolution=8)
    assert len(tr) + len(a) == int((labels >= 5).sum())
    assert not set(tr.indices.tolist()) & set(a.indices.tolist())


def test_dataset_images_scaled_and_resized():
    images, _ = load_digits()
    ds8 = DigitsDataset(split="all", resolution=8, channels=1)
    x, y = ds8[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y == 0
    assert torch.allclose(x[0], images[0].float() / 8 - 1)  # 0..16 -> [-1, 1]
    ds = DigitsDataset(split="all", resolution=32)
    x, _ = ds[5]
    assert x.shape == (3, 32, 32)
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    assert float(ds.images.min()) == -1.0 and float(ds.images.max()) <= 1.0
    assert ds.images.shape == (1797, 3, 32, 32)
    # Bilinear upsampling keeps the mean ink roughly where it was.
    assert abs(float(ds.images[:, 0].mean()) - float(ds8.images.mean())) < 0.05
    # An in-place transform cannot change the stored images.
    ds.transform = lambda t: t.zero_()
    ds[5]
    ds.transform = None
    assert torch.equal(ds[5][0], x)


def test_transform_is_applied():
    ds = DigitsDataset(classes=[1], split="test", resolution=16, transform=lambda t: t[:, :4, :4] + 10)
    x, y = ds[0]
    assert x.shape == (3, 4, 4) and float(x.min()) >= 9.0 and y == 0


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"classes": []}, ValueError, "empty"),
        ({"classes": [3, 10]}, ValueError, "0..9"),
        ({"classes": [3, 3]}, ValueError, "repeated"),
        ({"classes": "01"}, TypeError, "sequence"),
        ({"split": "val"}, ValueError, "split"),
        ({"resolution": 0}, ValueError, "resolution"),
        ({"channels": 0}, ValueError, "channels"),
        ({"test_fraction": 1.0}, ValueError, "test_fraction"),
        ({"transform": 3}, TypeError, "transform"),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        DigitsDataset(**kwargs)
