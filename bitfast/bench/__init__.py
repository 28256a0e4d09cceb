"""Benchmark machinery shared by ``bitfast bench`` and ``pytest benchmarks/``, as a registry: one
definition per op in ``bitfast/bench/ops/<op>.py`` (its shapes, dtypes, layouts, modes, baselines and
case factory), over a shared harness (``harness``: specs, cases, the grid, skip reasons), timing
(``timing``), reports (``report``) and the driver of ``bitfast bench`` (``driver``).

The case factory of each op (``make_case``) builds everything a measurement needs for one
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

from types import MappingProxyType

from bitfast.bench.baselines import (
    EagerGroupNormAct,
    EagerStdConv2d,
    eager_batch_norm_relu,
    eager_group_norm_relu,
    eager_group_norm_relu_add,
    eager_weight_standardize,
)
from bitfast.bench.driver import FAILED, Progress, check_and_peak, measure, run
from bitfast.bench.harness import (
    DTYPES,
    EPS,
    GN_GROUPS,
    LAYOUTS,
    LR,
    MOMENTUM,
    WEIGHT_DECAY,
    WS_EPS,
    BenchOp,
    Case,
    Skip,
    Spec,
    default_device,
    definition,
    dtypes,
    grid,
    implementations,
    is_baseline,
    layouts,
    make_case,
    op_names,
    register,
    shapes,
    skip_reason,
)
from bitfast.bench.report import (
    Result,
    cpu_model,
    environment,
    format_table,
    ops_table,
    skip_summary,
    speedups,
    to_json,
    to_markdown,
    write_reports,
)
from bitfast.bench.timing import PEAK_CPU, PEAK_CUDA, copy_bandwidth, peak_memory, synced, time_fn

# The registry's ops (in its order), their baselines and modes.
OPS: tuple[str, ...] = op_names()
BASELINES = MappingProxyType({op: definition(op).baselines for op in OPS})
MODES = MappingProxyType({op: definition(op).modes for op in OPS})

__all__ = [
    "BASELINES", "DTYPES", "FAILED", "EPS", "GN_GROUPS", "LAYOUTS", "LR", "MODES", "MOMENTUM", "OPS", "PEAK_CPU", "PEAK_CUDA",
    "WEIGHT_DECAY", "WS_EPS", "BenchOp", "Case", "EagerGroupNormAct", "EagerStdConv2d", "Progress", "Result", "Skip",
    "Spec", "check_and_peak", "copy_bandwidth", "cpu_model", "default_device", "definition", "dtypes",
    "eager_batch_norm_relu", "eager_group_norm_relu", "eager_group_norm_relu_add", "eager_weight_standardize",
    "environment", "format_table", "grid", "implementations", "is_baseline", "layouts", "make_case", "measure",
    "op_names", "ops_table", "peak_memory", "register", "run", "shapes", "skip_reason", "skip_summary", "speedups",
    "synced", "time_fn", "to_json", "to_markdown", "train_model", "write_reports",
]


def __getattr__(name: str):
    # train_model lives with the train-step definition.
    if name == "train_model":
        from bitfast.bench.ops.train_step import train_model

        return train_model
    raise AttributeError(f"module 'bitfast.bench' has no attribute {name!r}")
