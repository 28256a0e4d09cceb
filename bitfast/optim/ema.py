"""``ModelEMA``: an exponential moving average of a model's weights, for any optimizer.

``FusedSGD(..., ema_decay=...)`` keeps the average of its parameters inside its own fused
step. ``ModelEMA`` is the same average for users of other optimizers, as a separate,
cheap pass after each step (``torch._foreach_lerp_`` over every tensor), and it also covers
the model's buffers (BatchNorm running statistics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["ModelEMA", "ema_dtype"]

# Half-precision tensors keep their moving average in float32: with a decay near 1 the
# increments (1 - decay) * (x - ema) are far below fp16/bf16 resolution and would round away.
_EMA_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.complex32: torch.complex64}

_BUFFER_MODES = ("average", "copy")


def ema_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the moving average kept for tensors of ``dtype``: float32 for float16
    and bfloat16 (complex64 for complex32), otherwise ``dtype`` itself."""
    return _EMA_DTYPES.get(dtype, dtype)


def check_decay(owner: str, name: str, decay) -> float:
    """``decay`` as a float, after checking that it is a number in ``[0, 1)``; errors name
    ``owner`` and the argument ``name``."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"{owner}: {name} must be a float in [0, 1); got {type(decay).__name__}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"{owner}: {name} must be in [0, 1); got {decay}")
    return float(decay)


def _averaged(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class ModelEMA:
    """An exponential moving average (Polyak average) of a model's parameters and buffers.

    After each optimizer step, ``update(model)`` sets, for every parameter ``p``,
    ``ema = decay * ema + (1 - decay) * p`` (as ``torch.lerp(ema, p, 1 - decay)``, one
    ``torch._foreach_lerp_`` per device and dtype, without autograd). Buffers:

    * floating-point buffers (BatchNorm ``running_mean`` / ``running_var``) are averaged
      like the parameters with ``buffers="average"`` (default), or copied as they are with
      ``buffers="copy"`` (the latest running statistics, which is what the model itself
      would evaluate with);
    * other buffers (``num_batches_tracked``) are always copied.

    The averages start as a copy of the model at construction. They are kept in float32 for
    float16/bfloat16 tensors (a half-precision average with a decay near 1 would not move),
    otherwise in the tensor's dtype, with its memory format, on ``device`` (default: the
    tensor's own device; ``"cpu"`` saves accelerator memory at the cost of a copy per
    update).

    Args:
        model: the model to average; its ``named_parameters()`` and ``named_buffers()`` name
            the averages, and ``update``/``copy_to``/``swap`` must be given a model with the
            same names and shapes (the same model, usually).
        decay: the decay, ``0 <= decay < 1`` (default 0.9999).
        device: where to keep the averages (default: with each tensor).
        buffers: ``"average"`` (default) or ``"copy"``, for floating-point buffers.

    Example:
        >>> ema = ModelEMA(model, decay=0.999)
        >>> for x, y in loader:
        ...     loss_fn(model(x), y).backward()
        ...     opt.step()
        ...     opt.zero_grad()
        ...     ema.update(model)
        >>> with ema.swap(model):
        ...     evaluate(model)  # the averaged weights; the trained ones are back afterwards
    """

    def __init__(
        self,
        model: torch.nn.Module,
        decay: float = 0.9999,
        device: torch.device | str | None = None,
        *,
        buffers: str = "average",
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"ModelEMA: model must be a torch.nn.Module; got {type(model).__name__}")
        self.decay = check_decay("ModelEMA", "decay", decay)
        if buffers not in _BUFFER_MODES:
            raise ValueError(f"ModelEMA: buffers must be one of {_BUFFER_MODES}; got {buffers!r}")
        self.buffers = buffers
        self.device = None if device is None else torch.device(device)
        self.num_updates = 0
        self._shadow: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, t in self._named_tensors(model).items():
                dtype = ema_dtype(t.dtype) if _averaged(t) else t.dtype
                e = torch.empty_like(t, dtype=dtype, device=self.device or t.device, memory_format=torch.preserve_format)
                self._shadow[name] = e.copy_(t)

    @staticmethod
    def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        named = {name: p.detach() for name, p in model.named_parameters()}
        named.update((name, b.detach()) for name, b in model.named_buffers())
        return named

    def _matching(self, model: torch.nn.Module, what: str) -> dict[str, torch.Tensor]:
        """The model's tensors by name, checked against the averages."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"ModelEMA.{what}: model must be a torch.nn.Module; got {type(model).__name__}")
        tensors = self._named_tensors(model)
        if tensors.keys() != self._shadow.keys():
            missing = sorted(self._shadow.keys() - tensors.keys())
            extra = sorted(tensors.keys() - self._shadow.keys())
            raise ValueError(
                f"ModelEMA.{what}: the model's parameters and buffers differ from the averaged ones "
                f"(missing: {missing[:5]}, unexpected: {extra[:5]}); pass the model the ModelEMA was built from"
            )
        for name, t in tensors.items():
            if t.shape != self._shadow[name].shape:
                raise ValueError(
                    f"ModelEMA.{what}: {name} has shape {tuple(t.shape)}; the average has "
                    f"{tuple(self._shadow[name].shape)}"
                )
        return tensors

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The averages by parameter/buffer name (the live tensors: do not modify)."""
        return dict(self._shadow)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the averages towards ``model``'s current values (call after each step)."""
        tensors = self._matching(model, "update")
        params = {name for name, _ in model.named_parameters()}
        # (device, dtype) -> (averages, values) for one foreach call each
        groups: dict[tuple, tuple[list, list]] = {}
        for name, t in tensors.items():
            e = self._shadow[name]
            average = _averaged(t) and (name in params or self.buffers == "average")
            if not average:
                e.copy_(t)
                continue
            if t.dtype != e.dtype or t.device != e.device:
                t = t.to(device=e.device, dtype=e.dtype)
            es, ts = groups.setdefault((e.device, e.dtype), ([], []))
            es.append(e)
            ts.append(t)
        weight = 1.0 - self.decay
        for es, ts in groups.values():
            torch._foreach_lerp_(es, ts, weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the averages (cast to their
        dtypes and devices)."""
        tensors = self._matching(model, "copy_to")
        for name, t in tensors.items():
            t.copy_(self._shadow[name])

    @contextlib.contextmanager
    def swap(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Within the block, ``model`` holds the averages; on exit, even by an exception, its
        own values come back. Costs one copy of the model's tensors while inside.

        Example:
            >>> with ema.swap(model):
            ...     val_loss = evaluate(model)
        """
        tensors = self._matching(model, "swap")
        with torch.no_grad():
            saved = {name: t.clone(memory_format=torch.preserve_format) for name, t in tensors.items()}
            for name, t in tensors.items():
                t.copy_(self._shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, t in tensors.items():
                    t.copy_(saved[name])

    def state_dict(self) -> dict[str, Any]:
        """The averages and settings: ``{"decay", "num_updates", "buffers", "shadow"}``
        (``shadow``: name -> tensor, the live tensors, as ``Module.state_dict`` returns)."""
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "buffers": self.buffers,
            "shadow": dict(self._shadow),
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` returned. The names and shapes must match this
        ``ModelEMA``'s; the averages are copied into the existing tensors (keeping their
        dtype and device)."""
        if not isinstance(state_dict, dict) or "shadow" not in state_dict:
            raise ValueError("ModelEMA.load_state_dict: expected a dict from ModelEMA.state_dict() (with a 'shadow' key)")
        shadow = state_dict["shadow"]
        if shadow.keys() != self._shadow.keys():
            missing = sorted(self._shadow.keys() - shadow.keys())
            extra = sorted(shadow.keys() - self._shadow.keys())
            raise ValueError(f"ModelEMA.load_state_dict: names differ (missing: {missing[:5]}, unexpected: {extra[:5]})")
        for name, t in shadow.items():
            if tuple(t.shape) != tuple(self._shadow[name].shape):
                raise ValueError(
                    f"ModelEMA.load_state_dict: {name} has shape {tuple(t.shape)}; expected "
                    f"{tuple(self._shadow[name].shape)}"
                )
        decay = check_decay("ModelEMA.load_state_dict", "decay", state_dict.get("decay", self.decay))
        buffers = state_dict.get("buffers", self.buffers)
        if buffers not in _BUFFER_MODES:
            raise ValueError(f"ModelEMA.load_state_dict: buffers must be one of {_BUFFER_MODES}; got {buffers!r}")
        for name, t in shadow.items():
            self._shadow[name].copy_(t)
        self.decay = decay
        self.buffers = buffers
        self.num_updates = int(state_dict.get("num_updates", 0))
