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

Two additions, both optional:

* a tensor learning rate (``lr=torch.tensor(0.1, device="cuda")``, which torch.optim.SGD
  accepts too) is handed to the kernel as a tensor, read on the device: no host
  synchronization per step, a step capturable in a CUDA graph, and an LR scheduler that
  writes into the tensor (as torch's schedulers do for tensor ``lr``) drives it;
* ``ema_decay``: an exponential moving average (Polyak average) of every parameter, updated
  in the same fused pass as the step (``state[p]["ema"]``), with ``swap_ema()`` to evaluate
  with the averaged weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from bitfast import backends
from bitfast.ops.sgd_momentum import sgd_momentum_
from bitfast.optim.ema import check_decay, ema_dtype

__all__ = ["FusedSGD"]

# torch.optim.SGD's constructor options, all of which FusedSGD's constructor takes too.
_OPTIONS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "differentiable", "fused")


def _scalar(name: str, value):
    """A hyper-parameter as a Python number: ``torch.optim.SGD`` also takes a one-element
    tensor ``weight_decay`` (and ``lr``, which the step passes through as a tensor instead,
    see ``_lr_on``); the fused op takes the others as plain floats. Reading a CUDA tensor
    synchronizes, so prefer Python floats for them on the GPU."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"FusedSGD: {name} must be a number or a 1-element tensor; got shape {tuple(value.shape)}")
        return value.item()
    return value


def _lr_on(lr: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor ``lr`` as the op takes it: one float32 element on ``device`` (the tensor
    itself when it already is one, so in-place schedule updates reach the kernel)."""
    if lr.numel() != 1:
        raise ValueError(f"FusedSGD: lr must be a number or a 1-element tensor; got shape {tuple(lr.shape)}")
    lr = lr.detach()
    if lr.device != device or lr.dtype != torch.float32:
        lr = lr.to(device=device, dtype=torch.float32)
    return lr


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
        ema_decay: None (default): no average. A float in ``[0, 1)``: keep an exponential
            moving average of every parameter, ``ema = ema_decay * ema + (1 - ema_decay) * p``
            after each step of ``p``, computed in the same fused pass. The average of a
            parameter starts as a copy of its value just before its first step, is stored in
            ``state[p]["ema"]`` (float32 for float16/bfloat16 parameters, else the
            parameter's dtype; its memory format), and is updated only on steps where the
            parameter has a gradient. Read it with ``ema_parameters()``; evaluate with it
            inside ``with opt.swap_ema(): ...``. Not part of the state dict (pass it again
            when rebuilding the optimizer). Model buffers (BatchNorm running statistics)
            are not parameters: average them with ``bitfast.optim.ModelEMA`` if needed.

    Tensor learning rate: ``lr`` (or a group's ``"lr"``) may be a one-element tensor. It is
    passed to the kernel as a float32 tensor on the parameters' device and read there, so the
    step does not synchronize with the GPU and can be captured in a CUDA graph; schedulers
    that write into the tensor (torch's do, for tensor ``lr``) take effect without any
    recompilation. Keep it a float32 tensor on the parameters' device: any other tensor is
    converted at each step (a copy, which a captured graph would not see change). With a
    float ``lr`` the step is exactly what it was.

    State dict: without ``ema_decay`` it is exactly ``torch.optim.SGD``'s. With it, each
    stepped parameter's state has one more key, ``"ema"``, compared to torch.optim.SGD's
    (which loads such a state dict and ignores the key); ``load_state_dict`` restores the
    averages in their own dtype (float32 for half-precision parameters).

    Bad hyper-parameters raise ``ValueError`` with ``torch.optim.SGD``'s messages, and are also
    checked for every group passed in or added later. Sparse gradients are not supported
    (``RuntimeError``). Complex parameters are stepped as their real views.

    Example:
        >>> opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()
        >>> opt.zero_grad()

        With a moving average of the weights:

        >>> opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, ema_decay=0.999)
        >>> ...  # train
        >>> with opt.swap_ema():
        ...     evaluate(model)  # averaged weights; the trained ones are back afterwards
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
        ema_decay: float | None = None,
    ) -> None:
        _check_hyper(lr, momentum, dampening, weight_decay, nesterov, differentiable)
        if backend is not None:
            backends.requested_backend(backend)  # validates the name
        if ema_decay is not None:
            ema_decay = check_decay("FusedSGD", "ema_decay", ema_decay)
        self._backend = backend
        self._ema_decay = ema_decay
        self._ema_swapped = False
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

    @property
    def ema_decay(self) -> float | None:
        """The decay of the parameters' moving average, or None when none is kept."""
        return self._ema_decay

    def __getstate__(self) -> dict[str, Any]:
        """Pickle/deepcopy state: the base optimizer's plus the forced backend and the
        moving average's decay."""
        state = super().__getstate__()
        state["_backend"] = self._backend
        state["_ema_decay"] = self._ema_decay
        state["_ema_swapped"] = self._ema_swapped
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore from ``__getstate__`` (filling group options older state dicts lack,
        as ``torch.optim.SGD`` does). ``load_state_dict`` also ends here, with only the state
        and the groups: the forced backend and the average's decay are kept then."""
        for name, default in (("_backend", None), ("_ema_decay", None), ("_ema_swapped", False)):
            state.setdefault(name, getattr(self, name, default))
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
        if self._ema_swapped:
            raise RuntimeError(
                "FusedSGD: step() inside swap_ema(): the parameters hold the averaged weights; "
                "leave the swap_ema() block before stepping"
            )
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
        use_ema = self._ema_decay is not None
        # (device, dtype, is_first_step) -> (params, grads, momentum buffers, new buffers,
        # averages, new averages); dicts keep the parameters' order inside each bucket and the
        # buckets' order of first use.
        buckets: dict[tuple, tuple[list, list, list, list, list, list]] = {}
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
            ema = None
            if use_ema:
                ema = self.state[p].get("ema")
                if ema is None:
                    # the value just before the first step; the op averages in the stepped one
                    ema = torch.empty_like(p, dtype=ema_dtype(p.dtype), memory_format=torch.preserve_format)
                    ema.copy_(p)
                    new_ema = True
                else:
                    new_ema = False
            key = (p.device, torch.view_as_real(p).dtype if p.is_complex() else p.dtype, first)
            bucket = buckets.setdefault(key, ([], [], [], [], [], []))
            if first:
                bucket[3].append((p, buf))
            if ema is not None and new_ema:
                bucket[5].append((p, ema))
            if p.is_complex():
                # The update is linear with real coefficients, so stepping the (re, im)
                # pairs as reals is the same update.
                p, g = torch.view_as_real(p), torch.view_as_real(g)
                buf = torch.view_as_real(buf) if buf is not None else None
                ema = torch.view_as_real(ema) if ema is not None else None
            bucket[0].append(p)
            bucket[1].append(g)
            if buf is not None:
                bucket[2].append(buf)
            if ema is not None:
                bucket[4].append(ema)
        if not buckets:
            return
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor):
            lr = _scalar("lr", lr)
        dampening = _scalar("dampening", group["dampening"])
        weight_decay = _scalar("weight_decay", group["weight_decay"])
        for (device, _, first), (params, grads, bufs, new_bufs, emas, new_emas) in buckets.items():
            sgd_momentum_(
                params,
                grads,
                bufs,
                lr=_lr_on(lr, device) if isinstance(lr, torch.Tensor) else lr,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=bool(group["nesterov"]),
                maximize=bool(group["maximize"]),
                is_first_step=first,
                ema_params=emas if use_ema else None,
                ema_decay=self._ema_decay if use_ema else 0.0,
                backend=self._backend,
            )
            # Only now do the new buffers hold a first step's value: a step that raised
            # leaves these parameters without a buffer, as torch.optim.SGD would.
            for p, buf in new_bufs:
                self.state[p]["momentum_buffer"] = buf
            for p, ema in new_emas:
                self.state[p]["ema"] = ema

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _require_ema(self, what: str) -> None:
        if self._ema_decay is None:
            raise RuntimeError(f"FusedSGD.{what}: this optimizer keeps no moving average; construct it with ema_decay=...")

    def ema_parameters(self) -> list[torch.Tensor]:
        """The moving average of every parameter, in the order of the parameter groups.

        Each entry is ``state[p]["ema"]`` (the live tensor, float32 for half-precision
        parameters), or, for a parameter never stepped yet, the parameter itself (detached):
        its average is its value. Raises ``RuntimeError`` when the optimizer was built
        without ``ema_decay``.
        """
        self._require_ema("ema_parameters")
        return [self.state[p]["ema"] if "ema" in self.state.get(p, {}) else p.detach() for p in self._params()]

    @contextlib.contextmanager
    def swap_ema(self) -> Iterator[None]:
        """Within the block, the parameters hold their moving averages (cast to their dtype);
        on exit, even by an exception, they get their trained values back.

        The trained values wait in a copy (one extra copy of the parameters, on their
        device). ``step()`` inside the block raises ``RuntimeError``. Raises ``RuntimeError``
        when the optimizer was built without ``ema_decay``.

        Example:
            >>> with opt.swap_ema():
            ...     val_loss = evaluate(model)
        """
        self._require_ema("swap_ema")
        if self._ema_swapped:
            raise RuntimeError("FusedSGD.swap_ema: already inside swap_ema()")
        saved = []
        with torch.no_grad():
            for p in self._params():
                ema = self.state.get(p, {}).get("ema")
                if ema is not None:
                    saved.append((p, p.detach().clone(memory_format=torch.preserve_format)))
                    p.copy_(ema)
        self._ema_swapped = True
        try:
            yield
        finally:
            self._ema_swapped = False
            with torch.no_grad():
                for p, trained in saved:
                    p.copy_(trained)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of ``FusedSGD`` or ``torch.optim.SGD`` (as
        ``torch.optim.Optimizer.load_state_dict``). The moving averages (``"ema"``) keep
        their own dtype, float32 for half-precision parameters, where the base class would
        cast every state tensor to its parameter's dtype."""
        emas = {k: s["ema"] for k, s in state_dict.get("state", {}).items() if isinstance(s, dict) and "ema" in s}
        super().load_state_dict(state_dict)
        if not emas:
            return
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        by_id = dict(zip(saved_ids, self._params()))
        for k, ema in emas.items():
            p = by_id.get(k)
            if p is not None and isinstance(ema, torch.Tensor):
                self.state[p]["ema"] = ema.to(device=p.device, dtype=ema_dtype(p.dtype))

    @classmethod
    def from_optimizer(
        cls, opt: torch.optim.SGD, *, backend: str | None = None, ema_decay: float | None = None
    ) -> FusedSGD:
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
            ema_decay: keep a moving average of the parameters (see the class docs); default:
                that of ``opt`` when it is a ``FusedSGD``, else none. Averages already in
                ``opt``'s state are copied along with the rest.
        """
        if not isinstance(opt, (torch.optim.SGD, FusedSGD)):
            raise TypeError(f"FusedSGD.from_optimizer: expected a torch.optim.SGD; got {type(opt).__name__}")
        if backend is None and isinstance(opt, FusedSGD):
            backend = opt.backend
        if ema_decay is None and isinstance(opt, FusedSGD):
            ema_decay = opt.ema_decay
        defaults = {k: v for k, v in opt.defaults.items() if k in _OPTIONS}
        groups = [{**g, "params": list(g["params"])} for g in opt.param_groups]
        new = cls(groups, backend=backend, ema_decay=ema_decay, **defaults)
        for p, s in opt.state.items():
            new.state[p] = {
                k: v.clone(memory_format=torch.preserve_format) if isinstance(v, torch.Tensor) else v
                for k, v in s.items()
            }
        return new
