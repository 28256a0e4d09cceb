"""Benchmark machinery shared by ``bitfast bench`` and ``benchmarks/bench_*.py``.

One case factory per op (``make_case``) builds everything a measurement needs for one
(op, shape, dtype, layout, mode, implementation): the timed function, the bytes floor
(docs/performance.md: the bytes an ideal kernel must move), a correctness check against a float64
evaluation of the reference, or the reason it cannot run. The same case serves the speed
measurement (``time_case``) and the peak-memory measurement (``peak_memory``), whether
driven by pytest-benchmark or by ``bitfast bench``.

Implementations are every bitfast backend (``bitfast.backends.BACKENDS``, skipped with the
backend's own reasons where it cannot serve) and the baselines a user would pick instead:

* ``eager``: timm's formulation in plain PyTorch (WS through ``F.batch_norm`` over each
  output channel, ``F.group_norm`` / ``F.batch_norm`` then an in-place ReLU, run under
  autocast for half precision as a training loop does; for ``group_norm_relu_add``, the
  residual ``a + b`` then that GroupNorm);
* ``compile``: the same function under ``torch.compile(dynamic=False)``;
* ``sgd_foreach`` / ``sgd_fused``: ``torch.optim.SGD(foreach=True)`` / ``(fused=True)``;
* for the train step, ``eager`` is a BiT model built from timm-style layers with
  ``torch.optim.SGD``, ``compile`` the same model compiled, and ``timm`` timm's own
  ``resnetv2_50x1_bit`` when timm is installed; ``bitfast`` is bitfast's model (automatic
  backends) with ``FusedSGD``.

Timing: CUDA events around each call after warm-up (Triton compiles on the first call),
inputs rotated so that the working set exceeds the L2 cache; on CPU ``time.perf_counter``.
The median of each run is kept; every case is timed ``runs`` times and the spread between
runs reported (a difference smaller than the spread is noise). Bandwidth is reported as
bytes floor / median and as a percentage of the device's copy bandwidth measured in the
same process.

Sizes: CUDA uses the real BiT layer shapes (R50x1 at batch 128, R101x3 at batch 32, 224x224
images). CPU uses the same layers at batch 2 (R50x1) and 1 (R101x3) and a smaller train
step (BiT-R50x1 at 128x128, batch 16; 64x64, batch 8 with ``quick``), so that a full run
fits in minutes on two cores.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bitfast import backends

OPS: tuple[str, ...] = (
    "weight_standardize", "group_norm_relu", "group_norm_relu_add", "batch_norm_relu", "sgd_momentum", "train_step"
)

BASELINES: dict[str, tuple[str, ...]] = {
    "weight_standardize": ("eager", "compile"),
    "group_norm_relu": ("eager", "compile"),
    "group_norm_relu_add": ("eager", "compile"),
    "batch_norm_relu": ("eager", "compile"),
    "sgd_momentum": ("sgd_foreach", "sgd_fused"),
    "train_step": ("eager", "compile", "timm"),
}

MODES: dict[str, tuple[str, ...]] = {
    "weight_standardize": ("fwd", "bwd", "full"),
    "group_norm_relu": ("fwd", "bwd", "full"),
    "group_norm_relu_add": ("fwd", "bwd", "full"),
    "batch_norm_relu": ("fwd", "bwd", "full"),
    "sgd_momentum": ("step",),
    "train_step": ("step",),
}

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS: dict[str, torch.memory_format] = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

GN_GROUPS = 32
EPS = 1e-5
WS_EPS = 1e-8
LR, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.9, 1e-4

# Peak memory measured by the CUDA caching allocator, or on CPU by the process's resident
# high-water mark (reset through /proc/self/clear_refs): a coarser, whole-process figure.
PEAK_CUDA = "CUDA max_memory_allocated increase during one call"
PEAK_CPU = "resident-set high-water increase during one call (whole process)"


class Skip(Exception):
    """A case that cannot run here, with the reason."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------
# Shapes: real BiT layers
# --------------------------------------------------------------------------------------

