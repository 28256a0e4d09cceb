"""Wiring of the public ops to their backends: one Python kernel per op for CPU and CUDA
that hands the work to the backend named by the op's last argument, and the fakes."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from bitfast import backends
from bitfast.ops import _library, reference

_REFERENCE: dict[str, Callable] = {
    "weight_standardize_fwd": reference.weight_standardize_forward,
    "weight_standardize_bwd": reference.weight_standardize_backward,
    "group_norm_relu_fwd": reference.group_norm_relu_forward,
    "group_norm_relu_bwd": reference.group_norm_relu_backward,
    "group_norm_relu_add_fwd": reference.group_norm_relu_add_forward,
    "group_norm_relu_add_bwd": reference.group_norm_relu_add_backward,
    "batch_norm_relu_fwd": reference.batch_norm_relu_forward,
    "batch_norm_relu_bwd": reference.batch_norm_relu_backward,
    "batch_norm_update_stats_": reference.batch_norm_update_stats_,
    "sgd_momentum_": reference.sgd_momentum_,
}


def run(op: str, backend: str, *args):
    """Compute ``op`` on ``backend`` (the kernel behind ``torch.ops.bitfast.<op>``)."""
    return kernel_of(op, backend)(*args)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*tensors) -> bool:
    """Whether a public op may run its kernels straight from Python, skipping the
    ``torch.library`` layer of its registered op (which costs 30-250 us per call: most of a
    late-stage GroupNorm on a CPU).

    True in plain eager execution only: not while ``torch.compile`` or ``torch.jit.trace``
    traces, not under a torch function or dispatch mode (FakeTensorMode, make_fx,
    FlopCounterMode, opcheck ...) or a functorch transform (vmap, grad), and only for
    plain tensors and Parameters (a tensor subclass gets the registered op it may know how
    to handle). Everywhere else the registered op runs, with the same kernels and the same
    results; tools that trace or intercept ops therefore always see
    ``torch.ops.bitfast.*``.
    """
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


@functools.cache
def native_autograd(op: str) -> bool:
    """Whether ``bitfast._C`` attached its C++ autograd (csrc/autograd.cpp) to
    ``native_<op>``: the eager paths then call the native op and let it record its own
    backward. Builds load when bitfast is imported, so the answer is cached."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(_library.qualname("native_" + op), "Autograd")


@functools.cache
def _native_op(op: str):
    return getattr(torch.ops.bitfast, "native_" + op).default


def needs_grad(*tensors) -> bool:
    """Whether autograd would record an op of these inputs (None entries allowed)."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def eager_forward(op: str, backend: str, function, args: tuple, differentiable: tuple) -> tuple:
    """Run the forward op ``op`` on ``backend`` in plain eager execution (callers check
    ``eager`` first) and return its outputs, recording the backward when one of
    ``differentiable`` (the inputs that take gradients) requires grad.

    The native backends call ``native_<op>``, whose C++ autograd records the backward
    (when ``bitfast._C`` provides it); otherwise ``function``, the op's Python
    ``torch.autograd.Function`` (taking ``args`` then ``backend``), records it, or the
    kernel runs alone when nothing needs a gradient. Same kernels, same results as the
    registered op ``torch.ops.bitfast.<op>``."""
    if backend in ("cpp", "cuda") and native_autograd(op):
        return _native_op(op)(*args)
    if needs_grad(*differentiable):
        return function.apply(*args, backend)
    return kernel_of(op, backend)(*args)


def kernel_of(op: str, backend: str) -> Callable:
    """The function that computes ``op`` on ``backend`` (what ``run`` calls), for the eager
    paths that call it directly."""
    if backend == "reference":
        return _REFERENCE[op]
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.bitfast, "native_" + op)
    if backend == "triton":
        return backends.triton_launcher(op)
    raise ValueError(f"bitfast::{op}: unknown backend {backend!r}; expected one of {backends.BACKENDS}")


def register(op: str, fake: Callable) -> None:
    """Attach the backend-dispatching kernel of ``op`` and the fake of ``op`` and
    ``native_<op>``. ``fake`` takes the native op's arguments (no backend)."""

    def kernel(*args):
        return run(op, args[-1], *args[:-1])

    def fake_public(*args):
        return fake(*args[:-1])

    torch.library.register_kernel(_library.qualname(op), ("cpu", "cuda"), kernel, lib=_library.lib)
    torch.library.register_fake(_library.qualname(op), fake_public, lib=_library.lib)
    torch.library.register_fake(_library.qualname("native_" + op), fake, lib=_library.lib)
