"""The benchmark harness: what a measurement is (``Spec``), what runs it (``Case``), the
registry of per-op benchmark definitions (``BenchOp``), the grid of every measurement, why
one cannot run (``skip_reason``), and the helpers the definitions build their cases with.

Each op's definition lives in ``bitfast/bench/ops/<op>.py`` and calls ``register``; the
registry is filled when ``bitfast.bench`` is imported (every module of that folder, in the
definitions' ``order``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from bitfast import _exports, backends
from bitfast.bench.timing import input_sets

__all__ = [
    "DTYPES", "EPS", "GN_GROUPS", "LAYOUTS", "LR", "MOMENTUM", "WEIGHT_DECAY", "WS_EPS",
    "BenchOp", "Case", "Rotor", "Skip", "Spec", "autocast", "autograd_modes", "close", "compiled", "default_device",
    "definition", "dtypes", "grid", "implementations", "input_sets", "is_baseline", "layouts", "make_case", "op_names",
    "ref_autograd", "register", "rel_err", "shapes", "skip_reason",
]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS: dict[str, torch.memory_format] = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

GN_GROUPS = 32
EPS = 1e-5
WS_EPS = 1e-8
LR, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.9, 1e-4


class Skip(Exception):
    """A case that cannot run here, with the reason."""


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One measurement: what ``make_case`` builds."""

    op: str
    shape: str
    dtype: str
    layout: str
    mode: str
    impl: str

    @property
    def id(self) -> str:
        """A pytest id: the fields joined by dashes, spaces as underscores."""
        return "-".join(s.replace(" ", "_") for s in (self.shape, self.dtype, self.layout, self.mode, self.impl))


@dataclasses.dataclass
class Case:
    """A runnable measurement. ``fn()`` is one timed call (it rotates its inputs);
    ``check()`` raises AssertionError if the implementation computes a wrong result."""

    spec: Spec
    device: str
    fn: Callable[[], object]
    check: Callable[[], None]
    bytes_floor: int = 0
    items: int = 0  # images per call (train step)
    shape_value: object = None


@dataclasses.dataclass(frozen=True)
class BenchOp:
    """The benchmark definition of one op (``bitfast/bench/ops/<op>.py``).

    ``shapes(device, quick)`` names the shapes it is measured at on a device kind (``cpu`` or
    ``cuda``); ``dtypes(device, quick)`` and ``layouts(device, quick)`` list the dtypes and
    memory layouts (``-`` when the op has none); ``factory(spec, device, shape, quick)``
    builds the ``Case``. ``own`` is bitfast's implementations (default: every backend),
    ``baselines`` the alternatives a user would pick, described for the tables by
    ``baseline_notes``; ``title`` names the op in the tables; ``order`` sorts the registry."""

    name: str
    modes: tuple[str, ...]
    baselines: tuple[str, ...]
    shapes: Callable[[str, bool], dict]
    dtypes: Callable[[str, bool], list]
    layouts: Callable[[str, bool], list]
    factory: Callable[[Spec, str, object, bool], Case]
    baseline_notes: str = ""
    own: tuple[str, ...] | None = None
    own_notes: str = "every backend"
    title: str | None = None
    order: int = 50


_REGISTRY: dict[str, BenchOp] = {}
_DISCOVERED: list[bool] = []  # set once every definition module has been imported


def register(op: BenchOp) -> BenchOp:
    """Add ``op`` to the registry (its name must be new)."""
    if op.name in _REGISTRY:
        raise ValueError(f"bitfast.bench: {op.name!r} is registered twice")
    _REGISTRY[op.name] = op
    return op


def _discover() -> None:
    """Import every definition module of ``bitfast/bench/ops`` (once; a definition imported
    on its own before does not stop the others from being found)."""
    if _DISCOVERED:
        return
    _exports.import_submodules("bitfast.bench.ops", lambda name: not name.startswith("_"))
    _DISCOVERED.append(True)


def op_names() -> tuple[str, ...]:
    """The benchmarked ops, in the registry's order."""
    _discover()
    return tuple(sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].order, n)))


def definition(op: str) -> BenchOp:
    """The registered definition of ``op`` (ValueError naming the known ops otherwise)."""
    _discover()
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; expected one of {op_names()}")
    return _REGISTRY[op]