# (label, model, channels, spatial size at 224x224 input)
_ACTS = (
    ("R50x1 s1 mid", "r50x1", 64, 56),
    ("R50x1 s1 out", "r50x1", 256, 56),
    ("R50x1 s2 mid", "r50x1", 128, 28),
    ("R50x1 s3 out", "r50x1", 1024, 14),
    ("R50x1 s4 out", "r50x1", 2048, 7),
    ("R101x3 s1 out", "r101x3", 768, 56),
    ("R101x3 s3 mid", "r101x3", 768, 14),
    ("R101x3 s4 out", "r101x3", 6144, 7),
)
_BATCH = {"cuda": {"r50x1": 128, "r101x3": 32}, "cpu": {"r50x1": 2, "r101x3": 1}}
_ACT_SETS = {
    ("cuda", False): [a[0] for a in _ACTS],
    ("cuda", True): ["R50x1 s1 mid", "R50x1 s3 out", "R101x3 s1 out"],
    ("cpu", False): ["R50x1 s1 mid", "R50x1 s3 out", "R101x3 s3 mid"],
    ("cpu", True): ["R50x1 s1 mid", "R101x3 s3 mid"],
}

_MODEL_NAMES = {"r50x1": "resnetv2_50x1_bit", "r101x3": "resnetv2_101x3_bit"}


@functools.cache
def _conv_shapes(model: str) -> tuple[tuple[int, ...], ...]:
    """The weight shapes of every standardized conv of ``model`` (built on the meta device)."""
    import bitfast

    m = bitfast.create_model(_MODEL_NAMES[model], device="meta")
    return tuple(tuple(mod.weight.shape) for mod in m.modules() if isinstance(mod, bitfast.nn.StdConv2d))


@functools.cache
def _param_shapes(model: str) -> tuple[tuple[int, ...], ...]:
    import bitfast

    m = bitfast.create_model(_MODEL_NAMES[model], device="meta")
    return tuple(tuple(p.shape) for p in m.parameters())


def _weights(label: str) -> list[tuple[int, ...]]:
    table = {
        "R50x1 s1 conv2 3x3": [(64, 64, 3, 3)],
        "R50x1 s4 conv2 3x3": [(512, 512, 3, 3)],
        "R101x3 s4 conv2 3x3": [(1536, 1536, 3, 3)],
    }
    if label in table:
        return table[label]
    model = label.split()[0].lower()
    return list(_conv_shapes(model))


_WS_SETS = {
    ("cuda", False): ["R50x1 s1 conv2 3x3", "R50x1 s4 conv2 3x3", "R101x3 s4 conv2 3x3", "R50x1 all convs", "R101x3 all convs"],
    ("cuda", True): ["R50x1 s4 conv2 3x3", "R50x1 all convs"],
    ("cpu", False): ["R50x1 s1 conv2 3x3", "R50x1 s4 conv2 3x3", "R50x1 all convs"],
    ("cpu", True): ["R50x1 s1 conv2 3x3", "R50x1 s4 conv2 3x3"],
}
_SGD_SETS = {
    ("cuda", False): ["R50x1 all params", "R101x3 all params"],
    ("cuda", True): ["R50x1 all params"],
    ("cpu", False): ["R50x1 all params"],
    ("cpu", True): ["R50x1 all params"],
}
# (model, batch, image size)
_TRAIN = {
    ("cuda", False): ("resnetv2_50x1_bit", 128, 224),
    ("cuda", True): ("resnetv2_50x1_bit", 128, 224),
    ("cpu", False): ("resnetv2_50x1_bit", 16, 128),
    ("cpu", True): ("resnetv2_50x1_bit", 8, 64),
}


def shapes(op: str, device: str, quick: bool = False) -> dict[str, object]:
    """The named shapes ``op`` is measured at on ``device``: (N, C, H, W) for the norms,
    a list of weight shapes for weight standardization, of parameter shapes for SGD,
    (model, batch, size) for the train step."""
    dev = "cuda" if device.startswith("cuda") else "cpu"
    key = (dev, bool(quick))
    if op in ("group_norm_relu", "group_norm_relu_add", "batch_norm_relu"):
        out = {}
        for label, model, c, hw in _ACTS:
            if label in _ACT_SETS[key]:
                n = _BATCH[dev][model]
                out[f"{label} {n}x{c}x{hw}x{hw}"] = (n, c, hw, hw)
        return out
    if op == "weight_standardize":
        return {label: _weights(label) for label in _WS_SETS[key]}
    if op == "sgd_momentum":
        return {label: list(_param_shapes(label.split()[0].lower())) for label in _SGD_SETS[key]}
    if op == "train_step":
        model, batch, size = _TRAIN[key]
        return {f"R50x1 {size}px b{batch}": (model, batch, size)}
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def dtypes(op: str, device: str, quick: bool = False) -> list[str]:
    cuda = device.startswith("cuda")
    if op == "sgd_momentum":
        return ["fp32"]  # parameters stay float32 in mixed-precision training
    if op == "train_step":
        return ["bf16"] if cuda else ["fp32"]
    if op == "weight_standardize" and quick:
        return ["fp32"]  # the weights are float32 master weights under autocast
    if quick:
        return ["bf16"] if cuda else ["fp32"]
    return ["fp32", "bf16"]


