"""A multi-tensor SGD-with-momentum step with exactly ``torch.optim.SGD``'s semantics."""

from __future__ import annotations

import torch

from bitfast import backends
from bitfast.ops import _checks, _register

FAMILY = "sgd_momentum"

backends.register_family(FAMILY, ("sgd_momentum_",), triton_module="sgd_momentum")


def _fake(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, is_first_step):
    return None


_register.register("sgd_momentum_", _fake)


def sgd_momentum_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    is_first_step: bool = False,
    backend: str | None = None,
) -> None:
    """One in-place ``torch.optim.SGD`` step over lists of tensors.

    Per parameter: ``d = -g if maximize else g``; ``d += weight_decay * p``; with momentum,
    ``buf = d`` when ``is_first_step`` (the buffer is initialised with the gradient, as
    torch.optim.SGD does on the first step) else ``buf = momentum * buf + (1 - dampening) * d``,
    then ``d = d + momentum * buf`` if ``nesterov`` else ``d = buf``; finally ``p -= lr * d``.

    Args:
        params: parameters, updated in place. All on one device with one dtype.
        grads: their gradients (same shapes, dtype and device).
        momentum_buffers: momentum buffers, updated in place (contents ignored when
            ``is_first_step``); may be empty when ``momentum == 0``.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as in torch.optim.SGD.
        is_first_step: the buffers have not been initialised yet.
        backend: force a backend (see ``bitfast.backends``); default: auto.
    """
    fn = "sgd_momentum_"
    for name, seq in (("params", params), ("grads", grads), ("momentum_buffers", momentum_buffers)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{fn}: {name} must be a list of tensors; got {type(seq).__name__}")
        for i, t in enumerate(seq):
            _checks.tensor(fn, f"{name}[{i}]", t)
    for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        _checks.non_negative(fn, name, v)
    if isinstance(dampening, bool) or not isinstance(dampening, (int, float)):
        raise TypeError(f"{fn}: dampening must be a float; got {type(dampening).__name__}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{fn}: nesterov requires momentum > 0 and dampening == 0; got momentum={momentum}, dampening={dampening}")
    if len(grads) != len(params):
        raise ValueError(f"{fn}: got {len(params)} params but {len(grads)} grads")
    if momentum != 0 and len(momentum_buffers) != len(params):
        raise ValueError(f"{fn}: momentum={momentum} needs one buffer per param; got {len(params)} params and {len(momentum_buffers)} buffers")
    if not params:
        return
    p0 = params[0]
    _checks.floating(fn, "params[0]", p0)
    others = [("grads", grads)] + ([("momentum_buffers", momentum_buffers)] if momentum != 0 else [])
    for i, p in enumerate(params):
        if p.device != p0.device or p.dtype != p0.dtype:
            raise ValueError(f"{fn}: params[{i}] is {p.dtype} on {p.device}; expected {p0.dtype} on {p0.device} like params[0]")
        for name, seq in others:
            t = seq[i]
            if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                raise ValueError(
                    f"{fn}: {name}[{i}] is {t.dtype} {tuple(t.shape)} on {t.device}; "
                    f"expected {p.dtype} {tuple(p.shape)} on {p.device} like params[{i}]"
                )
    name = backends.resolve(FAMILY, p0.device.type, p0.dtype, backend)
    bufs = list(momentum_buffers) if momentum != 0 else []
    torch.ops.bitfast.sgd_momentum_(
        list(params), list(grads), bufs, float(lr), float(momentum), float(dampening),
        float(weight_decay), bool(nesterov), bool(maximize), bool(is_first_step), name,
    )
