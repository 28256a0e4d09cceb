"""``FusedSGD``: a drop-in replacement for ``torch.optim.SGD`` built on one multi-tensor op.

The update is ``torch.optim.SGD``'s, term for term (see ``bitfast.ops.reference.sgd_momentum_``):
``d = ±g + weight_decay * p``; with momentum the buffer starts as ``d`` on a parameter's first
step and is ``momentum * buf + (1 - dampening) * d`` afterwards; ``d`` becomes the buffer (or
``d + momentum * buf`` with Nesterov); ``p -= lr * d``. Instead of one chain of tensor ops per
parameter, each step hands every parameter of a group that shares a device and dtype to a
single ``bitfast.ops.sgd_momentum_`` call, which the chosen backend computes in one fused pass.

The parameter groups, hyper-parameter names and ``state_dict`` layout are exactly
``torch.optim.SGD``'s (``state[p]["momentum_buffer"]`` for parameters stepped with momentum),
so checkpoints load in either direction and LR schedulers work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bitfast import backends
from bitfast.ops.sgd_momentum import sgd_momentum_

__all__ = ["FusedSGD"]

# torch.optim.SGD's constructor options, all of which FusedSGD's constructor takes too.
_OPTIONS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "differentiable", "fused")


def _scalar(name: str, value):
    """A hyper-parameter as a Python number: ``torch.optim.SGD`` also takes a one-element
    tensor ``lr`` (and ``weight_decay``); the fused op takes plain floats. Reading a CUDA
    tensor synchronizes, so prefer Python floats on the GPU."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"FusedSGD: {name} must be a number or a 1-element tensor; got shape {tuple(value.shape)}")
        return value.item()
    return value


def _check_hyper(lr, momentum, dampening, weight_decay, nesterov, differentiable) -> None:
    # The first words of each message are torch.optim.SGD's, so code that matches on them
    # keeps working after the switch; the rest says what would be accepted.
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element; got a tensor of shape {tuple(lr.shape)}")
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr} (FusedSGD: lr must be >= 0)")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum} (FusedSGD: momentum must be >= 0)")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (FusedSGD: weight_decay must be >= 0)")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            "Nesterov momentum requires a momentum and zero dampening "
            f"(FusedSGD: nesterov=True needs momentum > 0 and dampening == 0; got momentum={momentum}, "
            f"dampening={dampening})"
        )
    if differentiable:
        raise ValueError(
            "FusedSGD: differentiable=True is not supported: the fused step updates parameters in place "
            "outside autograd; use torch.optim.SGD(..., differentiable=True) to differentiate through the step"
        )


