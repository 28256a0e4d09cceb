"""One definition per op: ``define_op`` turns an op family's schemas, fakes, reference
kernels and single autograd formula into everything that runs it.

From one call it

* defines the public ops ``name(..., str backend)`` and the native ops ``native_name(...)``
  (``_library.define``);
* registers the fakes (public and native) and the public ops' CPU/CUDA kernel, which hands
  the work to the backend named by the last argument (``reference``: the given reference
  kernel; ``cpp``/``cuda``: the native op; ``triton``: the launcher of the same name in the
  family's Triton module);
* registers the forward op's autograd with ``torch.library`` (the formula's backward calls
  the registered backward op, so tracing and compiling see ``torch.ops.bitfast.*``), and
  builds from the *same* ``setup_context``/``backward`` pair the eager fast path: an
  ``autograd.Function`` that calls the kernels directly, skipping the ``torch.library`` layer
  (30-250 us per call, most of a late-stage GroupNorm on a CPU);
* declares the family to ``bitfast.backends`` (its ops and the dtypes each backend takes).

The formula convention: ``setup_context(ctx, inputs, output)`` gets the forward's inputs
without the backend (``ctx.backend`` is set before), ``backward(ctx, call, *grads)`` returns
the gradients of those inputs and computes its ops with ``call(op, *args)``, which runs ``op``
on ``ctx.backend`` through the registered op or straight from Python, as the forward did.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
from torch.autograd.function import once_differentiable

from bitfast import _native, backends
from bitfast.ops import _library

__all__ = ["OpFamily", "define_op", "eager", "kernel_of", "needs_grad", "run"]

# op -> its reference kernel (filled by define_op).
_REFERENCE: dict[str, Callable] = {}


def run(op: str, backend: str, *args):
    """Compute ``op`` on ``backend`` (the kernel behind ``torch.ops.bitfast.<op>``)."""
    return kernel_of(op, backend)(*args)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*tensors) -> bool:
    """Whether a public op may run its kernels straight from Python, skipping the
    ``torch.library`` layer of its registered op.

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
    """Whether ``bitfast._C`` attached its C++ autograd to ``native_<op>``: the eager paths
    then call the native op and let it record its own backward. Builds load when bitfast
    is imported, so the answer is cached."""
    return _native.has_native_autograd(op)


@functools.cache
def _native_op(op: str):
    return getattr(torch.ops.bitfast, "native_" + op).default