def layouts(op: str, device: str, quick: bool = False) -> list[str]:
    if op in ("weight_standardize", "sgd_momentum"):
        return ["-"]
    if op == "train_step" or quick:
        return ["channels_last"]
    return ["nchw", "channels_last"]


def implementations(op: str) -> tuple[str, ...]:
    """bitfast's implementations of ``op`` followed by its baselines."""
    own = ("bitfast",) if op == "train_step" else backends.BACKENDS
    return own + BASELINES[op]


def is_baseline(op: str, impl: str) -> bool:
    return impl in BASELINES[op]


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
        return "-".join(s.replace(" ", "_") for s in (self.shape, self.dtype, self.layout, self.mode, self.impl))


def grid(op: str, device: str, quick: bool = False) -> list[Spec]:
    """Every Spec of ``op`` on ``device`` (implementations that cannot run are included:
    ``make_case`` gives them a skip reason)."""
    return [
        Spec(op, shape, dt, lay, mode, impl)
        for shape in shapes(op, device, quick)
        for dt in dtypes(op, device, quick)
        for lay in layouts(op, device, quick)
        for mode in MODES[op]
        for impl in implementations(op)
    ]


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------


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
    dev = "cuda" if device.startswith("cuda") else "cpu"
    dtype = DTYPES[spec.dtype]
    if spec.impl in backends.BACKENDS:
        reasons = backends.not_supported_reasons(spec.impl, spec.op, dev, dtype)
        if reasons:
            return "; ".join(reasons)
        if spec.impl == "triton" and dev == "cpu":
            return "triton: the Triton interpreter on CPU is a testing tool, far too slow to time"
        return None
    if spec.impl == "compile":
        return _compile_policy(spec, device, quick)
    if spec.impl == "timm":
        try:
            import timm  # noqa: F401
        except ImportError:
            return "timm: not installed"
    return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _l2_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    return 0


def _n_sets(device: str, set_bytes: int, limit: int = 8) -> int:
    """How many input sets to rotate through so the working set exceeds the L2 cache
    (three times over); one on CPU."""
    l2 = _l2_bytes(device)
    if not l2 or set_bytes <= 0:
        return 1
    return max(1, min(limit, math.ceil(3 * l2 / set_bytes)))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative error ||a - b|| / ||b||: robust to the few elements whose ReLU
    mask flips between float32 and float64 (a value within rounding of zero), sensitive to
    any real fault of a kernel."""
    a, b = a.double(), b.double()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def _tol(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 3e-2


def _close(name: str, got, want, dtype) -> None:
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    assert len(got) == len(want), f"{name}: {len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{name}: output {i} has shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        err = _rel_err(g, w)
        assert err <= _tol(dtype), f"{name}: output {i} differs from the float64 reference by {err:.2e} (normwise relative), tolerance {_tol(dtype):.0e}"


class _Rotor:
    """Cycles through input sets, one per call."""

    def __init__(self, n: int) -> None:
        self.n, self.i = n, 0

    def next(self) -> int:
        self.i = (self.i + 1) % self.n
        return self.i


def _autocast(device: str, dtype: torch.dtype):
    half = dtype in (torch.float16, torch.bfloat16)
    return torch.autocast(device.split(":")[0], dtype=dtype, enabled=half)


# Eager baselines: timm's formulation, in plain PyTorch.


def eager_weight_standardize(w: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """timm's StdConv2d weight: ``F.batch_norm`` in training mode over each output channel."""
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=eps).reshape_as(w)


def eager_group_norm_relu(x, weight, bias, num_groups: int = GN_GROUPS, eps: float = EPS):
    """timm's GroupNormAct with ReLU: ``F.group_norm`` then an in-place ReLU."""
    return F.relu(F.group_norm(x, num_groups, weight, bias, eps), inplace=True)


def eager_group_norm_relu_add(a, b, weight, bias, num_groups: int = GN_GROUPS, eps: float = EPS):
    """A pre-activation ResNet's residual add then the next unit's GroupNormAct, unfused:
    returns ``(a + b, relu(group_norm(a + b)))``."""
    s = a + b
    return s, eager_group_norm_relu(s, weight, bias, num_groups, eps)


def eager_batch_norm_relu(x, running_mean, running_var, weight, bias, eps: float = EPS):
    """timm's BatchNormAct2d with ReLU in training mode."""
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, eps), inplace=True)


