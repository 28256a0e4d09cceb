"""BiT-HyperRule against the tables and boundary steps of docs/bit.md (BiT-HyperRule)."""

from __future__ import annotations

import math

import pytest

from bitfast.train import hyperrule

SCHEDULES = {
    "small": [100, 200, 300, 400, 500],
    "medium": [500, 3000, 6000, 9000, 10000],
    "large": [500, 6000, 12000, 18000, 20000],
}


@pytest.mark.parametrize(
    "n, name",
    [(1, "small"), (50, "small"), (19_999, "small"), (20_000, "medium"), (50_000, "medium"),
     (499_999, "medium"), (500_000, "large"), (1_281_167, "large")],
)
def test_schedule_table(n, name):
    assert hyperrule.schedule(n) == SCHEDULES[name]


@pytest.mark.parametrize(
    "size, variant, expected",
    [
        ((8, 8), "release", (160, 128)),
        ((32, 32), "release", (160, 128)),
        ((95, 96), "release", (160, 128)),  # area 9120 < 9216
        ((96, 96), "release", (512, 480)),  # area == 96*96 is not below
        ((48, 200), "release", (512, 480)),  # area 9600: by area, not by side
        ((224, 224), "release", (512, 480)),
        ((224, 224), "paper", (448, 384)),
        ((32, 32), "paper", (160, 128)),
        (32, "release", (160, 128)),
        (500, "paper", (448, 384)),
    ],
)
def test_resolution(size, variant, expected):
    assert hyperrule.resolution(size, variant=variant) == expected


def test_resolution_default_is_release():
    assert hyperrule.resolution((300, 300)) == (512, 480)


# (n, step, lr) at every boundary of the three schedules, at batch 512.
BOUNDARIES = [
    # n < 20k: [100, 200, 300, 400, 500]
    (1000, 0, 0.0), (1000, 1, 0.003 / 100), (1000, 50, 0.0015), (1000, 99, 0.003 * 99 / 100),
    (1000, 100, 0.003), (1000, 200, 0.003), (1000, 201, 3e-4), (1000, 300, 3e-4), (1000, 301, 3e-5),
    (1000, 400, 3e-5), (1000, 401, 3e-6), (1000, 499, 3e-6), (1000, 500, None), (1000, 10_000, None),
    # n < 500k: [500, 3000, 6000, 9000, 10000]
    (50_000, 0, 0.0), (50_000, 250, 0.0015), (50_000, 499, 0.003 * 499 / 500), (50_000, 500, 0.003),
    (50_000, 3000, 0.003), (50_000, 3001, 3e-4), (50_000, 6000, 3e-4), (50_000, 6001, 3e-5),
    (50_000, 9000, 3e-5), (50_000, 9001, 3e-6), (50_000, 9999, 3e-6), (50_000, 10_000, None),
    # n >= 500k: [500, 6000, 12000, 18000, 20000]
    (500_000, 0, 0.0), (500_000, 500, 0.003), (500_000, 6000, 0.003), (500_000, 6001, 3e-4),
    (500_000, 12_000, 3e-4), (500_000, 12_001, 3e-5), (500_000, 18_000, 3e-5), (500_000, 18_001, 3e-6),
    (500_000, 19_999, 3e-6), (500_000, 20_000, None),
]


@pytest.mark.parametrize("n, step, expected", BOUNDARIES)
def test_lr_at_boundaries(n, step, expected):
    got = hyperrule.lr(step, n)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_lr_spec_examples():
    # The three values docs/bit.md spells out.
    assert hyperrule.lr(0, 50_000) == 0.0
    assert hyperrule.lr(3000, 50_000) == pytest.approx(0.003)
    assert hyperrule.lr(3001, 50_000) == pytest.approx(0.0003)


@pytest.mark.parametrize("batch", [1, 64, 128, 512, 1024])
def test_lr_batch_scaling(batch):
    scale = batch / 512
    for step in (0, 50, 100, 250, 350, 450):
        assert hyperrule.lr(step, 1000, batch_size=batch) == pytest.approx(hyperrule.lr(step, 1000) * scale)
    assert hyperrule.lr(500, 1000, batch_size=batch) is None
    assert hyperrule.lr(100, 1000, base_lr=0.01, batch_size=batch) == pytest.approx(0.01 * scale)


def test_lr_is_monotone_within_phases():
    values = [hyperrule.lr(s, 1000) for s in range(500)]
    assert all(a <= b for a, b in zip(values[:100], values[1:101]))  # warm-up rises to the peak
    assert all(a >= b for a, b in zip(values[100:-1], values[101:]))  # then only decays
    assert math.isclose(max(values), 0.003)


@pytest.mark.parametrize("n, alpha", [(1, 0.0), (19_999, 0.0), (20_000, 0.1), (1_000_000, 0.1)])
def test_mixup_alpha(n, alpha):
    assert hyperrule.mixup_alpha(n) == alpha


def test_settings_gathers_the_rule():
    s = hyperrule.settings(50_000, image_size=(32, 32), batch_size=128)
    assert s["schedule"] == SCHEDULES["medium"] and s["steps"] == 10_000
    assert s["lr"] == pytest.approx(0.003 / 4)
    assert (s["resize"], s["crop"]) == (160, 128)
    assert s["mixup_alpha"] == 0.1 and s["momentum"] == 0.9 and s["weight_decay"] == 0.0
    assert s["zero_head"] and not s["nesterov"]
    assert "crop" not in hyperrule.settings(10)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: hyperrule.lr(-1, 100), ValueError, "step"),
        (lambda: hyperrule.lr(1.5, 100), TypeError, "step"),
        (lambda: hyperrule.lr(0, 0), ValueError, "n"),
        (lambda: hyperrule.lr(0, 100, base_lr=0), ValueError, "base_lr"),
        (lambda: hyperrule.lr(0, 100, batch_size=0), ValueError, "batch_size"),
        (lambda: hyperrule.schedule(-5), ValueError, "n"),
        (lambda: hyperrule.resolution((0, 10)), ValueError, "height"),
        (lambda: hyperrule.resolution((10, 10, 3)), TypeError, "image_size"),
        (lambda: hyperrule.resolution((10, 10), variant="timm"), ValueError, "variant"),
        (lambda: hyperrule.mixup_alpha(True), TypeError, "n"),
    ],
)
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
