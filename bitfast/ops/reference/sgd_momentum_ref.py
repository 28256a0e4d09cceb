"""The reference of the SGD-with-momentum step (``bitfast.ops.sgd_momentum``)."""

from __future__ import annotations

import torch

from bitfast.ops.reference.common import stat_dtype

__all__ = ["sgd_momentum_"]


def sgd_momentum_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    lr_tensor: torch.Tensor | None = None,
    ema_params: list[torch.Tensor] = (),
    ema_decay: float = 0.0,
) -> None:
    """One in-place step of ``torch.optim.SGD`` over lists of tensors, with an optional
    exponential moving average (Polyak average) of the parameters.

    Per parameter: ``d = -g if maximize else g``; ``d += weight_decay * p``; with momentum,
    ``buf = d`` on the first step, else ``buf = momentum * buf + (1 - dampening) * d``, and
    ``d = d + momentum * buf`` (nesterov) or ``d = buf``; finally ``p -= lr * d``.
    ``momentum_buffers`` may be empty when ``momentum == 0``.

    ``lr_tensor`` (a one-element float32 tensor), when given, is the learning rate instead
    of ``lr``. A CPU tensor is read as a number, as ``torch.optim.SGD`` does with a tensor
    ``lr``; on other devices the update is formed with tensor arithmetic in float32
    (float64 for float64 params), so the step never waits for the device.

    With ``ema_params`` (one per param, its shape, in its dtype or in float32), after the
    update of ``p``: ``ema = ema_decay * ema + (1 - ema_decay) * p``, from the parameter as
    stored, evaluated as ``torch.lerp(ema, p, 1 - ema_decay)`` (the kernels compute
    ``ema + (1 - ema_decay) * (p - ema)``): weights that sum to one exactly, so a constant
    ``p`` leaves ``ema == p``.
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        d = -g if maximize else g
        if weight_decay != 0:
            d = d.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if is_first_step:
                buf.copy_(d)
            else:
                buf.mul_(momentum).add_(d, alpha=1 - dampening)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        if lr_tensor is None:
            p.add_(d, alpha=-lr)
        elif lr_tensor.device.type == "cpu":
            p.add_(d, alpha=-float(lr_tensor))
        else:
            acc = stat_dtype(p.dtype)
            p.sub_(d.to(acc) * lr_tensor.reshape(()).to(acc))
        if ema_params:
            e = ema_params[i]
            e.lerp_(p.to(e.dtype), 1 - ema_decay)