class EagerStdConv2d(nn.Conv2d):
    """A timm-style standardized conv (the eager baseline's layer)."""

    def __init__(self, in_chs, out_chs, kernel_size, stride=1, padding=0, eps: float = WS_EPS) -> None:
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=padding, bias=False)
        self.eps = eps

    def forward(self, x):
        return F.conv2d(x, eager_weight_standardize(self.weight, self.eps), None, self.stride, self.padding)


class EagerGroupNormAct(nn.GroupNorm):
    """A timm-style GroupNorm + in-place ReLU (the eager baseline's layer)."""

    def __init__(self, channels: int) -> None:
        super().__init__(GN_GROUPS, channels, eps=EPS)

    def forward(self, x):
        return eager_group_norm_relu(x, self.weight, self.bias, self.num_groups, self.eps)


_COMPILED: dict[tuple, Callable] = {}


def _compiled(key: tuple, fn: Callable) -> Callable:
    """One compiled function per (op, shape, dtype, layout), shared by its modes so that a
    shape compiles once."""
    if key not in _COMPILED:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 512))
        _COMPILED[key] = torch.compile(fn, dynamic=False)
    return _COMPILED[key]


def _autograd_modes(spec: Spec, device: str, forward: Callable, sets: list, reference: Callable) -> tuple[Callable, Callable]:
    """The timed function and check for fwd/bwd/full of a differentiable op.

    ``sets`` holds (args, diff, dy): the arguments of ``forward``, the tensors to
    differentiate (requires_grad) and the output gradient. ``reference(args, dy, mode)``
    returns the float64 expected result (the output, or the gradients)."""
    rot = _Rotor(len(sets))
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
        _close(f"{spec.op} {spec.mode} [{spec.impl}]", got, reference(args, dy, mode), DTYPES[spec.dtype])

    return fn, check


def _ref_autograd(fn64: Callable, args: tuple, diff_idx: Sequence[int], dy, mode: str):
    """Evaluate ``fn64`` in float64 on copies of ``args`` and return the output (fwd) or
    the gradients of the arguments at ``diff_idx``."""
    a64 = [a.detach().double().requires_grad_(i in diff_idx) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    y = fn64(*a64)
    if mode == "fwd":
        return y
    if isinstance(y, torch.Tensor):
        y, dy = [y], [dy]
    return torch.autograd.grad(list(y), [a64[i] for i in diff_idx], [d.double() for d in dy])


def _norm_case(spec: Spec, device: str, shape, quick: bool) -> Case:
    from bitfast.ops import batch_norm_relu, group_norm_relu, reference

    dtype = DTYPES[spec.dtype]
    fmt = LAYOUTS[spec.layout]
    n, c, h, w = shape
    es = torch.tensor([], dtype=dtype).element_size()
    numel = n * c * h * w
    gn = spec.op == "group_norm_relu"
    # The floors of docs/performance.md: fwd reads x and writes y; bwd reads x and dy and writes dx; the
    # float32 affine parameters (and their gradients) are read/written once.
    floor = {"fwd": 2 * numel * es + 2 * c * 4, "bwd": 3 * numel * es + 4 * c * 4, "full": 5 * numel * es + 6 * c * 4}[spec.mode]
    nsets = _n_sets(device, 3 * numel * es)
    sets = []
    for _ in range(nsets):
        x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt).requires_grad_()
        wt = (1 + 0.1 * torch.randn(c, device=device)).requires_grad_()
        b = (0.1 * torch.randn(c, device=device)).requires_grad_()
        dy = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
        extra = () if gn else (torch.zeros(c, device=device), torch.ones(c, device=device))
        sets.append(((x, wt, b) + extra, (x, wt, b), dy))

    if gn:

        def ref64(x, wt, b):
            return reference.group_norm_relu(x, GN_GROUPS, wt, b, EPS)

        eager = eager_group_norm_relu
        if spec.impl in backends.BACKENDS:

            def forward(x, wt, b):
                return group_norm_relu(x, GN_GROUPS, wt, b, EPS, backend=spec.impl)

    else:

        def ref64(x, wt, b):
            return reference.batch_norm_relu(x, None, None, wt, b, True, 0.1, EPS)

        def eager(x, wt, b, rm, rv):
            return eager_batch_norm_relu(x, rm, rv, wt, b)

        if spec.impl in backends.BACKENDS:

            def forward(x, wt, b, rm, rv):
                return batch_norm_relu(x, rm, rv, wt, b, training=True, eps=EPS, backend=spec.impl)

    if spec.impl in ("eager", "compile"):

        def base(*args):
            with _autocast(device, dtype):
                return eager(*args)

        forward = base if spec.impl == "eager" else _compiled((spec.op, spec.shape, spec.dtype, spec.layout, device), base)

    def reference_fn(args, dy, mode):
        return _ref_autograd(ref64, args[:3], (0, 1, 2), dy, mode)

    fn, check = _autograd_modes(spec, device, forward, sets, reference_fn)
    return Case(spec, device, fn, check, bytes_floor=floor, shape_value=shape)