def needs_grad(*tensors) -> bool:
    """Whether autograd would record an op of these inputs (None entries allowed)."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


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


def _tensors(args) -> list:
    """The tensors among ``args``, lists of tensors flattened."""
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
        elif isinstance(a, torch.Tensor):
            out.append(a)
    return out


def _registered_call(ctx):
    return lambda op, *args: getattr(torch.ops.bitfast, op)(*args, ctx.backend)


def _direct_call(ctx):
    return lambda op, *args: kernel_of(op, ctx.backend)(*args)


class OpFamily:
    """An op family made by ``define_op``: its name (what ``bitfast.backends`` resolves), its
    ops, and the two ways public functions run them (``__call__`` for the differentiable
    forward, ``run`` for the others)."""

    def __init__(self, family: str, ops: tuple[str, ...], forward: str | None, function,
                 tensor_positions: tuple[int, ...] = (), list_positions: tuple[int, ...] = ()) -> None:
        self.family, self.ops, self.forward, self._function = family, ops, forward, function
        # The forward's tensor (and tensor-list) arguments, by position (read from its schema
        # once: this runs on every call of the op, where a scan of the arguments costs a few
        # microseconds).
        self._tensor_positions = tensor_positions
        self._list_positions = list_positions

    def __call__(self, backend: str, *args):
        """The forward op's outputs for ``args`` on ``backend``, recording its backward when an
        input requires grad. In plain eager execution the kernels run straight from Python
        (the native op records its own backward when ``bitfast._C`` provides C++ autograd;
        else the Function built from the formula does); otherwise the registered op runs.
        Same kernels, same results either way."""
        tensors = [args[i] for i in self._tensor_positions]
        for i in self._list_positions:
            tensors.extend(args[i])
        if not eager(*tensors):
            return getattr(torch.ops.bitfast, self.forward)(*args, backend)
        if backend in ("cpp", "cuda") and native_autograd(self.forward):
            return _native_op(self.forward)(*args)
        if needs_grad(*tensors):
            return self._function.apply(*args, backend)
        return kernel_of(self.forward, backend)(*args)

    def run(self, op: str, backend: str, *args):
        """A non-differentiable op of the family (an in-place update) on ``backend``: straight
        to its kernel in plain eager execution, through the registered op otherwise."""
        if eager(*_tensors(args)):
            return kernel_of(op, backend)(*args)
        return getattr(torch.ops.bitfast, op)(*args, backend)

    def __repr__(self) -> str:
        return f"OpFamily({self.family!r}, ops={self.ops})"


def _eager_function(name: str, forward: str, setup_context, backward, materialize_grads: bool):
    """The autograd.Function of the eager fast path, from the same formula pair as the
    registered autograd."""

    def fwd(ctx, *args):
        *inputs, backend = args
        output = kernel_of(forward, backend)(*inputs)
        ctx.backend = backend
        ctx.set_materialize_grads(materialize_grads)
        setup_context(ctx, tuple(inputs), output)
        return output

    @once_differentiable
    def bwd(ctx, *grads):
        return (*backward(ctx, _direct_call(ctx), *grads), None)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd),
                                                   "__doc__": f"Eager autograd of {forward} (see define_op)."})


class _ListFunction:
    """The eager fast path of a forward op with tensor-list arguments or outputs: an
    ``autograd.Function`` sees only the tensors passed to ``apply`` directly, so the arguments
    go in flattened (each list as its tensors, with its length) and the outputs come back
    flattened, then are rebuilt; the formula sees the op's own structure on both sides."""

    def __init__(self, name: str, forward: str, setup_context, backward, materialize_grads: bool) -> None:
        def fwd(ctx, layout, box, backend, *flat):
            inputs = _unflatten(flat, layout)
            output = kernel_of(forward, backend)(*inputs)
            ctx.backend, ctx.layout = backend, layout
            ctx.set_materialize_grads(materialize_grads)
            setup_context(ctx, tuple(inputs), output)
            flat_out, box["out"] = _flatten(output)
            ctx.out_layout = box["out"]
            return tuple(flat_out)

        @once_differentiable
        def bwd(ctx, *grads):
            structured = _unflatten(grads, ctx.out_layout)
            grad_inputs = backward(ctx, _direct_call(ctx), *structured)
            flat = []
            for spec, g in zip(ctx.layout, grad_inputs):
                if spec is None:
                    flat.append(g)
                else:
                    flat.extend(g if g is not None else [None] * spec)
            return (None, None, None, *flat)

        self._function = type(name, (torch.autograd.Function,), {
            "forward": staticmethod(fwd), "backward": staticmethod(bwd),
            "__doc__": f"Eager autograd of {forward} (see define_op)."})

    def apply(self, *args):
        *inputs, backend = args
        flat, layout = _flatten(inputs)
        box: dict = {}
        out = self._function.apply(layout, box, backend, *flat)
        return tuple(_unflatten(out, box["out"]))


def _flatten(values) -> tuple[list, tuple]:
    """``values`` with each list or tuple replaced by its items, and the layout that rebuilds
    them: per value None (kept as is) or the length of its list."""
    flat, layout = [], []
    for v in values:
        if isinstance(v, (list, tuple)):
            flat.extend(v)
            layout.append(len(v))
        else:
            flat.append(v)
            layout.append(None)
    return flat, tuple(layout)


def _unflatten(flat, layout: tuple) -> list:
    """The inverse of ``_flatten``."""
    out, i = [], 0
    for spec in layout:
        if spec is None:
            out.append(flat[i])
            i += 1
        else:
            out.append(list(flat[i:i + spec]))
            i += spec
    return out


