"""A whole training step (forward, backward, the finite-step check and the ``FusedSGD``
update) captured in a CUDA graph and replayed: ``--cuda-graphs`` of the training commands,
and :class:`CUDAGraphStep` for code of one's own.

How a step runs (:meth:`CUDAGraphStep.__call__`):

1. ``task.prepare`` (MixUp, with its host-side draws) runs eagerly, outside the graph;
2. the first ``warmup_steps`` steps (3 by default) run eagerly on a side stream: they are
   real training steps, which also create the momentum buffers and averages the captured
   update then reads and writes in place, and warm cuDNN and cuBLAS up;
3. the next step copies its batch into static input buffers and captures the step body
   (``step.forward_backward`` without ``prepare``, ``guards.step_overflow_ratio``,
   ``FusedSGD.step``) in a ``torch.cuda.CUDAGraph``, then replays it;
4. every later step copies its batch into the static buffers and replays the graph. A batch
   whose shape, dtype or memory format differs from the captured one runs the same body
   eagerly (same kernels) instead; the training loop never makes one (its batches are always
   full, see ``bitfast.data.StepSampler``).

The learning rate lives in a one-element float32 device tensor (:attr:`CUDAGraphStep.lr`)
that the graph reads; :meth:`CUDAGraphStep.set_lr` writes the schedule's value into it before
each step (an asynchronous fill, no host synchronisation). Optimizer state dicts keep a plain
float ``lr`` (checkpoints are those of an eager run), and loading one writes its value into
the tensor.

Each step leaves a *packet* on the device: ``[loss summed over the batch, the update's
overflow bound, the task's parts...]`` (float64). The loop keeps the packets of the steps
since the last read back in a device buffer (:class:`PendingSteps`) and reads them all in one
transfer every ``--log-every`` steps, and before every evaluation, checkpoint, stop and the
last step. The NaN/Inf stop is decided there, with the eager loop's verdict
(``step.step_problem``), but the steps after the last read back have already been applied: the
loop therefore keeps a device copy of the state at the last read back that found every step
good (:class:`LastGoodState`: parameters, buffers, momentum, averages, the task's generators),
rolls back to it, saves it as the last good state and stops. Under CUDA graphs the saved state
is thus the one after the last good read back, up to ``--log-every - 1`` steps before the
first bad step (``--log-every 1`` gives the eager loop's, at a host synchronisation per step).

What cannot be captured is refused (:func:`check_supported`, :func:`conflicts`): a device
other than CUDA, DDP, fp16 (the GradScaler decides on the host whether to skip a step) and
``--compile`` (``torch.compile``'s ``reduce-overhead`` mode is its own CUDA graphs).
"""

from __future__ import annotations

import torch

from bitfast.train import guards
from bitfast.train.step import StepCheck, TrainState, forward_backward, step_problem

__all__ = ["CUDAGraphStep", "LastGoodState", "PendingSteps", "check_supported", "conflicts"]


def conflicts(*, device: torch.device | str | None, precision: str = "fp32", compile: bool = False,
              distributed: bool = False) -> list[str]:
    """What keeps a run with these options from capturing its steps in CUDA graphs, one
    sentence each naming the option (empty when nothing does). ``device`` None: the default
    device, CUDA when torch sees a GPU."""
    found = []
    if device is None:
        if not torch.cuda.is_available():
            found.append("--cuda-graphs needs a CUDA GPU and torch sees none (drop --cuda-graphs)")
    elif torch.device(device).type != "cuda":
        found.append(f"--cuda-graphs needs --device cuda; got --device {device}")
    if precision == "fp16":
        found.append("--cuda-graphs does not take --precision fp16: its GradScaler decides on the host whether to "
                     "skip each step (use --precision bf16 or fp32)")
    if compile:
        found.append("--cuda-graphs and --compile exclude each other (torch.compile's own CUDA graphs are its "
                     "reduce-overhead mode); drop one of them")
    if distributed:
        found.append("--cuda-graphs does not support DDP (several processes) yet; run one process, or drop "
                     "--cuda-graphs")
    return found