def _gn_add_case(spec: Spec, device: str, shape, quick: bool) -> Case:
    from bitfast.ops import group_norm_relu_add, reference

    dtype = DTYPES[spec.dtype]
    fmt = LAYOUTS[spec.layout]
    n, c, h, w = shape
    es = torch.tensor([], dtype=dtype).element_size()
    numel = n * c * h * w
    # Floors: fwd reads a and b and writes the sum and y; bwd reads dy, d(sum) and the sum
    # and writes one gradient (a's and b's are the same tensor); parameters once.
    floor = {"fwd": 4 * numel * es + 2 * c * 4, "bwd": 4 * numel * es + 4 * c * 4, "full": 8 * numel * es + 6 * c * 4}[spec.mode]
    sets = []
    for _ in range(_n_sets(device, 4 * numel * es)):
        a, b = (torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt).requires_grad_() for _ in range(2))
        wt = (1 + 0.1 * torch.randn(c, device=device)).requires_grad_()
        bias = (0.1 * torch.randn(c, device=device)).requires_grad_()
        dys = tuple(torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt) for _ in range(2))
        sets.append(((a, b, wt, bias), (a, b, wt, bias), dys))

    def ref64(a, b, wt, bias):
        return reference.group_norm_relu_add(a, b, GN_GROUPS, wt, bias, EPS)

    if spec.impl in backends.BACKENDS:

        def forward(a, b, wt, bias):
            return group_norm_relu_add(a, b, GN_GROUPS, wt, bias, EPS, backend=spec.impl)

    else:

        def base(*args):
            with _autocast(device, dtype):
                return eager_group_norm_relu_add(*args)

        forward = base if spec.impl == "eager" else _compiled((spec.op, spec.shape, spec.dtype, spec.layout, device), base)

    def reference_fn(args, dy, mode):
        return _ref_autograd(ref64, args, (0, 1, 2, 3), dy, mode)

    fn, check = _autograd_modes(spec, device, forward, sets, reference_fn)
    return Case(spec, device, fn, check, bytes_floor=floor, shape_value=shape)


def _ws_case(spec: Spec, device: str, shape_list, quick: bool) -> Case:
    from bitfast.ops import reference, weight_standardize

    dtype = DTYPES[spec.dtype]
    es = torch.tensor([], dtype=dtype).element_size()
    numel = sum(math.prod(s) for s in shape_list)
    # Forward reads w and writes w_hat; backward reads dy and w and writes dw (the per
    # channel statistics are negligible).
    floor = {"fwd": 2 * numel * es, "bwd": 3 * numel * es, "full": 5 * numel * es}[spec.mode]
    sets = []
    for _ in range(_n_sets(device, 3 * numel * es)):
        ws = [(0.05 * torch.randn(s, device=device)).to(dtype).requires_grad_() for s in shape_list]
        dys = [torch.randn(s, device=device).to(dtype) for s in shape_list]
        sets.append((tuple(ws), tuple(ws), dys))

    if spec.impl in backends.BACKENDS:

        def forward(*ws):
            return [weight_standardize(w, WS_EPS, backend=spec.impl) for w in ws]

    else:

        def base(*ws):
            return [eager_weight_standardize(w, WS_EPS) for w in ws]

        forward = base if spec.impl == "eager" else _compiled(("weight_standardize", spec.shape, spec.dtype, device), base)

    def reference_fn(args, dy, mode):
        k = len(args)
        return _ref_autograd(lambda *ws: [reference.weight_standardize(w, WS_EPS) for w in ws], args, range(k), dy, mode)

    fn, check = _autograd_modes(spec, device, forward, sets, reference_fn)
    return Case(spec, device, fn, check, bytes_floor=floor, shape_value=shape_list)


