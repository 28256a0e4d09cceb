"""One training step, in the three parts the loop (``bitfast.train.loop``) runs in order:

1. :func:`forward_backward`: the task's batch preparation, then forward and backward over the
   micro-batches; device work only, no host synchronisation (what ``bitfast.train.graphs``
   captures in a CUDA graph, with ``prepare=False``).
2. :func:`check_step`: the step's one read back to the host: the loss, the logged parts, the
   bound on the coming update (``guards.step_overflow_ratio``) and, under DDP, whether any
   process was signalled to stop, all in one transfer; returns the verdict
   (:func:`step_problem`, which the CUDA-graph path applies to the steps it reads back).
3. :func:`apply_update`: the optimizer step through the GradScaler.

:class:`TrainState` holds what persists between steps.
"""

from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import dataclass, field

import torch
from torch import nn

from bitfast.train import guards
from bitfast.train.distributed import DistInfo, all_reduce_sum
from bitfast.train.task import Task

__all__ = ["StepCheck", "TrainState", "apply_update", "check_step", "forward_backward", "step_problem", "unwrap_ddp"]


@dataclass
class TrainState:
    """A run between steps.

    Attributes:
        base: the plain model (what checkpoints hold).
        net: what the step calls: ``base`` inside the DDP and ``torch.compile`` wrappers in use.
        opt: the optimizer; ``scaler``: the GradScaler (enabled for fp16 only).
        task: how a batch becomes a loss (``bitfast.train.task``).
        info: the processes of the run.
        local_batch: this process's share of the global batch; ``batch_split``: micro-batches
            per step; ``autocast_dtype``: the autocast dtype, or None for float32.
        step: the number of steps done.
    """

    base: nn.Module
    net: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    task: Task
    info: DistInfo
    local_batch: int
    batch_split: int = 1
    autocast_dtype: torch.dtype | None = None
    step: int = 0


@dataclass
class StepCheck:
    """What :func:`check_step` read back: ``loss`` (mean over the global batch), ``parts`` (the
    task's logged parts, same scale), ``ratio`` (the coming update's bound, see
    ``guards.step_overflow_ratio``), ``problem`` (why the step must not be applied, or None)
    and ``stop_signal`` (the signal any process received, or 0)."""

    loss: float
    ratio: float
    problem: str | None = None
    stop_signal: int = 0
    parts: dict[str, float] = field(default_factory=dict)


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The DDP module inside a ``torch.compile`` wrapper (for ``no_sync``)."""
    return model._orig_mod if hasattr(model, "_orig_mod") else model


def forward_backward(state: TrainState, x: torch.Tensor, y, *, prepare: bool = True
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Zero the gradients, then forward and backward the task's loss over the step's
    micro-batches (gradients of the mean loss over the global batch). Returns the loss summed
    over this process's batch and the task's parts, as device tensors.

    ``prepare=False`` skips ``task.prepare`` (the caller ran it already: a CUDA-graph step
    prepares the batch, with its host-side random draws, outside the graph)."""
    if prepare:
        x, y = state.task.prepare(x, y)
    state.opt.zero_grad(set_to_none=True)
    device = x.device
    loss_total = torch.zeros((), device=device, dtype=torch.float32)
    parts_total: dict[str, torch.Tensor] = {}
    micro = state.local_batch // state.batch_split
    dtype = state.autocast_dtype
    for i in range(state.batch_split):
        xs, ys = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
        sync = contextlib.nullcontext()
        if state.info.enabled and i < state.batch_split - 1:
            sync = unwrap_ddp(state.net).no_sync()
        with sync:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = state.task.forward(state.net, xs)
            loss_sum, parts = state.task.loss(out, xs, ys)
            # Each process divides by its own batch; DDP averages the gradients over the
            # processes, so the gradient is that of the mean loss over the global batch.
            state.scaler.scale(loss_sum / state.local_batch).backward()
        loss_total += loss_sum.detach()
        for name, value in parts.items():
            part = value.detach().float()
            parts_total[name] = parts_total[name] + part if name in parts_total else part
    return loss_total, parts_total


def check_step(state: TrainState, loss_total: torch.Tensor, parts: dict[str, torch.Tensor], global_batch: int,
               signalled: dict | None = None) -> StepCheck:
    """Read the step's loss and parts, the bound on its update and the stop flags back to the
    host in one transfer (one all-reduce under DDP: every process reaches the same verdict and
    learns of a signal that reached any of them).

    The verdict (``problem``): the loss is not finite, the gradients are not, or the update
    would take a weight or momentum value within a factor 2 of the dtype's largest value.
    Under fp16 an overflowing gradient is the GradScaler's business (it skips the step)."""
    info = state.info
    device = loss_total.device
    signum = (signalled or {}).get("signum") or 0
    if state.scaler.is_enabled():
        state.scaler.unscale_(state.opt)
    ratio_t, grads_finite = guards.step_overflow_ratio(state.opt)
    names = list(parts)
    if info.enabled:
        got = [float(signum == s) for s in (signal.SIGTERM, signal.SIGINT)]
        packet = torch.cat([loss_total.reshape(1), torch.tensor(got, device=device),
                            *[parts[n].reshape(1).float() for n in names]])
        all_reduce_sum(packet, info)
        values = torch.cat([packet.double(), ratio_t.reshape(1).to(device)]).tolist()
        loss_sum, term, intr, *part_sums = values[:-1]
        ratio = values[-1]
        stop_signal = signal.SIGTERM if term else (signal.SIGINT if intr else 0)
    else:
        values = torch.stack([loss_total.double(), ratio_t.to(device), *[parts[n].double() for n in names]]).tolist()
        loss_sum, ratio, *part_sums = values
        stop_signal = signum
    check = StepCheck(loss=loss_sum / global_batch, ratio=ratio, stop_signal=stop_signal,
                      parts={n: v / global_batch for n, v in zip(names, part_sums)})
    scaler_skips = state.scaler.is_enabled() and not bool(grads_finite)
    check.problem = step_problem(state.step + 1, check.loss, ratio, scaler_skips=scaler_skips)
    return check


def step_problem(step: int, loss: float, ratio: float, *, scaler_skips: bool = False) -> str | None:
    """Why step ``step`` (counted from 1) must not be applied, or None: its ``loss`` (read
    back) is not finite, or its update's bound ``ratio`` (``guards.step_overflow_ratio``) is
    not below 0.5 (the gradients are not finite, or the update would come within a factor 2 of
    overflow). ``scaler_skips``: the fp16 GradScaler skips this step anyway (its gradients
    overflowed), so only the loss counts."""
    unsafe = not ratio < 0.5 and not scaler_skips
    if not math.isfinite(loss):
        return f"the loss is {loss} at step {step}"
    if unsafe and not math.isfinite(ratio):  # the weights and momentum were checked finite a step ago
        return f"the gradients of step {step} are not finite"
    if unsafe:
        return (f"the update of step {step} would take the weights or momentum to {ratio:.2g} of the "
                "largest float (overflow)")
    return None


def apply_update(state: TrainState) -> None:
    """The optimizer step (skipped by the GradScaler when fp16 gradients overflowed), then
    ``state.step += 1``."""
    state.scaler.step(state.opt)
    state.scaler.update()
    state.step += 1