def _kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def shapes(op: str, device: str, quick: bool = False) -> dict[str, object]:
    """The named shapes ``op`` is measured at on ``device``."""
    return definition(op).shapes(_kind(device), bool(quick))


def dtypes(op: str, device: str, quick: bool = False) -> list[str]:
    """The dtypes ``op`` is measured in on ``device``."""
    return definition(op).dtypes(_kind(device), bool(quick))


def layouts(op: str, device: str, quick: bool = False) -> list[str]:
    """The memory layouts ``op`` is measured in (``-``: not applicable)."""
    return definition(op).layouts(_kind(device), bool(quick))


def implementations(op: str) -> tuple[str, ...]:
    """bitfast's implementations of ``op`` followed by its baselines."""
    d = definition(op)
    return (d.own if d.own is not None else backends.BACKENDS) + d.baselines


def is_baseline(op: str, impl: str) -> bool:
    """Whether ``impl`` is one of ``op``'s baselines."""
    return impl in definition(op).baselines


def grid(op: str, device: str, quick: bool = False) -> list[Spec]:
    """Every Spec of ``op`` on ``device`` (implementations that cannot run are included:
    ``make_case`` gives them a skip reason)."""
    return [
        Spec(op, shape, dt, lay, mode, impl)
        for shape in shapes(op, device, quick)
        for dt in dtypes(op, device, quick)
        for lay in layouts(op, device, quick)
        for mode in definition(op).modes
        for impl in implementations(op)
    ]


def _compile_policy(spec: Spec, device: str, quick: bool) -> str | None:
    """Why the torch.compile baseline of ``spec`` is not measured here (None: it is).

    One compiled function serves every mode of a shape, so each allowed
    (op, shape, dtype, layout) costs one compilation."""
    first = next(iter(shapes(spec.op, device, quick)))
    if device.startswith("cuda"):
        if quick and spec.op != "train_step" and spec.shape != first:
            return "compile: --quick compiles the first shape of each op only (about 15 s of compile time each on a GPU)"
        return None
    if spec.op == "train_step":
        if quick:
            return "compile: the whole-model compile takes minutes on 2 CPU cores; measured without --quick"
        return None
    if quick:
        if spec.shape != first or spec.mode != "full":
            return f"compile: --quick on CPU compiles only {first}, mode full (5-10 s of inductor time per case on 2 cores)"
        return None
    if spec.shape != first or spec.dtype != "fp32" or spec.layout == "channels_last":
        return f"compile: on CPU only {first}, fp32, NCHW is compiled (bounds compile time on 2 cores)"
    return None


def skip_reason(spec: Spec, device: str, quick: bool = False) -> str | None:
    """Why ``spec`` cannot be measured on ``device`` (None: it can)."""
    dev = _kind(device)
    dtype = DTYPES[spec.dtype]
    if spec.impl in backends.BACKENDS:
        reasons = backends.not_supported_reasons(spec.impl, spec.op, dev, dtype)
        if reasons:
            return "; ".join(reasons)
        if spec.impl == "triton" and dev == "cpu":
            return "triton: the Triton interpreter on CPU is a testing tool, far too slow to time"
        return None
    if "compile" in spec.impl:  # compile, compile-<mode>, bitfast-compile
        if spec.impl in ("compile-max-autotune", "compile-reduce-overhead") and dev == "cpu":
            return (f"{spec.impl}: GPU only (reduce-overhead is CUDA graphs; max-autotune's tuning takes far too long "
                    "on 2 CPU cores)")
        return _compile_policy(spec, device, quick)
    if spec.impl == "bitfast-cudagraphs" and dev == "cpu":
        return "bitfast-cudagraphs: GPU only (the step is captured in a CUDA graph)"
    if spec.impl == "timm":
        try:
            import timm  # noqa: F401
        except ImportError:
            return "timm: not installed"
    return None