def check_supported(cfg, info) -> None:
    """Raise ``ValueError`` naming every option of ``cfg`` (a ``TrainConfig``) and ``info``
    (the run's processes and device) that CUDA graphs cannot capture."""
    found = conflicts(device=info.device, precision=cfg.precision, compile=cfg.compile, distributed=info.enabled)
    if found:
        raise ValueError("; ".join(found))


def _signature(t: torch.Tensor) -> tuple:
    fmt = torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous() else torch.contiguous_format
    return tuple(t.shape), t.dtype, t.device, fmt


class CUDAGraphStep:
    """One training step of ``state`` (a ``bitfast.train.step.TrainState``) captured in a CUDA
    graph: forward and backward of the task's loss over the micro-batches, the bound of the
    coming update (``guards.step_overflow_ratio``) and the ``FusedSGD`` update. See the module
    docs for how a call runs.

    Args:
        state: the run; its optimizer must be a ``bitfast.optim.FusedSGD`` (a tensor lr,
            capturable) and its GradScaler disabled; ``state.net`` the model to call (no DDP).
        warmup_steps: steps run eagerly, on a side stream, before the capture (>= 1: the
            first step creates the momentum buffers).
        capture: capture and replay a CUDA graph (default: when the model is on a CUDA
            device). ``False`` runs every step's body eagerly, with the same buffers and
            packets: the reference the graph must equal bit for bit, and how the loop's
            bookkeeping is tested without a GPU.

    Calling it with a batch ``(x, y)`` runs one step, adds 1 to ``state.step`` and returns the
    step's packet (float64 device tensor ``[loss sum, overflow bound, *parts]``, see
    :attr:`part_names`). The packet of a replay is the graph's static output: copy it (as
    :class:`PendingSteps` does) before the next call.

    Example:
        >>> state = TrainState(base=model, net=model, opt=FusedSGD(model.parameters(), lr=0.0, momentum=0.9),
        ...                    scaler=torch.amp.GradScaler("cuda", enabled=False), task=Classification(10),
        ...                    info=DistInfo(device=torch.device("cuda")), local_batch=128)
        >>> step = CUDAGraphStep(state)
        >>> for i, (x, y) in enumerate(batches):
        ...     step.set_lr(lr_at(i))
        ...     packet = step(x.cuda(non_blocking=True), y.cuda(non_blocking=True))
    """

    def __init__(self, state: TrainState, *, warmup_steps: int = 3, capture: bool | None = None) -> None:
        from bitfast.optim import FusedSGD

        if not isinstance(state.opt, FusedSGD):
            raise TypeError(f"CUDAGraphStep: the optimizer must be a bitfast.optim.FusedSGD (a step read from a tensor "
                            f"lr, capturable); got {type(state.opt).__name__}")
        if state.scaler.is_enabled():
            raise ValueError("CUDAGraphStep: the GradScaler (fp16) decides on the host whether to skip each step; "
                             "train in bf16 or fp32 under CUDA graphs")
        if state.info.enabled:
            raise ValueError("CUDAGraphStep: DDP (several processes) is not supported; run one process")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"CUDAGraphStep: warmup_steps must be an integer >= 1 (the first step creates the "
                             f"momentum buffers the graph updates); got {warmup_steps!r}")
        params = [p for g in state.opt.param_groups for p in g["params"]]
        if not params:
            raise ValueError("CUDAGraphStep: the optimizer has no parameters")
        device = params[0].device
        if capture is None:
            capture = device.type == "cuda"
        if capture and device.type != "cuda":
            raise ValueError(f"CUDAGraphStep: CUDA graphs need the model on a CUDA device; its parameters are on "
                             f"{device} (pass capture=False to run the same steps eagerly)")
        self.state = state
        self.capture = bool(capture)
        self.warmup_steps = warmup_steps
        self.device = device
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.part_names: list[str] | None = None
        self.eager_steps = 0  # steps run without the graph (warm-up, other shapes)
        self.replays = 0
        self._calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple | None = None
        self._signature: tuple | None = None
        self._out: torch.Tensor | None = None
        self._side = torch.cuda.Stream(device) if self.capture else None
        rates = {float(g["lr"]) for g in state.opt.param_groups}
        if len(rates) != 1:
            raise ValueError(f"CUDAGraphStep: every parameter group must have the same learning rate (one lr tensor "
                             f"drives them all); got {sorted(rates)}")
        self.lr.fill_(rates.pop())
        self._install_lr()
        state.opt.register_state_dict_post_hook(self._plain_lr)
        state.opt.register_load_state_dict_post_hook(self._reinstall_lr)

    # -- the learning rate -------------------------------------------------------------------

    def _install_lr(self) -> None:
        for group in self.state.opt.param_groups:
            group["lr"] = self.lr

    @staticmethod
    def _plain_lr(opt, state_dict: dict) -> dict:
        for group in state_dict["param_groups"]:
            if isinstance(group.get("lr"), torch.Tensor):
                group["lr"] = float(group["lr"])
        return state_dict

    def _reinstall_lr(self, opt) -> None:
        value = opt.param_groups[0]["lr"]
        if value is not self.lr:
            self.lr.fill_(float(value))
        self._install_lr()

    def set_lr(self, lr: float) -> None:
        """Write the next step's learning rate into :attr:`lr` (asynchronously, no sync)."""
        self.lr.fill_(lr)

    # -- the step ----------------------------------------------------------------------------

    @property
    def captured(self) -> bool:
        """Whether the graph has been captured."""
        return self._graph is not None

    def _body(self, x: torch.Tensor, y) -> torch.Tensor:
        state = self.state
        loss_total, parts = forward_backward(state, x, y, prepare=False)
        if self.part_names is None:
            self.part_names = list(parts)
        ratio, _ = guards.step_overflow_ratio(state.opt)
        packet = torch.stack([loss_total.double(), ratio.to(loss_total.device).double(),
                              *[parts[n].double() for n in self.part_names]])
        state.opt.step()
        return packet

    def __call__(self, x: torch.Tensor, y) -> torch.Tensor:
        """Run one step on the batch ``(x, y)`` (on the model's device) and return its packet."""
        x, y = self.state.task.prepare(x, y)
        self._calls += 1
        if not self.capture:
            packet = self._body(x, y)
            self.eager_steps += 1
        elif self._graph is None and self._calls <= self.warmup_steps:
            packet = self._warmup(x, y)
        elif self._graph is None:
            packet = self._capture(x, y)
        elif (_signature(x), _signature(y)) != self._signature:
            packet = self._body(x, y)
            self.eager_steps += 1
        else:
            sx, sy = self._static
            sx.copy_(x, non_blocking=True)
            sy.copy_(y, non_blocking=True)
            self._graph.replay()
            self.replays += 1
            packet = self._out
        self.state.step += 1
        return packet

    def _warmup(self, x: torch.Tensor, y) -> torch.Tensor:
        side, current = self._side, torch.cuda.current_stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            packet = self._body(x, y)
        current.wait_stream(side)
        packet.record_stream(current)
        self.eager_steps += 1
        return packet

    def _capture(self, x: torch.Tensor, y) -> torch.Tensor:
        sx = torch.empty_like(x, memory_format=torch.preserve_format)
        sy = torch.empty_like(y, memory_format=torch.preserve_format)
        sx.copy_(x)
        sy.copy_(y)
        self._static = (sx, sy)
        self._signature = (_signature(sx), _signature(sy))
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a data-loading thread's CUDA calls (pinning) may go on during the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._out = self._body(sx, sy)
        self._graph = graph
        graph.replay()
        self.replays += 1
        return self._out