def define_op(
    family: str,
    schemas: Mapping[str, str],
    *,
    fakes: Mapping[str, Callable],
    references: Mapping[str, Callable],
    forward: str | None = None,
    setup_context: Callable | None = None,
    backward: Callable | None = None,
    materialize_grads: bool = True,
    triton_module: str | None = None,
    native_dtypes: frozenset | None = None,
    triton_dtypes: frozenset | None = None,
) -> OpFamily:
    """Define the op family ``family`` from ``schemas`` (op name -> schema without the backend
    argument; the module's ``SCHEMAS`` literal), one fake and one reference kernel per op,
    and for the differentiable ``forward`` op its ``setup_context``/``backward`` formula (see
    the module docstring). ``materialize_grads=False`` lets the backward receive None for
    unused outputs. ``triton_module`` names the module under ``bitfast.kernels`` whose
    functions of the ops' names launch them; ``native_dtypes``/``triton_dtypes`` restrict the
    dtypes those backends take. Returns the ``OpFamily`` the public functions call."""
    ops = tuple(schemas)
    for what, table in (("fake", fakes), ("reference kernel", references)):
        missing = [op for op in ops if op not in table]
        if missing:
            raise ValueError(f"define_op({family!r}): no {what} for {missing}")
    if (forward is None) != (backward is None) or (forward is not None and setup_context is None):
        raise ValueError(f"define_op({family!r}): a forward op needs both setup_context and backward")
    _library.define(schemas)
    for op in ops:
        _REFERENCE[op] = references[op]
        _register_kernel_and_fakes(op, fakes[op])
    kwargs = {}
    if native_dtypes is not None:
        kwargs["native_dtypes"] = native_dtypes
    if triton_dtypes is not None:
        kwargs["triton_dtypes"] = triton_dtypes
    backends.register_family(family, ops, triton_module=triton_module, **kwargs)
    function = None
    if forward is not None:
        def registered_setup(ctx, inputs, output):
            ctx.backend = inputs[-1]
            setup_context(ctx, tuple(inputs[:-1]), output)

        def registered_backward(ctx, *grads):
            return (*backward(ctx, _registered_call(ctx), *grads), None)

        torch.library.register_autograd(_library.qualname(forward), registered_backward,
                                        setup_context=registered_setup, lib=_library.lib)
        positions, lists = _tensor_positions(schemas[forward])
        if lists or "[]" in schemas[forward].split("->")[1]:
            function = _ListFunction(f"Eager_{forward}", forward, setup_context, backward, materialize_grads)
        else:
            function = _eager_function(f"Eager_{forward}", forward, setup_context, backward, materialize_grads)
        return OpFamily(family, ops, forward, function, positions, lists)
    return OpFamily(family, ops, forward, function)


def _tensor_positions(schema: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The positions of the (optional) Tensor arguments of ``schema``, and of its Tensor lists."""
    args = schema[schema.index("(") + 1: schema.index(") ->")]
    kinds = [a.strip().split(" ")[0] for a in args.split(",")]
    positions = tuple(i for i, k in enumerate(kinds) if k.startswith("Tensor") and not k.endswith("[]"))
    lists = tuple(i for i, k in enumerate(kinds) if k.startswith("Tensor") and k.endswith("[]"))
    return positions, lists


def _register_kernel_and_fakes(op: str, fake: Callable) -> None:
    """Attach the backend-dispatching kernel of ``op`` and the fake of ``op`` and
    ``native_<op>``. ``fake`` takes the native op's arguments (no backend)."""

    def kernel(*args):
        return run(op, args[-1], *args[:-1])

    def fake_public(*args):
        return fake(*args[:-1])

    torch.library.register_kernel(_library.qualname(op), ("cpu", "cuda"), kernel, lib=_library.lib)
    torch.library.register_fake(_library.qualname(op), fake_public, lib=_library.lib)
    torch.library.register_fake(_library.qualname("native_" + op), fake, lib=_library.lib)
