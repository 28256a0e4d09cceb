"""Backend choice: which implementation computes a bitfast op.

Backends:

* ``reference``: plain PyTorch (``bitfast.ops.reference``); always available, every dtype;
* ``cpp``: the C++ CPU kernels of the ``bitfast._C`` extension (CPU tensors);
* ``cuda``: the CUDA kernels of the ``bitfast._C_cuda`` extension (CUDA tensors);
* ``triton``: the Triton kernels of ``bitfast.kernels`` (CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` is set before the kernels are imported; that is how the Triton
  kernels are tested without a GPU).

Which backend runs is decided from static facts only (the op, the device type, the dtype,
which builds loaded), so that ``torch.compile`` guards on it instead of breaking the graph.
The request is taken, in order, from an explicit ``backend=`` argument (a module fixes its
backend when it is built), the innermost ``use_backend`` context, the ``BITFAST_BACKEND``
environment variable, and otherwise ``auto``. ``auto`` picks the first backend in the
device's priority list that can serve the inputs (CPU: cpp, reference; CUDA: cuda, triton,
reference, with triton before cuda for any family in ``CUDA_UNVALIDATED``, see
``priority``); an explicitly requested backend that cannot serve raises ``BackendError``
listing why. ``auto`` never picks the Triton interpreter: it is a testing tool.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

from bitfast import _native

BACKENDS: tuple[str, ...] = ("reference", "cpp", "cuda", "triton")
AUTO = "auto"
ENV_VAR = "BITFAST_BACKEND"

_PRIORITY: dict[str, tuple[str, ...]] = {
    "cpu": ("cpp", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

# Families whose CUDA kernels (bitfast._C_cuda) have compiled but not yet passed their
# parity tests on a GPU (run by tools/gpu_check.sh). On CUDA tensors ``auto`` tries
# triton before cuda for these; an explicit ``backend="cuda"`` still runs them. Add a
# family when its CUDA kernels are new; remove it once its tests pass on a GPU.
# GroupNorm+ReLU and BatchNorm+ReLU have passed theirs (benchmarks/results/ has the runs);
# GroupNorm+ReLU with the residual add has not run on a GPU yet.
CUDA_UNVALIDATED: frozenset[str] = frozenset({"group_norm_relu_add"})

_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_HALF_AND_SINGLE = frozenset({torch.float16, torch.bfloat16, torch.float32})

# A family is what a backend must serve as a whole: a forward op and its backward op
# (the backend is chosen once, in the forward, and reused by autograd).
# family -> its registered ops
_FAMILIES: dict[str, tuple[str, ...]] = {}

# family -> backend -> dtypes its kernels accept.
_DTYPES: dict[str, dict[str, frozenset]] = {}

# op -> (module under bitfast.kernels, launcher name) for ops that have a Triton kernel.
_TRITON: dict[str, tuple[str, str]] = {}

_override: list[str] = []


class BackendError(ValueError):
    """An explicitly requested backend cannot run an op on the given inputs."""


def register_family(
    family: str,
    ops: tuple[str, ...],
    *,
    native_dtypes: frozenset = _FLOATS,
    triton_module: str | None = None,
    triton_dtypes: frozenset = _HALF_AND_SINGLE,
) -> None:
    """Declare the ops of ``family`` and the dtypes their native and Triton kernels accept.

    With ``triton_module`` (a module under ``bitfast.kernels``), each op ``name`` of the
    family is launched by the function of the same name in that module. Whether a native
    kernel exists is read from the dispatcher, not declared here.
    """
    _FAMILIES[family] = tuple(ops)
    _DTYPES[family] = {"reference": _FLOATS, "cpp": native_dtypes, "cuda": native_dtypes}
    if triton_module is not None:
        for op in ops:
            _TRITON[op] = (triton_module, op)
        _DTYPES[family]["triton"] = triton_dtypes


def families() -> tuple[str, ...]:
    """The registered op families (``weight_standardize``, ``group_norm_relu`` ...)."""
    return tuple(_FAMILIES)


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_name(name: str, what: str = "backend") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, one of {(AUTO,) + BACKENDS}; got {type(name).__name__}")
    if name != AUTO and name not in BACKENDS:
        raise ValueError(f"unknown {what} {name!r}; expected one of {(AUTO,) + BACKENDS}")
    return name


def not_supported_reasons(backend: str, op: str, device_type: str, dtype: torch.dtype) -> list[str]:
    """Why ``backend`` cannot compute the op family ``op`` (forward and backward) for
    tensors of ``device_type`` and ``dtype``. An empty list means it can."""
    _check_name(backend)
    return list(_reasons(backend, op, device_type, dtype))


# Every input is a static fact of the process (builds load at import, TRITON_INTERPRET is
# read before kernels import), so the answer is cached: ops ask on every call.
@functools.cache
def _reasons(backend: str, op: str, device_type: str, dtype: torch.dtype) -> tuple[str, ...]:
    if op not in _FAMILIES:
        raise ValueError(f"unknown op family {op!r}; expected one of {families()}")
    reasons: list[str] = []
    ops = _FAMILIES[op]
    dtypes = _DTYPES[op].get(backend)
    if backend == "reference":
        if dtype not in _FLOATS:
            reasons.append(f"reference: dtype {dtype} is not a floating dtype")
        return tuple(reasons)
    if backend in ("cpp", "cuda"):
        ext, dev = ("bitfast._C", "cpu") if backend == "cpp" else ("bitfast._C_cuda", "cuda")
        if not _native.loaded(ext):
            reasons.append(f"{backend}: the extension {ext} is not loaded ({_native.load_error(ext)})")
        else:
            missing = [o for o in ops if not _native.has_native_kernel(o, dev)]
            if missing:
                reasons.append(f"{backend}: {ext} has no {dev} kernel for {', '.join(missing)}")
        if device_type != dev:
            reasons.append(f"{backend}: serves {dev} tensors, got {device_type} tensors")
    else:  # triton
        if not _triton_importable():
            reasons.append("triton: the triton package is not installed")
        missing = [o for o in ops if o not in _TRITON]
        if missing:
            reasons.append(f"triton: bitfast.kernels has no kernel for {', '.join(missing)}")
        if device_type == "cpu" and not triton_interpreted():
            reasons.append("triton: CPU tensors need TRITON_INTERPRET=1 (set before bitfast is imported)")
        elif device_type == "cuda" and not torch.cuda.is_available():
            reasons.append("triton: CUDA is not available")
        elif device_type not in ("cpu", "cuda"):
            reasons.append(f"triton: serves cuda tensors, got {device_type} tensors")
    if dtypes is not None and dtype not in dtypes:
        reasons.append(f"{backend}: {op} does not accept dtype {dtype} (accepts {sorted(map(str, dtypes))})")
    return tuple(reasons)


def priority(op: str, device_type: str) -> tuple[str, ...]:
    """The backends ``auto`` tries, in order, for the op family ``op`` on ``device_type``.

    The device's list (CPU: cpp, reference; CUDA: cuda, triton, reference), except that on
    CUDA the families in ``CUDA_UNVALIDATED`` (CUDA kernels not yet run on a GPU: at
    present ``group_norm_relu_add``) try triton before cuda. Unknown device types get an
    empty list.
    """
    order = _PRIORITY.get(device_type, ())
    if device_type == "cuda" and op in CUDA_UNVALIDATED and "cuda" in order and "triton" in order:
        rest = [b for b in order if b != "cuda"]
        rest.insert(rest.index("triton") + 1, "cuda")
        order = tuple(rest)
    return order


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: ``backend`` if given, else the innermost ``use_backend``,
    else ``$BITFAST_BACKEND``, else ``"auto"``."""
    if backend is not None:
        return _check_name(backend)
    if _override:
        return _override[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env.strip().lower(), f"${ENV_VAR}")
    return AUTO


