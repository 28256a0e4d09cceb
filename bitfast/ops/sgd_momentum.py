"""A multi-tensor SGD-with-momentum step with exactly ``torch.optim.SGD``'s semantics, with
the learning rate as a number or a device tensor, and an optional exponential moving average
(Polyak average) of the parameters updated in the same pass."""

from __future__ import annotations

import torch

from bitfast import backends
from bitfast.ops import _register, checks, reference

__all__ = ["sgd_momentum_"]

FAMILY = "sgd_momentum"

SCHEMAS = {
    "sgd_momentum_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr,"
        " float momentum, float dampening, float weight_decay, bool nesterov, bool maximize,"
        " bool is_first_step, Tensor? lr_tensor, Tensor(c!)[] ema_params, float ema_decay) -> ()"
    ),
}


def _fake(
    params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, is_first_step,
    lr_tensor, ema_params, ema_decay,
):
    return None


OP = _register.define_op(FAMILY, SCHEMAS, fakes={"sgd_momentum_": _fake},
                         references={"sgd_momentum_": reference.sgd_momentum_}, triton_module="sgd_momentum")


# Half-precision params may keep their average in float32: with a decay near 1, the
# increments (1 - decay) * (p - ema) are below half precision's resolution.
_EMA_FLOAT32_OK = (torch.float16, torch.bfloat16)


def sgd_momentum_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    is_first_step: bool = False,
    ema_params: list[torch.Tensor] | None = None,
    ema_decay: float = 0.0,
    backend: str | None = None,
) -> None:
    """One in-place ``torch.optim.SGD`` step over lists of tensors, optionally followed, in
    the same pass, by an exponential moving average of the parameters.

    Per parameter: ``d = -g if maximize else g``; ``d += weight_decay * p``; with momentum,
    ``buf = d`` when ``is_first_step`` (the buffer is initialised with the gradient, as
    torch.optim.SGD does on the first step) else ``buf = momentum * buf + (1 - dampening) * d``,
    then ``d = d + momentum * buf`` if ``nesterov`` else ``d = buf``; finally ``p -= lr * d``.
    With ``ema_params``: ``ema = ema_decay * ema + (1 - ema_decay) * p`` with the updated
    ``p`` (read once: the average costs one more read and write of ``ema``, not of ``p``).

    Args:
        params: parameters, updated in place. All on one device with one dtype.
        grads: their gradients (same shapes, dtype and device).
        momentum_buffers: momentum buffers, updated in place (contents ignored when
            ``is_first_step``); may be empty when ``momentum == 0``.
        lr: the learning rate, >= 0: a number, or a one-element float32 tensor on the params'
            device. A tensor is read by the kernel itself, never by the host: a step with a
            tensor ``lr`` does not synchronize with the GPU, can be captured in a CUDA graph,
            and follows a schedule that writes into the tensor (``lr_t.fill_(v)``) without
            recompiling. Its value is not checked (that would need a synchronization).
        momentum, dampening, weight_decay, nesterov, maximize: as in torch.optim.SGD.
        is_first_step: the buffers have not been initialised yet.
        ema_params: None (default) or one tensor per param, updated in place: the param's
            shape, on its device, in its dtype, or float32 when the params are float16 or
            bfloat16 (recommended: with a decay near 1, the increments of a half-precision
            average round away). Any layout.
        ema_decay: the average's decay, ``0 <= ema_decay < 1`` (0 copies the new params).
        backend: force a backend (see ``bitfast.backends``); default: auto.

    Raises:
        TypeError, ValueError: bad arguments, each message naming the argument, what it got
            and what it expected.
    """
    fn = "sgd_momentum_"
    if ema_params is None:
        ema_params = []
    for name, seq in (
        ("params", params), ("grads", grads), ("momentum_buffers", momentum_buffers), ("ema_params", ema_params),
    ):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{fn}: {name} must be a list of tensors; got {type(seq).__name__}")
        for i, t in enumerate(seq):
            checks.tensor(fn, f"{name}[{i}]", t)
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    if lr_tensor is None:
        checks.non_negative(fn, "lr", lr)
    for name, v in (("momentum", momentum), ("weight_decay", weight_decay)):
        checks.non_negative(fn, name, v)
    if isinstance(dampening, bool) or not isinstance(dampening, (int, float)):
        raise TypeError(f"{fn}: dampening must be a float; got {type(dampening).__name__}")
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)):
        raise TypeError(f"{fn}: ema_decay must be a float; got {type(ema_decay).__name__}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"{fn}: ema_decay must be in [0, 1); got {ema_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{fn}: nesterov requires momentum > 0 and dampening == 0; got momentum={momentum}, dampening={dampening}")
    if len(grads) != len(params):
        raise ValueError(f"{fn}: got {len(params)} params but {len(grads)} grads")
    if momentum != 0 and len(momentum_buffers) != len(params):
        raise ValueError(f"{fn}: momentum={momentum} needs one buffer per param; got {len(params)} params and {len(momentum_buffers)} buffers")
    if ema_params and len(ema_params) != len(params):
        raise ValueError(f"{fn}: got {len(params)} params but {len(ema_params)} ema_params; expected one per param (or none)")
    if not params:
        return
    p0 = params[0]
    checks.floating(fn, "params[0]", p0)
    if lr_tensor is not None:
        if lr_tensor.numel() != 1 or lr_tensor.dtype != torch.float32 or lr_tensor.device != p0.device:
            raise ValueError(
                f"{fn}: lr is a {lr_tensor.dtype} tensor of shape {tuple(lr_tensor.shape)} on {lr_tensor.device}; "
                f"expected a number or a one-element torch.float32 tensor on {p0.device} (the params' device)"
            )
        lr_tensor = lr_tensor.detach()
    others = [("grads", grads)] + ([("momentum_buffers", momentum_buffers)] if momentum != 0 else [])
    ema_dtype = ema_params[0].dtype if ema_params else None
    if ema_dtype is not None and ema_dtype != p0.dtype and not (ema_dtype == torch.float32 and p0.dtype in _EMA_FLOAT32_OK):
        want = f"{p0.dtype} or torch.float32" if p0.dtype in _EMA_FLOAT32_OK else str(p0.dtype)
        raise ValueError(f"{fn}: ema_params[0] is {ema_dtype}; expected {want} for {p0.dtype} params")
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
        if ema_params:
            e = ema_params[i]
            if e.shape != p.shape or e.dtype != ema_dtype or e.device != p.device:
                raise ValueError(
                    f"{fn}: ema_params[{i}] is {e.dtype} {tuple(e.shape)} on {e.device}; "
                    f"expected {ema_dtype} {tuple(p.shape)} on {p.device} like params[{i}] (and ema_params[0])"
                )
            if not torch.compiler.is_compiling() and e.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
                raise ValueError(f"{fn}: ema_params[{i}] shares memory with params[{i}]; the average needs its own storage")
    name = backends.resolve(FAMILY, p0.device.type, p0.dtype, backend)
    bufs = list(momentum_buffers) if momentum != 0 else []
    OP.run(
        "sgd_momentum_", name, list(params), list(grads), bufs, float(lr) if lr_tensor is None else 0.0,
        float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(maximize), bool(is_first_step),
        lr_tensor, list(ema_params), float(ema_decay),
    )
