"""Checks of the training commands' options, run before any work: every message names the
command-line flag (``--momentum``, not the config field), what was given and what is expected.

``Options(cfg)`` wraps a config dataclass; its methods check one field each and raise
``ValueError`` (``TypeError`` for a value of the wrong kind).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable

import torch

from bitfast.ops.checks import bounds_text, within

__all__ = ["Options", "check_device", "flag"]


def flag(field: str) -> str:
    """The command-line flag of a config field: ``base_lr`` -> ``--base-lr``."""
    return "--" + field.replace("_", "-")


def check_device(device: str | None, what: str = "--device") -> None:
    """``device`` must be None, ``cpu``, ``cuda`` or ``cuda:N`` with that GPU present."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{what} must be cpu, cuda or cuda:N; got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} must be cpu, cuda or cuda:N; got {device!r} (bitfast trains on CPUs and CUDA GPUs)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {device}: torch sees no CUDA GPU here; pass {what} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")


class Options:
    """Checks of ``cfg``'s fields; each raises naming the field's flag."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def _get(self, name: str):
        return getattr(self.cfg, name)

    def number(self, name: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
               high_open: bool = False, integer: bool = False, optional: bool = False) -> None:
        """A finite number (an int when ``integer``) within the bounds; None when ``optional``."""
        value = self._get(name)
        if value is None and optional:
            return
        kind = numbers.Integral if integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TypeError(f"{flag(name)} must be {'an integer' if integer else 'a number'}; got {value!r}")
        if not within(value, low, high, low_open=low_open, high_open=high_open):
            rng = bounds_text(low, high, low_open=low_open, high_open=high_open)
            kind = "an integer" if integer else "a finite number"
            raise ValueError(f"{flag(name)} must be {rng} ({kind}); got {value}")

    def choice(self, name: str, choices: Iterable[str]) -> None:
        """One of ``choices``."""
        choices = list(choices)
        value = self._get(name)
        if value not in choices:
            raise ValueError(f"{flag(name)} must be one of {choices}; got {value!r}")

    def integers(self, name: str, *, low: int, high: int | None = None, min_count: int = 1, unique: bool = False,
                 increasing: bool = False, optional: bool = False) -> None:
        """A list of at least ``min_count`` integers within ``[low, high)``."""
        values = self._get(name)
        if values is None and optional:
            return
        values = list(values) if isinstance(values, (list, tuple)) else values
        if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, numbers.Integral)
                                                for v in values):
            raise TypeError(f"{flag(name)} must be a list of integers; got {values!r}")
        if len(values) < min_count:
            raise ValueError(f"{flag(name)} needs at least {min_count} value(s); got {values}")
        if any(v < low or (high is not None and v >= high) for v in values):
            rng = f">= {low}" + (f" and < {high}" if high is not None else "")
            raise ValueError(f"{flag(name)} values must be {rng}; got {values}")
        if unique and len(set(values)) != len(values):
            raise ValueError(f"{flag(name)} lists a value twice; got {values}")
        if increasing and any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(f"{flag(name)} must be increasing; got {values}")

    def directory(self, name: str, *, optional: bool = True) -> None:
        """An existing directory (None when ``optional``)."""
        value = self._get(name)
        if value is None and optional:
            return
        if not isinstance(value, str) or not os.path.isdir(value):
            raise FileNotFoundError(f"{flag(name)} {value!r} is not a directory")