class PendingSteps:
    """The packets of the steps run since the last read back, one row each in a device buffer,
    read back to the host in one transfer.

    Args:
        capacity: rows (steps) held; the loop reads back at the latest when it is full.
        device: where the packets are.
    """

    def __init__(self, capacity: int, device: torch.device) -> None:
        if capacity < 1:
            raise ValueError(f"PendingSteps: capacity must be >= 1; got {capacity}")
        self.capacity, self.device = capacity, device
        self._rows: torch.Tensor | None = None
        self._meta: list[tuple[int, float]] = []

    def __len__(self) -> int:
        return len(self._meta)

    @property
    def full(self) -> bool:
        """Whether another step's packet would not fit."""
        return len(self._meta) >= self.capacity

    def push(self, step: int, lr: float, packet: torch.Tensor) -> None:
        """Keep step ``step``'s (counted from 1) ``packet`` (copied on the device) and its lr."""
        if self.full:
            raise RuntimeError(f"PendingSteps: {self.capacity} steps are pending; read them back first")
        if self._rows is None or self._rows.shape[1] != packet.numel():
            if self._meta:
                raise RuntimeError("PendingSteps: a packet of another width while steps are pending")
            self._rows = torch.empty(self.capacity, packet.numel(), dtype=torch.float64, device=self.device)
        self._rows[len(self._meta)].copy_(packet.reshape(-1), non_blocking=True)
        self._meta.append((step, lr))

    def read(self, part_names: list[str], global_batch: int) -> list[tuple[int, float, StepCheck]]:
        """Read every pending packet back (one transfer) and empty the buffer: ``(step, lr,
        check)`` per step in order, each check with the eager loop's verdict
        (``step.step_problem``) and its loss and parts as means over ``global_batch``."""
        if not self._meta:
            return []
        values = self._rows[:len(self._meta)].tolist()
        out = []
        for (step, lr), (loss_sum, ratio, *parts) in zip(self._meta, values):
            check = StepCheck(loss=loss_sum / global_batch, ratio=ratio,
                              parts={n: v / global_batch for n, v in zip(part_names, parts)})
            check.problem = step_problem(step, check.loss, ratio)
            out.append((step, lr, check))
        self._meta = []
        return out