def make_case(spec: Spec, device: str | None = None, *, quick: bool = False, shape=None) -> Case:
    """Build the case of ``spec`` (raises ``Skip`` with the reason when it cannot run).

    ``shape`` overrides the value of the named shape (tests use tiny ones)."""
    device = device or default_device()
    reason = skip_reason(spec, device, quick)
    if reason:
        raise Skip(reason)
    if shape is None:
        table = shapes(spec.op, device, quick)
        if spec.shape not in table:
            raise ValueError(f"{spec.op}: unknown shape {spec.shape!r}; expected one of {list(table)}")
        shape = table[spec.shape]
    return definition(spec.op).factory(spec, device, shape, quick)


# --------------------------------------------------------------------------------------
# Helpers of the case factories
# --------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative error ||a - b|| / ||b||: robust to the few elements whose ReLU
    mask flips between float32 and float64 (a value within rounding of zero), sensitive to
    any real fault of a kernel."""
    a, b = a.double(), b.double()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def _tol(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 3e-2


def close(name: str, got, want, dtype) -> None:
    """Assert that ``got`` (a tensor or a sequence) matches ``want`` within the dtype's
    normwise tolerance, naming the output that does not."""
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    assert len(got) == len(want), f"{name}: {len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{name}: output {i} has shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        err = rel_err(g, w)
        assert err <= _tol(dtype), f"{name}: output {i} differs from the float64 reference by {err:.2e} (normwise relative), tolerance {_tol(dtype):.0e}"


class Rotor:
    """Cycles through input sets, one per call."""

    def __init__(self, n: int) -> None:
        self.n, self.i = n, 0

    def next(self) -> int:
        """The index of the next set."""
        self.i = (self.i + 1) % self.n
        return self.i


def autocast(device: str, dtype: torch.dtype):
    """Autocast to ``dtype`` on ``device`` for half precision (what a training loop does)."""
    half = dtype in (torch.float16, torch.bfloat16)
    return torch.autocast(device.split(":")[0], dtype=dtype, enabled=half)


_COMPILED: dict[tuple, Callable] = {}


def compiled(key: tuple, fn: Callable) -> Callable:
    """One compiled function per (op, shape, dtype, layout), shared by its modes so that a
    shape compiles once."""
    if key not in _COMPILED:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 512))
        # The bwd mode runs one graph's backward again and again (retain_graph), which a
        # backward compiled with donated buffers refuses: compile without them.
        functorch_cfg = torch._functorch.config
        if hasattr(functorch_cfg, "donated_buffer"):
            functorch_cfg.donated_buffer = False
        _COMPILED[key] = torch.compile(fn, dynamic=False)
    return _COMPILED[key]


def autograd_modes(spec: Spec, device: str, forward: Callable, sets: list, reference: Callable) -> tuple[Callable, Callable]:
    """The timed function and check for fwd/bwd/full of a differentiable op.

    ``sets`` holds (args, diff, dy): the arguments of ``forward``, the tensors to
    differentiate (requires_grad) and the output gradient. ``reference(args, dy, mode)``
    returns the float64 expected result (the output, or the gradients)."""
    rot = Rotor(len(sets))
    mode = spec.mode
    if mode == "fwd":

        def fn():
            args, _diff, _dy = sets[rot.next()]
            return forward(*args)

    elif mode == "bwd":
        outs = [forward(*args) for args, _diff, _dy in sets]

        def fn():
            i = rot.next()
            return torch.autograd.grad(outs[i], sets[i][1], sets[i][2], retain_graph=True)

    else:

        def fn():
            args, diff, dy = sets[rot.next()]
            return torch.autograd.grad(forward(*args), diff, dy)

    def check():
        rot.i = len(sets) - 1  # the next call uses set 0
        got = fn()
        args, _diff, dy = sets[0]
        close(f"{spec.op} {spec.mode} [{spec.impl}]", got, reference(args, dy, mode), DTYPES[spec.dtype])

    return fn, check


def ref_autograd(fn64: Callable, args: tuple, diff_idx: Sequence[int], dy, mode: str):
    """Evaluate ``fn64`` in float64 on copies of ``args`` and return the output (fwd) or
    the gradients of the arguments at ``diff_idx``."""
    a64 = [a.detach().double().requires_grad_(i in diff_idx) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    y = fn64(*a64)
    if mode == "fwd":
        return y
    if isinstance(y, torch.Tensor):
        y, dy = [y], [dy]
    return torch.autograd.grad(list(y), [a64[i] for i in diff_idx], [d.double() for d in dy])