def _sgd_case(spec: Spec, device: str, shape_list, quick: bool) -> Case:
    from bitfast.ops import reference, sgd_momentum_

    dtype = DTYPES[spec.dtype]
    es = torch.tensor([], dtype=dtype).element_size()
    numel = sum(math.prod(s) for s in shape_list)
    floor = 5 * numel * es  # read p, g, m; write p, m
    params = [torch.randn(s, device=device).to(dtype) for s in shape_list]
    grads = [0.01 * torch.randn(s, device=device).to(dtype) for s in shape_list]
    if spec.impl in backends.BACKENDS:
        bufs = [0.01 * torch.randn(s, device=device).to(dtype) for s in shape_list]

        def fn():
            sgd_momentum_(params, grads, bufs, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend=spec.impl)

        def buffers():
            return bufs

    else:
        for p, g in zip(params, grads):
            p.grad = g
        kw = {"foreach": True} if spec.impl == "sgd_foreach" else {"fused": True}
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **kw)
        opt.step()  # creates the momentum buffers (the first step differs)

        def fn():
            opt.step()

        def buffers():
            return [opt.state[p]["momentum_buffer"] for p in params]

    def check():
        p64 = [p.double() for p in params]
        m64 = [m.double() for m in buffers()]
        g64 = [g.double() for g in grads]
        reference.sgd_momentum_(p64, g64, m64, LR, MOMENTUM, 0.0, WEIGHT_DECAY, False, False, False)
        fn()
        _close(f"sgd_momentum [{spec.impl}] params", params, p64, dtype)
        _close(f"sgd_momentum [{spec.impl}] buffers", buffers(), m64, dtype)

    return Case(spec, device, fn, check, bytes_floor=floor, shape_value=[len(shape_list), numel])


def train_model(impl: str, model_name: str, device: str, channels_last: bool):
    """The model and optimizer of a train-step variant."""
    import bitfast

    if impl == "bitfast":
        model = bitfast.create_model(model_name)
    elif impl in ("eager", "compile"):
        model = bitfast.create_model(model_name, conv_layer=EagerStdConv2d, norm_layer=EagerGroupNormAct)
    elif impl == "timm":
        import timm

        model = timm.create_model(model_name, num_classes=1000)
    else:
        raise ValueError(f"train_step: unknown implementation {impl!r}; expected one of {implementations('train_step')}")
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if impl == "bitfast":
        opt = bitfast.optim.FusedSGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    if impl == "compile":
        model = torch.compile(model, dynamic=False)
    return model, opt


def _train_case(spec: Spec, device: str, value, quick: bool) -> Case:
    model_name, batch, size = value
    dtype = DTYPES[spec.dtype]
    torch.manual_seed(0)
    model, opt = train_model(spec.impl, model_name, device, spec.layout == "channels_last")
    fmt = LAYOUTS[spec.layout]
    xs = [torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt) for _ in range(2)]
    ys = [torch.randint(0, 1000, (batch,), device=device) for _ in range(2)]
    rot = _Rotor(2)

    def fn():
        i = rot.next()
        with _autocast(device, dtype):
            loss = F.cross_entropy(model(xs[i]), ys[i])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def check():
        loss = fn().item()
        # A freshly initialised 1000-class model starts near ln(1000) = 6.9.
        assert math.isfinite(loss) and 0 < loss < 50, f"train_step [{spec.impl}]: loss {loss}"

    return Case(spec, device, fn, check, items=batch, shape_value=list(value))


_FACTORIES = {
    "group_norm_relu": _norm_case,
    "group_norm_relu_add": _gn_add_case,
    "batch_norm_relu": _norm_case,
    "weight_standardize": _ws_case,
    "sgd_momentum": _sgd_case,
    "train_step": _train_case,
}


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
    return _FACTORIES[spec.op](spec, device, shape, quick)


# --------------------------------------------------------------------------------------
# Timing, bandwidth, memory
# --------------------------------------------------------------------------------------