class LastGoodState:
    """A device copy of everything a training step changes, taken when a read back found every
    step good, to roll back to when a later one finds a bad step: the model's parameters and
    buffers (BatchNorm statistics), the optimizer's state tensors (momentum, averages), the
    task's generators, and the step count. Costs one more copy of those tensors' memory."""

    def __init__(self, state: TrainState) -> None:
        self.state = state
        self.step: int | None = None
        self._keys: list | None = None
        self._copies: list[torch.Tensor] = []
        self._generators: dict[str, torch.Tensor] = {}

    def _tensors(self) -> tuple[list, list[torch.Tensor]]:
        base, opt = self.state.base, self.state.opt
        keys, tensors, seen = [], [], set()
        for name, t in [*base.named_parameters(), *base.named_buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                keys.append(("model", name))
                tensors.append(t)
        for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
            for k, v in sorted(opt.state.get(p, {}).items()):
                if isinstance(v, torch.Tensor):
                    keys.append(("opt", i, k))
                    tensors.append(v)
        return keys, tensors

    @torch.no_grad()
    def take(self) -> None:
        """Copy the current state (device to device, no host synchronisation)."""
        keys, tensors = self._tensors()
        if keys != self._keys:
            self._keys = keys
            self._copies = [t.detach().clone(memory_format=torch.preserve_format) for t in tensors]
        elif tensors:
            torch._foreach_copy_(self._copies, [t.detach() for t in tensors])
        self._generators = {k: g.get_state() for k, g in self.state.task.generators().items()}
        self.step = self.state.step

    @torch.no_grad()
    def restore(self) -> int:
        """Put the copied state back (optimizer state that did not exist then is removed) and
        return its step count."""
        if self.step is None:
            raise RuntimeError("LastGoodState.restore: nothing was taken")
        keys, tensors = self._tensors()
        saved = dict(zip(self._keys, self._copies))
        opt = self.state.opt
        params = [q for g in opt.param_groups for q in g["params"]]
        for key, t in zip(keys, tensors):
            if key in saved:
                t.copy_(saved[key])
            elif key[0] == "opt":
                del opt.state[params[key[1]]][key[2]]
        for k, g in self.state.task.generators().items():
            if k in self._generators:
                g.set_state(self._generators[k])
        self.state.step = self.step
        return self.step
