"""BiT preprocessing: shapes, value ranges, what each step does, determinism under a seed."""

from __future__ import annotations

import pytest
import torch

from bitfast.data import augment_tensor, eval_transform, to_tensor, train_transform
from bitfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_params

try:
    from PIL import Image
except ImportError:  # Pillow is optional; its cases skip with this reason
    Image = None
needs_pil = pytest.mark.skipif(Image is None, reason="Pillow is not installed (pip install pillow)")


def _image(h=40, w=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def test_to_tensor():
    img = _image()
    x = to_tensor(img)
    assert x.dtype == torch.float32 and x.shape == (3, 40, 60)
    assert torch.allclose(x * 255, img.float())
    assert to_tensor(torch.zeros(5, 7)).shape == (1, 5, 7)
    assert torch.equal(to_tensor(x.double()), x)


@pytest.mark.parametrize("inception", [False, True])
def test_train_transform_shape_range_and_determinism(inception):
    img = _image()
    t = train_transform(None if inception else 48, 32, inception=inception)
    torch.manual_seed(3)
    a = t(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    torch.manual_seed(3)
    assert torch.equal(t(img), a)
    # A generator of its own makes the transform independent of the global stream.
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    t1 = train_transform(None if inception else 48, 32, inception=inception, generator=g1)
    t2 = train_transform(None if inception else 48, 32, inception=inception, generator=g2)
    outs = [t1(img) for _ in range(4)]
    assert all(torch.equal(o, t2(img)) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # the crops do vary


def test_train_crop_is_a_window_of_the_resized_image():
    # No flip, resize == the image size: every output is an exact window of the input.
    img = torch.arange(3 * 16 * 16, dtype=torch.float32).reshape(3, 16, 16) / (3 * 16 * 16)
    t = train_transform(16, 12, flip=False, normalize=None, generator=torch.Generator().manual_seed(0))
    seen = set()
    for _ in range(20):
        out = t(img)
        top, left = divmod(int(round(float(out[0, 0, 0]) * 768)), 16)
        assert torch.equal(out, img[:, top : top + 12, left : left + 12])
        seen.add((top, left))
    assert len(seen) > 3
    assert all(0 <= t_ <= 4 and 0 <= l_ <= 4 for t_, l_ in seen)


def test_flip_happens_about_half_the_time():
    img = torch.rand(3, 8, 8)
    t = train_transform(8, 8, normalize=None, generator=torch.Generator().manual_seed(0))
    flipped = sum(torch.equal(t(img), img.flip(-1)) for _ in range(200))
    assert 70 < flipped < 130
    t = train_transform(8, 8, normalize=None, flip=False)
    assert all(torch.equal(t(img), img) for _ in range(10))


def test_eval_transform_resizes_straight_and_normalizes():
    img = _image(40, 60)
    out = eval_transform(24)(img)
    assert out.shape == (3, 24, 24)
    x = to_tensor(img)
    want = torch.nn.functional.interpolate(x[None], size=(24, 24), mode="bilinear", antialias=True)[0] * 2 - 1
    assert torch.allclose(out, want, atol=1e-6)
    # Same size: nothing but the [-1, 1] mapping.
    assert torch.allclose(eval_transform(40)(_image(40, 40)), to_tensor(_image(40, 40)) * 2 - 1)


def test_normalizations():
    img = torch.full((3, 4, 4), 0.5)
    assert torch.allclose(eval_transform(4)(img), torch.zeros(3, 4, 4))
    out = eval_transform(4, normalize="imagenet")(img)
    want = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[:, 0, 0], want)
    out = eval_transform(4, normalize=((0.5,), (0.25,)))(torch.full((1, 4, 4), 1.0))
    assert torch.allclose(out, torch.full((1, 4, 4), 2.0))
    # A grey image meets three-channel statistics as three channels.
    assert eval_transform(4, normalize="imagenet")(torch.full((1, 4, 4), 0.5)).shape == (3, 4, 4)


def test_random_resized_crop_params_in_bounds():
    g = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(50, 80, generator=g)
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 80 and h > 0 and w > 0
        areas.append(h * w / 4000)
    assert min(areas) < 0.3 and max(areas) > 0.7
    # Nothing fits (scale above 1): the fallback is the largest centred crop within the ratio.
    assert random_resized_crop_params(10, 100, scale=(2.0, 3.0), generator=g) == (0, 43, 10, 13)
    assert random_resized_crop_params(20, 20, scale=(2.0, 3.0), generator=g) == (0, 0, 20, 20)


def test_augment_tensor_pad_crop():
    x = torch.linspace(-1, 1, 3 * 16 * 16).reshape(3, 16, 16)
    aug = augment_tensor(16, pad=2, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x[None], (2, 2, 2, 2), mode="replicate")[0]
    windows = {(t, l_): padded[:, t : t + 16, l_ : l_ + 16] for t in range(5) for l_ in range(5)}
    seen = set()
    for _ in range(30):
        out = aug(x)
        assert out.shape == (3, 16, 16)
        match = [k for k, v in windows.items() if torch.equal(v, out)]
        assert match
        seen.add(match[0])
    assert len(seen) > 5
    # Constant fill and the default pad (crop // 8).
    out = augment_tensor(8, fill=-1.0, generator=torch.Generator().manual_seed(1))(torch.ones(1, 8, 8))
    assert set(out.unique().tolist()) <= {-1.0, 1.0}
    assert augment_tensor(8).pad == 1
    # No flip by default: the content is never mirrored.
    aug = augment_tensor(4, pad=0)
    assert all(torch.equal(aug(x[:, :4, :4]), x[:, :4, :4]) for _ in range(5))


def test_augment_tensor_resized_crop():
    x = torch.rand(1, 32, 32)
    aug = augment_tensor(24, scale=(0.5, 1.0), generator=torch.Generator().manual_seed(0))
    out = aug(x)
    assert out.shape == (1, 24, 24) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@needs_pil
def test_pil_input_matches_tensor_path_closely():
    img = _image(30, 50)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    assert torch.equal(to_tensor(pil), to_tensor(img))
    a, b = eval_transform(30)(pil), eval_transform(30)(img)
    assert a.shape == b.shape == (3, 30, 30)
    assert (a - b).abs().mean() < 0.05  # Pillow's and torch's bilinear differ only slightly
    out = train_transform(40, 32)(pil.convert("L"))
    assert out.shape == (3, 32, 32)
    out = train_transform(None, 16, inception=True)(pil)
    assert out.shape == (3, 16, 16) and float(out.abs().max()) <= 1.0


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: train_transform(100, 128), ValueError, "resize"),
        (lambda: train_transform(160, 0), ValueError, "crop"),
        (lambda: train_transform(160, 128, normalize="cifar"), ValueError, "normalize"),
        (lambda: train_transform(160, 128, inception=True).__call__("x"), TypeError, "PIL image"),
        (lambda: eval_transform(8)(torch.zeros(1, 1, 4, 4)), ValueError, "C, H, W"),
        (lambda: eval_transform(8)(torch.zeros(3, 4, 4, dtype=torch.int32)), TypeError, "uint8"),
        (lambda: augment_tensor(40, pad=2)(torch.zeros(1, 32, 32)), ValueError, "smaller than crop"),
        (lambda: augment_tensor(8, pad=-1), ValueError, "pad"),
        (lambda: augment_tensor(8)(torch.zeros(8, 8)), ValueError, "C, H, W"),
        (lambda: eval_transform(4, normalize=((0.5, 0.5), (0.0, 1.0))), ValueError, "std"),
    ],
)
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