def time_fn(fn: Callable, device: str, *, min_time: float = 0.2, min_reps: int = 3, max_reps: int = 200, warmup: int = 2) -> list[float]:
    """Seconds per call of ``fn``, one sample per call, after ``warmup`` calls; calls are
    repeated until ``min_time`` has passed (at least ``min_reps``, at most ``max_reps``).
    CUDA: events around each call, synchronized at the end."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    _sync(device)
    samples: list[float] = []
    start = time.perf_counter()
    if cuda:
        events = []
        while len(events) < max_reps and (len(events) < min_reps or time.perf_counter() - start < min_time):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            events.append((a, b))
            if len(events) % 16 == 0:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in events]
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def synced(fn: Callable, device: str) -> Callable:
    """``fn`` followed by a device synchronization (what pytest-benchmark times)."""
    if not device.startswith("cuda"):
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def copy_bandwidth(device: str, nbytes: int | None = None) -> float:
    """The device's copy bandwidth in GB/s (bytes read + written / median time of a large
    ``copy_``), measured now."""
    cuda = device.startswith("cuda")
    nbytes = nbytes or (2**30 if cuda else 128 * 2**20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = statistics.median(time_fn(lambda: dst.copy_(src), device, min_time=0.2, min_reps=5, max_reps=50))
    return 2 * nbytes / t / 1e9


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory(case: Case, call: Callable | None = None) -> tuple[int | None, str]:
    """Extra memory one call of ``case.fn`` (or of ``call``) needs at its peak, and how it
    was measured."""
    call = call or case.fn
    if case.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, PEAK_CUDA
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the high-water mark (Linux)
    except OSError:
        call()
        return None, "unavailable (no /proc/self/clear_refs)"
    before = _rss_bytes("VmRSS")
    call()
    return max(0, _rss_bytes("VmHWM") - before), PEAK_CPU


# --------------------------------------------------------------------------------------
# Results and reports
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    op: str
    shape: str
    dtype: str
    layout: str
    mode: str
    impl: str
    baseline: bool
    medians_s: list[float]  # one per run
    best_s: float | None = None  # the fastest single call (robust to preemption on a shared CPU)
    bytes_floor: int = 0
    items: int = 0
    peak_bytes: int | None = None
    copy_gbps: float | None = None
    shape_value: object = None

    @property
    def time_s(self) -> float:
        return min(self.medians_s)

    @property
    def spread(self) -> float:
        """(max - min) / min of the runs' medians."""
        return (max(self.medians_s) - min(self.medians_s)) / min(self.medians_s)

    @property
    def gbps(self) -> float | None:
        return self.bytes_floor / self.time_s / 1e9 if self.bytes_floor else None

    @property
    def pct_copy(self) -> float | None:
        return 100 * self.gbps / self.copy_gbps if self.gbps and self.copy_gbps else None

    @property
    def img_per_s(self) -> float | None:
        return self.items / self.time_s if self.items else None

    @property
    def group(self) -> tuple:
        return (self.op, self.shape, self.dtype, self.layout, self.mode)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(time_s=self.time_s, spread=self.spread, gbps=self.gbps, pct_copy=self.pct_copy, img_per_s=self.img_per_s)
        return d


def speedups(results: Sequence[Result]) -> dict[int, dict[str, float]]:
    """For each result (by index): baseline impl -> baseline time / this time, over the
    baselines measured for the same op, shape, dtype, layout and mode."""
    base: dict[tuple, dict[str, float]] = {}
    for r in results:
        if r.baseline:
            base.setdefault(r.group, {})[r.impl] = r.time_s
    return {i: {b: t / r.time_s for b, t in base.get(r.group, {}).items() if b != r.impl} for i, r in enumerate(results)}


def _fmt(v, spec: str, empty: str = "") -> str:
    return empty if v is None else format(v, spec)