class FusedSGD(torch.optim.Optimizer):
    """Stochastic gradient descent (optionally with momentum), fused across parameters.

    A drop-in replacement for ``torch.optim.SGD``: the same constructor, parameter groups,
    per-group options (change ``group["lr"]`` between steps, or let an LR scheduler do it),
    the same update and the same ``state_dict`` format, so ``torch.optim.SGD`` and
    ``FusedSGD`` load each other's state dicts and continue identically.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of dicts defining
            parameter groups (as for any ``torch.optim.Optimizer``).
        lr: learning rate, >= 0 (a float or a one-element tensor; default 1e-3).
        momentum: momentum factor, >= 0 (default 0).
        dampening: dampening for momentum (default 0).
        weight_decay: L2 penalty added to the gradient, >= 0 (default 0).
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.
        maximize: maximize the objective instead of minimizing it.
        foreach: accepted for compatibility with ``torch.optim.SGD`` and kept in the param
            groups (so state dicts round-trip), but ignored: every step is fused.
        differentiable: must be False; a fused in-place step cannot be differentiated
            (``ValueError`` otherwise).
        fused: accepted and ignored, like ``foreach``.
        backend: force the ``bitfast.ops`` backend of the step (``"reference"``, ``"cpp"``,
            ``"cuda"``, ``"triton"``); default None chooses automatically per device and dtype
            (see ``bitfast.backends``). Not part of the state dict.

    Bad hyper-parameters raise ``ValueError`` with ``torch.optim.SGD``'s messages, and are also
    checked for every group passed in or added later. Sparse gradients are not supported
    (``RuntimeError``). Complex parameters are stepped as their real views.

    Example:
        >>> opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()
        >>> opt.zero_grad()
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
    ) -> None:
        _check_hyper(lr, momentum, dampening, weight_decay, nesterov, differentiable)
        if backend is not None:
            backends.requested_backend(backend)  # validates the name
        self._backend = backend
        # The same keys, in the same order, as torch.optim.SGD's defaults: they end up in
        # every param group and so in the state dict.
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults)

    @property
    def backend(self) -> str | None:
        """The forced ``bitfast.ops`` backend, or None for automatic choice."""
        return self._backend

    def __getstate__(self) -> dict[str, Any]:
        """Pickle/deepcopy state: the base optimizer's plus the forced backend."""
        state = super().__getstate__()
        state["_backend"] = self._backend
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore from ``__getstate__`` (filling group options older state dicts lack,
        as ``torch.optim.SGD`` does)."""
        state.setdefault("_backend", None)
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, with options defaulting to the constructor's.

        Unlike ``torch.optim.SGD``, the group's own options are validated here too, with
        the constructor's errors, rather than failing later inside ``step``.
        """
        if isinstance(param_group, dict):
            # Checked before the base class appends the group, so a rejected group is not kept.
            opts = {**self.defaults, **param_group}
            _check_hyper(
                *(opts[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "differentiable"))
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step over every parameter that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it
                runs with gradients enabled, before the update.

        Returns:
            The closure's return value, or None without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        if group["differentiable"]:
            raise ValueError(
                "FusedSGD: a param group has differentiable=True (loaded from a state dict?); FusedSGD cannot "
                "differentiate through its in-place step: set group['differentiable'] = False or use torch.optim.SGD"
            )
        momentum = _scalar("momentum", group["momentum"])
        use_momentum = momentum != 0
        # (device, dtype, is_first_step) -> (params, grads, momentum buffers, new buffers);
        # dicts keep the parameters' order inside each bucket and the buckets' order of first use.
        buckets: dict[tuple, tuple[list, list, list, list]] = {}
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(
                    f"FusedSGD: a parameter of shape {tuple(p.shape)} has a sparse gradient; FusedSGD "
                    "steps dense gradients only (use torch.optim.SGD for sparse gradients, or make the "
                    "layer produce dense ones, e.g. nn.Embedding(sparse=False))"
                )
            buf = None
            first = False
            if use_momentum:
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    # torch.optim.SGD sets the buffer to the first step's direction; the op
                    # fills it (is_first_step=True), so only the memory is needed here.
                    buf = torch.empty_like(p, memory_format=torch.preserve_format)
                    first = True
            key = (p.device, torch.view_as_real(p).dtype if p.is_complex() else p.dtype, first)
            bucket = buckets.setdefault(key, ([], [], [], []))
            if first:
                bucket[3].append((p, buf))
            if p.is_complex():
                # The update is linear with real coefficients, so stepping the (re, im)
                # pairs as reals is the same update.
                p, g = torch.view_as_real(p), torch.view_as_real(g)
                buf = torch.view_as_real(buf) if buf is not None else None
            bucket[0].append(p)
            bucket[1].append(g)
            if buf is not None:
                bucket[2].append(buf)
        if not buckets:
            return
        lr = _scalar("lr", group["lr"])
        dampening = _scalar("dampening", group["dampening"])
        weight_decay = _scalar("weight_decay", group["weight_decay"])
        for (_, _, first), (params, grads, bufs, new_bufs) in buckets.items():
            sgd_momentum_(
                params,
                grads,
                bufs,
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=bool(group["nesterov"]),
                maximize=bool(group["maximize"]),
                is_first_step=first,
                backend=self._backend,
            )
            # Only now do the new buffers hold a first step's value: a step that raised
            # leaves these parameters without a buffer, as torch.optim.SGD would.
            for p, buf in new_bufs:
                self.state[p]["momentum_buffer"] = buf

    @classmethod
    def from_optimizer(cls, opt: torch.optim.SGD, *, backend: str | None = None) -> FusedSGD:
        """A ``FusedSGD`` equivalent to the ``torch.optim.SGD`` ``opt``.

        It optimizes the same parameter tensors, in the same groups with the same options
        (extra keys such as a scheduler's ``initial_lr`` included), and starts from a copy of
        ``opt``'s momentum buffers: stepping it continues exactly where ``opt`` would, and
        the two optimizers do not share state afterwards. LR schedulers attached to ``opt``
        keep driving ``opt``; attach new ones (or load their state dicts) to the result.

        Args:
            opt: a ``torch.optim.SGD`` (or another ``FusedSGD``, whose forced backend is kept
                unless ``backend`` is given).
            backend: force the result's ops backend (see the class docs).
        """
        if not isinstance(opt, (torch.optim.SGD, FusedSGD)):
            raise TypeError(f"FusedSGD.from_optimizer: expected a torch.optim.SGD; got {type(opt).__name__}")
        if backend is None and isinstance(opt, FusedSGD):
            backend = opt.backend
        defaults = {k: v for k, v in opt.defaults.items() if k in _OPTIONS}
        groups = [{**g, "params": list(g["params"])} for g in opt.param_groups]
        new = cls(groups, backend=backend, **defaults)
        for p, s in opt.state.items():
            new.state[p] = {
                k: v.clone(memory_format=torch.preserve_format) if isinstance(v, torch.Tensor) else v
                for k, v in s.items()
            }
        return new
