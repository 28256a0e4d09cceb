"""The argument validators of bitfast, defined once and used by the ops, the layers, the models
and the training library: every message names the function, the argument, what was given
and what was expected. A value of the wrong kind raises ``TypeError``, a value out of range
``ValueError``; the validators return the value as the type they checked for."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(fn: str, name: str, t, *, optional: bool = False) -> None:
    """``t`` must be a torch.Tensor (or None when ``optional``)."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        want = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{fn}: {name} must be {want}; got {type(t).__name__}")


def floating(fn: str, name: str, t: torch.Tensor | None) -> None:
    """``t`` (when given) must have a floating dtype."""
    if t is not None and t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} has dtype {t.dtype}; expected a floating dtype (float16, bfloat16, float32, float64)"
        )


def ndim(fn: str, name: str, t: torch.Tensor, dims: int, layout: str) -> None:
    """``t`` must have ``dims`` dimensions, described by ``layout`` like ``(N, C, H, W)``."""
    if t.dim() != dims:
        raise ValueError(f"{fn}: {name} has {t.dim()} dims (shape {tuple(t.shape)}); expected {layout}")


def channel_vector(fn: str, name: str, t: torch.Tensor | None, c: int, x: torch.Tensor) -> None:
    """An optional per-channel tensor of shape ``(c,)`` on ``x``'s device."""
    if t is None:
        return
    tensor(fn, name, t, optional=True)
    floating(fn, name, t)
    if tuple(t.shape) != (c,):
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}; expected ({c},), one value per channel")
    if t.device != x.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")


def non_negative(fn: str, name: str, value, *, integer: bool = False) -> float | int:
    """A finite number >= 0 (an int when ``integer``); returns it as a float (int)."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        want = "an int" if integer else "a float"
        raise TypeError(f"{fn}: {name} must be {want}; got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{fn}: {name} must be a finite value >= 0; got {value}")
    return int(value) if integer else float(value)


def positive_int(fn: str, name: str, value) -> int:
    """An int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{fn}: {name} must be >= 1; got {value}")
    return int(value)


def int_at_least(fn: str, name: str, value, low: int) -> int:
    """An int >= ``low`` (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int >= {low}; got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{fn}: {name} must be an int >= {low}; got {value}")
    return int(value)


def within(value: float, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> bool:
    """Whether ``value`` is finite and within the bounds (``low_open``/``high_open``: strict)."""
    if not math.isfinite(value):
        return False
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


def bounds_text(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False) -> str:
    """The bounds as a message says them: ``">= 0 and < 1"`` (``"finite"`` for none)."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    return " and ".join(p for p in (lo, hi) if p) or "finite"


def real(fn: str, name: str, value, low: float = 0.0, *, strict: bool = False, high: float | None = None) -> float:
    """A finite number ``> low`` (``strict``) or ``>= low``, and ``<= high`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a number; got {value!r} ({type(value).__name__})")
    value = float(value)
    if not within(value, low, high, low_open=strict):
        raise ValueError(f"{fn}: {name} must be a finite number {bounds_text(low, high, low_open=strict)}; got {value}")
    return value


def int_pair(fn: str, name: str, value) -> tuple[int, int]:
    """An int ``v`` (meaning ``(v, v)``) or a pair of ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        return (value[0], value[1])
    raise TypeError(f"{fn}: {name} must be an int or a pair of ints; got {value!r}")