def format_table(results: Sequence[Result]) -> str:
    """One markdown table: op, shape, dtype, layout, mode, implementation, time (and run
    spread), GB/s, % of copy bandwidth, img/s, peak memory, speed-up vs each baseline."""
    ups = speedups(results)
    head = ["op", "shape", "dtype", "layout", "mode", "impl", "time ms", "spread", "GB/s", "% copy", "img/s", "peak MiB", "speed-up vs baselines"]
    rows = []
    for i, r in enumerate(results):
        vs = ", ".join(f"{b} {x:.2f}x" for b, x in ups[i].items())
        rows.append([
            r.op, r.shape, r.dtype, r.layout, r.mode, r.impl + (" (baseline)" if r.baseline else ""),
            f"{r.time_s * 1e3:.3f}", f"{100 * r.spread:.1f}%", _fmt(r.gbps, ".1f"), _fmt(r.pct_copy, ".0f"),
            _fmt(r.img_per_s, ".1f"), _fmt(None if r.peak_bytes is None else r.peak_bytes / 2**20, ".1f"), vs,
        ])
    widths = [max(len(h), *(len(row[j]) for row in rows)) if rows else len(h) for j, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: str) -> dict:
    """Device, versions and machine facts recorded with every result."""
    import bitfast

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu: {cpu_model()}",
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "bitfast": bitfast.__version__,
        "backends": bitfast.available_backends(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = "not installed"
    env["commit"] = _git_commit()
    return env


def _git_commit() -> str:
    """The commit of the source tree bitfast runs from (editable installs), else unknown."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "log", "-1", "--format=%h %s"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip()[:80] + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def to_json(meta: dict, results: Sequence[Result], skipped: Sequence[tuple[Spec, str]]) -> str:
    return json.dumps(
        {
            "meta": meta,
            "results": [r.as_dict() for r in results],
            "skipped": [dict(dataclasses.asdict(s), reason=why) for s, why in skipped],
        },
        indent=1,
        default=str,
    )


def write_reports(meta: dict, results: Sequence[Result], skipped: Sequence[tuple[Spec, str]], *,
                  json_path: str | None = None, markdown_path: str | None = None) -> None:
    """Write the results as JSON (``to_json``) and as a markdown report (``to_markdown``)
    to the paths given (None: not written)."""
    if json_path:
        with open(json_path, "w") as f:
            f.write(to_json(meta, results, skipped))
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(to_markdown(meta, results, skipped))


def _skip_summary(skipped: Sequence[tuple[Spec, str]]) -> list[str]:
    """Distinct skip reasons with how many cases each covers."""
    counts: dict[tuple[str, str], int] = {}
    for spec, why in skipped:
        counts[(spec.impl, why)] = counts.get((spec.impl, why), 0) + 1
    return [f"{impl} ({n} cases): {why}" for (impl, why), n in sorted(counts.items())]


def to_markdown(meta: dict, results: Sequence[Result], skipped: Sequence[tuple[Spec, str]]) -> str:
    lines = [f"# bitfast bench: {meta.get('device')}, {meta.get('date')}", ""]
    for k, v in meta.items():
        lines.append(f"- {k}: {v}")
    lines += ["", format_table(results), ""]
    if skipped:
        lines += ["Not measured:", ""] + [f"- {s}" for s in _skip_summary(skipped)] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Driver (``bitfast bench``)
# --------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr (a plain line per step when not a terminal)."""

    def __init__(self, total: int, stream=None, width: int = 30) -> None:
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        frac = self.done / self.total
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        line = f"[{bar}] {self.done}/{self.total} {time.perf_counter() - self.start:5.0f}s {label}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def check_and_peak(case: Case) -> int | None:
    """Run ``case.check()`` (the first call: Triton and torch.compile compile here), and
    return the peak memory of a call: measured around the check on CPU (saves a call of
    the slow CPU cases), around a separate warm call on CUDA."""
    if case.device.startswith("cuda"):
        case.check()
        return peak_memory(case)[0]
    return peak_memory(case, case.check)[0]


def measure(case: Case, *, runs: int = 2, min_time: float = 0.2, warmup: int | None = None, copy_gbps: float | None = None) -> Result:
    """Check ``case`` and measure its peak memory, then time it ``runs`` times (the median
    of each run is kept)."""
    peak = check_and_peak(case)
    if warmup is None:
        warmup = 2 if case.device.startswith("cuda") else 1
    samples = [time_fn(case.fn, case.device, min_time=min_time, warmup=warmup if i == 0 else 0) for i in range(runs)]
    s = case.spec
    return Result(s.op, s.shape, s.dtype, s.layout, s.mode, s.impl, is_baseline(s.op, s.impl),
                  [statistics.median(x) for x in samples], min(min(x) for x in samples),
                  case.bytes_floor, case.items, peak, copy_gbps, case.shape_value)


def run(ops: Sequence[str] = OPS, *, device: str | None = None, quick: bool = False, runs: int = 2, progress: bool = True,
        specs: Sequence[Spec] | None = None) -> tuple[dict, list[Result], list[tuple[Spec, str]]]:
    """Measure every case of ``ops`` (or the given ``specs``); returns (meta, results, skipped)."""
    device = device or default_device()
    meta = environment(device)
    meta["copy_GBps"] = round(copy_bandwidth(device), 2)
    meta["quick"] = quick
    meta["runs"] = runs
    specs = list(specs) if specs is not None else [s for op in ops for s in grid(op, device, quick)]
    bar = Progress(len(specs)) if progress else None
    results, skipped = [], []
    for spec in specs:
        # The train step on a GPU takes about 0.1 s: a second per run gives about ten steps.
        min_time = 1.0 if spec.op == "train_step" and device.startswith("cuda") else 0.1 if quick else 0.3
        try:
            case = make_case(spec, device, quick=quick)
            results.append(measure(case, runs=runs, min_time=min_time, copy_gbps=meta["copy_GBps"]))
            del case
        except Skip as exc:
            skipped.append((spec, str(exc)))
        if bar:
            bar.step(f"{spec.op} {spec.shape} {spec.dtype} {spec.mode} {spec.impl}")
    return meta, results, skipped