@torch.compiler.assume_constant_result
def resolve(op: str, device_type: str, dtype: torch.dtype, backend: str | None = None) -> str:
    """The backend that computes ``op`` on tensors of ``device_type``/``dtype``.

    Raises ``BackendError`` when an explicitly requested backend cannot serve them.
    Under ``torch.compile`` the answer is taken once, when the graph is traced, and baked
    into it: a ``use_backend`` context entered later does not change a compiled graph
    (a new dtype or device recompiles it and asks again).
    """
    want = requested_backend(backend)
    if want != AUTO:
        reasons = not_supported_reasons(want, op, device_type, dtype)
        if reasons:
            raise BackendError(
                f"backend {want!r} cannot run {op} on {device_type} {dtype} tensors: " + "; ".join(reasons)
            )
        return want
    for name in priority(op, device_type):
        if not not_supported_reasons(name, op, device_type, dtype):
            return name
    return "reference"


def available_backends() -> list[str]:
    """The backends this process can run at least one op with, on some device."""
    out = ["reference"]
    if _native.loaded("bitfast._C"):
        out.append("cpp")
    cuda = torch.cuda.is_available()
    if _native.loaded("bitfast._C_cuda") and cuda:
        out.append("cuda")
    if _triton_importable() and (cuda or triton_interpreted()):
        out.append("triton")
    return out


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the ops inside the ``with`` block on backend ``name`` (or ``"auto"``).

    Modules built with an explicit ``backend=`` keep theirs. Nested contexts stack.
    """
    _override.append(_check_name(name))
    try:
        yield name
    finally:
        _override.pop()


def triton_launcher(op: str):
    """The Triton launcher of ``op`` (imports its kernel module on first use)."""
    module, launcher = _TRITON[op]
    mod = importlib.import_module(f"bitfast.kernels.{module}")
    return getattr(mod, launcher)
