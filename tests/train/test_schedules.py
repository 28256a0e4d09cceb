"""Upstream learning-rate schedules (docs/bit.md, upstream training) at their boundary steps."""

from __future__ import annotations

import math

import pytest

from bitfast.train.schedules import cosine_lr, scaled_lr, upstream_step_lr


def test_scaled_lr():
    assert scaled_lr(0.03, 256) == pytest.approx(0.03)
    assert scaled_lr(0.03, 4096) == pytest.approx(0.48)
    assert scaled_lr(0.003, 128, 512) == pytest.approx(0.00075)


def test_upstream_step_boundaries():
    spe = 100  # steps per epoch: epochs 30/60/80 start at steps 3000/6000/8000; the end is 9000
    f = lambda s: upstream_step_lr(s, spe, batch_size=512, warmup_steps=500)  # noqa: E731
    peak = 0.06
    assert f(0) == 0.0
    assert f(250) == pytest.approx(peak / 2)
    assert f(500) == pytest.approx(peak)
    assert f(2999) == pytest.approx(peak)
    assert f(3000) == pytest.approx(peak / 10)  # the first step of epoch 30 is decayed
    assert f(5999) == pytest.approx(peak / 10)
    assert f(6000) == pytest.approx(peak / 100)
    assert f(7999) == pytest.approx(peak / 100)
    assert f(8000) == pytest.approx(peak / 1000)
    assert f(8999) == pytest.approx(peak / 1000)
    assert f(9000) is None


def test_upstream_defaults_are_bit():
    # 0.03 at batch 256, warm-up 5000 steps, 90 epochs.
    assert upstream_step_lr(5000, 1000) == pytest.approx(0.03)
    assert upstream_step_lr(2500, 1000) == pytest.approx(0.015)
    assert upstream_step_lr(89_999, 1000) == pytest.approx(0.03e-3)
    assert upstream_step_lr(90_000, 1000) is None


def test_upstream_warmup_longer_than_first_decay():
    # Warm-up multiplies the stepped value: it still ends on the stepped schedule.
    f = lambda s: upstream_step_lr(s, 10, warmup_steps=400, epochs=90)  # noqa: E731
    assert f(200) == pytest.approx(0.03 * 200 / 400)
    assert f(300) == pytest.approx(0.003 * 300 / 400)
    assert f(400) == pytest.approx(0.003)
    assert upstream_step_lr(7, 10, warmup_steps=0) == pytest.approx(0.03)


def test_cosine_boundaries():
    total, peak = 1000, 0.1
    f = lambda s: cosine_lr(s, total, peak)  # noqa: E731
    assert f(0) == 0.0
    assert f(50) == pytest.approx(0.05)
    assert f(99) == pytest.approx(0.099)
    assert f(100) == pytest.approx(peak)  # warm-up is 10%: 100 steps
    assert f(550) == pytest.approx(peak / 2)  # half-way through the decay
    assert f(999) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 899 / 900)))
    assert f(999) < 1e-5
    assert f(1000) is None
    values = [f(s) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_no_warmup_and_floor():
    assert cosine_lr(0, 10, 1.0, warmup_fraction=0.0) == pytest.approx(1.0)
    assert cosine_lr(5, 10, 1.0, warmup_fraction=0.0, final=0.2) == pytest.approx(0.6)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: upstream_step_lr(-1, 10), ValueError, "step"),
        (lambda: upstream_step_lr(0, 0), ValueError, "steps_per_epoch"),
        (lambda: upstream_step_lr(0, 10, decay_epochs=(30, 90)), ValueError, "decay_epochs"),
        (lambda: upstream_step_lr(0, 10, batch_size=0), ValueError, "batch_size"),
        (lambda: cosine_lr(0, 0, 0.1), ValueError, "total_steps"),
        (lambda: cosine_lr(0, 10, -0.1), ValueError, "peak"),
        (lambda: cosine_lr(0, 10, 0.1, warmup_fraction=1.5), ValueError, "warmup_fraction"),
        (lambda: cosine_lr(0, 10, 0.1, final=0.2), ValueError, "final"),
        (lambda: cosine_lr(0.5, 10, 0.1), TypeError, "step"),
    ],
)
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
