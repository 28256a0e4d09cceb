"""What stops a run safely: the check that the coming SGD step stays finite (so the state saved
as the last good one always is), and SIGTERM/SIGINT, which finish the step and save."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import torch

__all__ = ["INTERRUPT_EXIT_STATUS", "NonFiniteLossError", "RunInterrupted", "step_overflow_ratio", "stop_on_signals"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the checkpoint saved."""


# The exit status of a training command stopped by a signal after saving its checkpoint: what
# a shell reports for a process ended by that signal (128 + its number).
INTERRUPT_EXIT_STATUS = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


class RunInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped a run after it finished its current step and wrote its
    checkpoint. ``signum``, ``step``, ``checkpoint`` (the file, or None on ranks that write
    none) and ``exit_status`` (128 + the signal's number) describe it."""

    def __init__(self, message: str, *, signum: int, step: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_status = 128 + int(signum)


def _inf_norm(tensors: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """The largest |value| over ``tensors`` (0 for none, on ``device``), in float64 on their
    device."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(torch._foreach_norm(tensors, ord=float("inf"))).max().double()


@torch.no_grad()
def step_overflow_ratio(opt: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
    """How close the coming SGD step can bring any weight or momentum value to overflow.

    Returns ``(ratio, grads_finite)`` as 0-d tensors on the parameters' device (no host sync):
    ``ratio`` bounds the largest |value| the step can write (momentum ``mu * buf + g + wd * p``,
    weight ``p - lr * (1 + mu) * that``) as a fraction of the dtype's largest finite value; it is
    NaN or Inf when a weight, momentum buffer or gradient already is non-finite. A ratio below
    0.5 proves the step's results finite (and the averaged weights, a convex mix of finite
    values). A group's ``lr`` may be a one-element tensor (read on the device, so the check
    can be captured in a CUDA graph). The training loop stops before a step that fails this test, so the state it saves
    as the last good one never holds a non-finite tensor."""
    worst: list[torch.Tensor] = []
    grads_finite: list[torch.Tensor] = []
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        lr, mu = group["lr"], float(group.get("momentum", 0.0))
        # A tensor lr (a CUDA-graph step's) stays on the device: no host read, capturable.
        lr = lr.detach().abs().to(params[0].device, torch.float64) if isinstance(lr, torch.Tensor) else abs(float(lr))
        wd = float(group.get("weight_decay", 0.0))
        bufs = [b for b in (opt.state.get(p, {}).get("momentum_buffer") for p in params) if b is not None]
        # (no momentum: a zero made on the device, so that a captured step copies nothing from the host)
        pm, gm, bm = _inf_norm(params), _inf_norm([p.grad for p in params]), _inf_norm(bufs, params[0].device)
        update = gm + wd * pm + mu * bm
        grow = (1.0 + mu) if group.get("nesterov", False) else 1.0
        largest = torch.maximum(pm + lr * grow * update, update)
        worst.append(largest / torch.finfo(params[0].dtype).max)
        grads_finite.append(torch.isfinite(gm))
    if not worst:
        return torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.bool)
    return torch.stack(worst).max(), torch.stack(grads_finite).all()


@contextlib.contextmanager
def stop_on_signals(desc: str, announce: bool):
    """While the body runs, SIGTERM and SIGINT set ``flag["signum"]`` instead of ending the
    process (the loop finishes its step, saves and raises ``RunInterrupted``); a second signal
    acts at once as it would have without this. Outside the main thread nothing is installed."""
    flag: dict = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {}

    def handler(signum, frame):
        if flag["signum"] is not None:
            signal.signal(signum, old[signum])
            signal.raise_signal(signum)
            return
        flag["signum"] = signum
        if announce:
            print(f"\n{desc}: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint and stopping "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    for s in (signal.SIGTERM, signal.SIGINT):
        old[s] = signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
