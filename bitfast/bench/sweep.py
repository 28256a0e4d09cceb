"""A sweep of launch configurations of the kernels that should run at the memory floor:
GroupNorm+ReLU forward and backward, and the SGD step, on the ``triton`` and ``cuda``
backends, timed at the kernel level (the launchers and native ops, without the op layer)
next to the same run's copy bandwidth and the baselines a user would pick (eager, and
``torch.optim.SGD(fused=True)`` for the step; ``torch.compile`` of the eager GroupNorm
when asked, as it costs a compile per shape and direction).

The grids are small on purpose: a lent GPU gives minutes, and one call of
``tools/gpu_check.sh`` must both measure and pick. Triton configurations are
``bitfast.kernels.group_norm_relu.GroupNormConfig`` and
``bitfast.kernels.sgd_momentum.SgdConfig`` objects passed to the launchers; CUDA ones are
the process-wide launch settings of ``bitfast._native.cuda_launch_config``
(csrc/cuda/launch_config.h). Every configuration is checked against a float64 evaluation of
the reference before it is timed; one that fails (a compile error, a wrong result, an
input it does not serve) is reported with the reason and skipped, never aborting the sweep.

``run_sweep`` returns the rows; ``write_reports`` writes markdown and JSON;
``tools/kernel_sweep.py`` is the command. ``dry=True`` runs every configuration once on
tiny shapes (the Triton interpreter on a CPU; CUDA skipped), to prove the code path
without a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable

import torch

from bitfast import _native, backends
from bitfast.bench import harness as h
from bitfast.bench.layers import param_shapes
from bitfast.bench.timing import copy_bandwidth, input_sets, time_fn

__all__ = [
    "CUDA_GN_KNOBS", "CUDA_SGD_KNOBS", "GN_SHAPES", "TARGET_GN_SHARE", "TRITON_GN_CONFIGS", "TRITON_SGD_CONFIGS",
    "Row", "run_sweep", "summarize_ncu_csv", "targets", "write_reports",
]

# The targets of docs/performance.md this sweep reports on.
TARGET_GN_SHARE = 0.70  # GroupNorm+ReLU fwd and bwd: at least 70% of the same run's copy bandwidth

# BiT-R50x1 activations at batch 128, 224x224 (GPU) and tiny stand-ins with the same group
# widths (dry run): stage 1's 2 channels per group and stage 4's 64.
GN_SHAPES = {"R50x1 s1 mid": (128, 64, 56, 56), "R50x1 s4 out": (128, 2048, 7, 7)}
DRY_GN_SHAPES = {"R50x1 s1 mid": (2, 64, 3, 3), "R50x1 s4 out": (2, 2048, 1, 1)}
DRY_SGD_SHAPES = [(64, 3, 7, 7), (64,), (256, 64, 1, 1), (1000, 2048, 1, 1), (1000,)]


def _triton_gn_configs() -> list:
    from bitfast.kernels.group_norm_relu import GroupNormConfig as C

    # each configuration compiles once per shape and direction (about a second on a GPU)
    return [
        C(), C(tile=8192), C(tile=16384), C(num_warps=4),
        C(groups_per_program=4), C(groups_per_program=8, tile=8192),
        C(groups_per_program=32, tile=16384, num_warps=16),
    ]


def _triton_sgd_configs() -> list:
    from bitfast.kernels.sgd_momentum import SgdConfig as C

    return [
        C(), C(aligned=True), C(block=1024, aligned=True), C(block=4096, blocks_per_chunk=2, aligned=True),
        C(blocks_per_chunk=16, aligned=True), C(num_warps=4, aligned=True),
    ]


# Each is a function so that importing this module does not import Triton.
TRITON_GN_CONFIGS: Callable[[], list] = _triton_gn_configs
TRITON_SGD_CONFIGS: Callable[[], list] = _triton_sgd_configs

# CUDA launch settings (name=value; {} is the built-in choice), see csrc/cuda/launch_config.h.
CUDA_GN_KNOBS: list[dict[str, int]] = [
    {},
    {"gn_fwd_threads": 128}, {"gn_fwd_threads": 256}, {"gn_fwd_threads": 512},
    {"gn_fwd_vec_bytes": 8}, {"gn_fwd_vec_bytes": 1},
    {"gn_split_target": 256}, {"gn_split_target": 1024}, {"gn_split_target": 2048},
    {"gn_pointwise_threads": 128}, {"gn_pointwise_vectors": 4}, {"gn_pointwise_vectors": 16},
]
CUDA_SGD_KNOBS: list[dict[str, int]] = [
    {},
    {"sgd_threads": 128}, {"sgd_threads": 512}, {"sgd_threads": 1024},
    {"sgd_chunk": 8192}, {"sgd_chunk": 131072},
    {"sgd_unroll": 2}, {"sgd_unroll": 4}, {"sgd_threads": 512, "sgd_unroll": 2, "sgd_chunk": 65536},
]

# which CUDA settings act on which direction (the others are skipped there: same launch)
_GN_FWD_KNOBS = {"gn_fwd_threads", "gn_fwd_vec_bytes"}
_GN_BWD_KNOBS = {"gn_split_target", "gn_pointwise_threads", "gn_pointwise_vectors"}


@dataclasses.dataclass
class Row:
    """One measurement (or a configuration that could not be measured, with why)."""

    kernel: str  # gn_fwd, gn_bwd, sgd
    shape: str
    impl: str  # triton, cuda, or a baseline: eager, compile, sgd_fused, sgd_foreach
    config: str  # the configuration's label ("default", "name=value,...", "-" for a baseline)
    status: str = "ok"  # ok, or the reason it was not measured
    ms: float | None = None
    gbps: float | None = None
    pct_copy: float | None = None
    vs_baseline: dict[str, float] = dataclasses.field(default_factory=dict)  # baseline time / this time
    best: bool = False
    bytes_floor: int = 0


def _label(knobs: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in knobs.items()) or "default"


def _median_s(fn: Callable, device: str, min_time: float) -> float:
    return statistics.median(time_fn(fn, device, min_time=min_time, min_reps=3, max_reps=200, warmup=2))


def _skipped(row, why: str | None, clock) -> bool:
    """Mark ``row`` skipped, saying why, when its implementation cannot run here (``why``) or
    the sweep's time is spent; whether it was."""
    if why:
        row.status = f"skipped: {why}"
    elif clock.out():
        row.status = "skipped: out of the sweep's time"
    return row.status.startswith("skipped")


class _Clock:
    """The sweep's time budget: measurements stop starting once it is spent."""

    def __init__(self, budget_s: float | None) -> None:
        self.end = None if budget_s is None else time.monotonic() + budget_s

    def out(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


def _gn_inputs(shape, device, dtype, nsets):
    n, c = shape[:2]
    sets = []
    for _ in range(nsets):
        x = (torch.randn(shape, device=device) * 1.5 + 0.3).to(dtype).contiguous(memory_format=torch.channels_last)
        dy = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        sets.append((x, dy))
    w = 1 + 0.1 * torch.randn(c, device=device)
    b = 0.1 * torch.randn(c, device=device)
    return sets, w, b


def _gn_reference(x, dy, w, b):
    """float64 (y, mean, rstd) and (dx, dw, db) of the reference."""
    from bitfast.ops import reference

    x64, dy64, w64, b64 = x.double(), dy.double(), w.double(), b.double()
    y, mean, rstd = reference.group_norm_relu_forward(x64, w64, b64, h.GN_GROUPS, h.EPS, True)
    grads = reference.group_norm_relu_backward(dy64, x64, w64, b64, mean, rstd, h.GN_GROUPS, True)
    return (y, mean, rstd), grads


def _gn_kernels(impl: str, config) -> tuple[Callable, Callable, Callable]:
    """(fwd(x, w, b), bwd(dy, x, w, b, mean, rstd), context) of a backend and configuration."""
    import contextlib

    if impl == "triton":
        from bitfast.kernels import group_norm_relu as K

        def fwd(x, w, b):
            return K.group_norm_relu_fwd(x, w, b, h.GN_GROUPS, h.EPS, True, config=config)

        def bwd(dy, x, w, b, mean, rstd):
            return K.group_norm_relu_bwd(dy, x, w, b, mean, rstd, h.GN_GROUPS, True, config=config)

        return fwd, bwd, contextlib.nullcontext

    def fwd(x, w, b):
        return torch.ops.bitfast.native_group_norm_relu_fwd(x, w, b, h.GN_GROUPS, h.EPS, True)

    def bwd(dy, x, w, b, mean, rstd):
        return torch.ops.bitfast.native_group_norm_relu_bwd(dy, x, w, b, mean, rstd, h.GN_GROUPS, True)

    return fwd, bwd, lambda: _native.cuda_launch_config(**config)


def _unavailable(impl: str, family: str, device: str, dtype, dry: bool) -> str | None:
    """Why ``impl`` cannot run here (None: it can). On a CPU the Triton kernels run under
    the interpreter (TRITON_INTERPRET=1), which the dry run drives directly."""
    import os

    if not device.startswith("cuda"):
        if impl == "cuda":
            return "cuda: no GPU (dry run)" if dry else "cuda: no GPU"
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "triton: no GPU, and TRITON_INTERPRET=1 is not set"
        return None
    return "; ".join(backends.not_supported_reasons(impl, family, "cuda", dtype)) or None


def _gn_call(kernel, fwd, bwd, sets, w, b) -> Callable:
    """The timed call of one direction, rotating through the input sets (the backward's
    statistics come from a forward run beforehand)."""
    rot = h.Rotor(len(sets))
    if kernel == "gn_fwd":

        def call():
            x, _ = sets[rot.next()]
            return fwd(x, w, b)

        return call
    saved = [fwd(x, w, b) for x, _ in sets]

    def call():
        i = rot.next()
        x, dy = sets[i]
        return bwd(dy, x, w, b, saved[i][1], saved[i][2])

    return call


def _sweep_gn(device, dtype, shapes, min_time, clock, rows, dry, inductor, log):
    es = torch.tensor([], dtype=dtype).element_size()
    for label, shape in shapes.items():
        n, c, hh, ww = shape
        numel = n * c * hh * ww
        floors = {"gn_fwd": 2 * numel * es + 2 * c * 4, "gn_bwd": 3 * numel * es + 4 * c * 4}
        nsets = 1 if dry else input_sets(device, 3 * numel * es)
        sets, w, b = _gn_inputs(shape, device, dtype, nsets)
        ref_fwd, ref_bwd = _gn_reference(sets[0][0], sets[0][1], w, b)
        shape_label = f"{label} {n}x{c}x{hh}x{ww}"

        # baselines: eager (and compile) through the benchmark's own cases
        base_impls = ["eager"] + (["compile"] if inductor else [])
        for impl in base_impls:
            for kernel, mode in (("gn_fwd", "fwd"), ("gn_bwd", "bwd")):
                row = Row(kernel, shape_label, impl, "-", bytes_floor=floors[kernel])
                rows.append(row)
                if clock.out():
                    row.status = "skipped: out of the sweep's time"
                    continue
                try:
                    spec = h.Spec("group_norm_relu", label, "bf16" if dtype == torch.bfloat16 else "fp32",
                                  "channels_last", mode, impl)
                    case = h.make_case(spec, device, shape=shape)
                    case.check()
                    row.ms = _median_s(case.fn, device, min_time) * 1e3
                except Exception as exc:  # a failing baseline is reported, the sweep goes on
                    row.status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                log(row)

        grid = {"triton": TRITON_GN_CONFIGS(), "cuda": CUDA_GN_KNOBS}
        for impl, configs in grid.items():
            why = _unavailable(impl, "group_norm_relu", device, dtype, dry)
            for config in configs:
                label_c = config.label() if impl == "triton" else _label(config)
                for kernel in ("gn_fwd", "gn_bwd"):
                    if impl == "cuda" and config:
                        acts = _GN_FWD_KNOBS if kernel == "gn_fwd" else _GN_BWD_KNOBS
                        if not set(config) & acts:
                            continue  # the same launch as the default for this direction
                    row = Row(kernel, shape_label, impl, label_c, bytes_floor=floors[kernel])
                    rows.append(row)
                    if _skipped(row, why, clock):
                        continue
                    try:
                        fwd, bwd, ctx = _gn_kernels(impl, config)
                        with ctx():
                            x0, dy0 = sets[0]
                            y, mean, rstd = fwd(x0, w, b)
                            if kernel == "gn_fwd":
                                h.close(f"{kernel} [{impl} {label_c}]", (y, mean, rstd), ref_fwd, dtype)
                            else:
                                got = bwd(dy0, x0, w, b, mean, rstd)
                                h.close(f"{kernel} [{impl} {label_c}]", got, ref_bwd, dtype)
                            if dry:
                                row.status = "ok (dry run: checked, not timed)"
                            else:
                                row.ms = _median_s(_gn_call(kernel, fwd, bwd, sets, w, b), device, min_time) * 1e3
                    except Exception as exc:  # a failing configuration is reported and skipped
                        row.status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    log(row)


def _sgd_tensors(shapes, device):
    params = [torch.randn(s, device=device) for s in shapes]
    grads = [0.01 * torch.randn(s, device=device) for s in shapes]
    bufs = [0.01 * torch.randn(s, device=device) for s in shapes]
    return params, grads, bufs


def _sgd_step(impl, config, params, grads, bufs) -> Callable:
    """One SGD step of the ``triton`` launcher with ``config``, or of the native CUDA op
    (whose launch settings the caller sets)."""
    if impl == "triton":
        from bitfast.kernels import sgd_momentum as K

        def step():
            K.sgd_momentum_(params, grads, bufs, h.LR, h.MOMENTUM, 0.0, h.WEIGHT_DECAY, False, False, False,
                            config=config)

        return step

    def step():
        torch.ops.bitfast.native_sgd_momentum_(params, grads, bufs, h.LR, h.MOMENTUM, 0.0, h.WEIGHT_DECAY, False,
                                               False, False, None, [], 0.0)

    return step


def _sweep_sgd(device, shapes, label, min_time, clock, rows, dry, log):
    from bitfast.ops import reference

    numel = sum(math.prod(s) for s in shapes)
    floor = 5 * numel * 4
    shape_label = f"{label} ({len(shapes)} tensors, {numel / 1e6:.2f}M)"
    for impl in ("sgd_fused", "sgd_foreach"):
        row = Row("sgd", shape_label, impl, "-", bytes_floor=floor)
        rows.append(row)
        if clock.out():
            row.status = "skipped: out of the sweep's time"
            continue
        try:
            case = h.make_case(h.Spec("sgd_momentum", "R50x1 all params", "fp32", "-", "step", impl), device,
                               shape=list(shapes))
            case.check()
            row.ms = _median_s(case.fn, device, min_time) * 1e3
        except Exception as exc:
            row.status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        log(row)

    base = _sgd_tensors(shapes, device)
    grid = {"triton": TRITON_SGD_CONFIGS(), "cuda": CUDA_SGD_KNOBS}
    for impl, configs in grid.items():
        why = _unavailable(impl, "sgd_momentum", device, torch.float32, dry)
        for config in configs:
            label_c = config.label() if impl == "triton" else _label(config)
            row = Row("sgd", shape_label, impl, label_c, bytes_floor=floor)
            rows.append(row)
            if _skipped(row, why, clock):
                continue
            try:
                params, grads, bufs = ([t.clone() for t in ts] for ts in base)
                step = _sgd_step(impl, config, params, grads, bufs)
                ctx = _native.cuda_launch_config(**config) if impl == "cuda" else _nullcontext()
                with ctx:
                    p64 = [p.double() for p in params]
                    m64 = [m.double() for m in bufs]
                    reference.sgd_momentum_(p64, [gr.double() for gr in grads], m64, h.LR, h.MOMENTUM, 0.0,
                                            h.WEIGHT_DECAY, False, False, False)
                    step()
                    h.close(f"sgd [{impl} {label_c}] params", params, p64, torch.float32)
                    h.close(f"sgd [{impl} {label_c}] buffers", bufs, m64, torch.float32)
                    if dry:
                        row.status = "ok (dry run: checked, not timed)"
                    else:
                        row.ms = _median_s(step, device, min_time) * 1e3
            except Exception as exc:
                row.status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            log(row)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def _finish(rows: list[Row], copy_gbps: float) -> None:
    """GB/s, share of the copy bandwidth, ratios to the baselines, and the best
    configuration of each (kernel, shape, backend)."""
    baselines = {}
    for r in rows:
        if r.ms and r.config == "-":
            baselines[(r.kernel, r.shape, r.impl)] = r.ms
    for r in rows:
        if not r.ms:
            continue
        r.gbps = r.bytes_floor / (r.ms * 1e-3) / 1e9
        r.pct_copy = 100.0 * r.gbps / copy_gbps if copy_gbps else None
        if r.config != "-":
            r.vs_baseline = {impl: round(ms / r.ms, 3) for (k, s, impl), ms in baselines.items()
                             if k == r.kernel and s == r.shape}
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.ms and r.config != "-":
            groups.setdefault((r.kernel, r.shape, r.impl), []).append(r)
    for members in groups.values():
        min(members, key=lambda r: r.ms).best = True


def targets(rows: list[Row]) -> list[dict]:
    """Each target of docs/performance.md this sweep measures: met, not met, or not measured."""
    out = []
    for kernel in ("gn_fwd", "gn_bwd"):
        for shape in dict.fromkeys(r.shape for r in rows if r.kernel == kernel):
            own = [r for r in rows if r.kernel == kernel and r.shape == shape and r.ms and r.config != "-"]
            name = f"{kernel} {shape}: >= {TARGET_GN_SHARE:.0%} of copy bandwidth"
            if not own or own[0].pct_copy is None:
                out.append({"target": name, "status": "not measured"})
                continue
            best = max(own, key=lambda r: r.pct_copy)
            out.append({"target": name, "status": "met" if best.pct_copy >= 100 * TARGET_GN_SHARE else "not met",
                        "best": f"{best.impl} {best.config}: {best.pct_copy:.0f}%"})
    for shape in dict.fromkeys(r.shape for r in rows if r.kernel == "sgd"):
        own = [r for r in rows if r.kernel == "sgd" and r.shape == shape and r.ms and r.config != "-"]
        fused = [r for r in rows if r.kernel == "sgd" and r.shape == shape and r.impl == "sgd_fused" and r.ms]
        name = f"sgd {shape}: faster than torch.optim.SGD(fused=True)"
        if not own or not fused:
            out.append({"target": name, "status": "not measured"})
            continue
        best = min(own, key=lambda r: r.ms)
        out.append({"target": name, "status": "met" if best.ms < fused[0].ms else "not met",
                    "best": f"{best.impl} {best.config}: {best.ms:.3f} ms vs {fused[0].ms:.3f} ms "
                            f"({fused[0].ms / best.ms:.2f}x)"})
    return out


def run_sweep(device: str | None = None, *, dry: bool = False, kernels=("gn", "sgd"), min_time: float = 0.05,
              budget_s: float | None = None, inductor: bool = False, log: Callable[[Row], None] | None = None) -> dict:
    """Run the sweep on ``device`` (default: the GPU when there is one, else a dry run on
    the CPU); returns {"meta", "rows", "targets"}. ``kernels`` picks ``gn`` and/or ``sgd``;
    ``min_time`` is the seconds each configuration is timed for; measurements stop starting
    after ``budget_s`` seconds (the rest are reported as skipped); ``inductor`` adds the
    ``torch.compile`` baseline of GroupNorm (a compile per shape and direction)."""
    device = device or h.default_device()
    if not device.startswith("cuda"):
        dry = True
    for k in kernels:
        if k not in ("gn", "sgd"):
            raise ValueError(f"run_sweep: unknown kernel {k!r}; expected 'gn' and/or 'sgd'")
    log = log or (lambda row: None)
    clock = _Clock(budget_s)
    t0 = time.monotonic()
    dtype = torch.bfloat16
    copy = copy_bandwidth(device, None if device.startswith("cuda") else 16 * 2**20)
    rows: list[Row] = []
    if "gn" in kernels:
        _sweep_gn(device, dtype, DRY_GN_SHAPES if dry else GN_SHAPES, min_time, clock, rows, dry, inductor, log)
    if "sgd" in kernels:
        shapes = DRY_SGD_SHAPES if dry else list(param_shapes("r50x1"))
        _sweep_sgd(device, shapes, "tiny params" if dry else "R50x1 all params", min_time, clock, rows, dry, log)
    _finish(rows, copy)
    meta = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dry_run": dry,
        "dtype": "bf16 channels_last (GroupNorm), fp32 (SGD)",
        "copy_GBps": round(copy, 1),
        "seconds": round(time.monotonic() - t0, 1),
        "min_time_s": min_time,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    return {"meta": meta, "rows": rows, "targets": targets(rows)}


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    """The sweep as markdown: the meta data, the targets, and one table per kernel."""
    meta, rows = result["meta"], result["rows"]
    lines = [f"# Kernel launch sweep: {meta['device']}, {meta['date']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "## Targets", "", "| target | status | best |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['status']} | {t.get('best', '')} |" for t in result["targets"]]
    for kernel, title in (("gn_fwd", "GroupNorm+ReLU forward"), ("gn_bwd", "GroupNorm+ReLU backward"),
                          ("sgd", "SGD step (momentum, weight decay)")):
        sel = [r for r in rows if r.kernel == kernel]
        if not sel:
            continue
        lines += ["", f"## {title}", "",
                  "| shape | impl | config | ms | GB/s | % copy | vs baselines | best | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sel:
            ratios = ", ".join(f"{k} {v:.2f}x" for k, v in r.vs_baseline.items())
            lines.append(f"| {r.shape} | {r.impl} | {r.config} | {_fmt(r.ms, '.4f')} | {_fmt(r.gbps, '.0f')} | "
                         f"{_fmt(r.pct_copy, '.0f')} | {ratios} | {'**best**' if r.best else ''} | {r.status} |")
    return "\n".join(lines) + "\n"


def write_reports(result: dict, out_dir: str) -> tuple[str, str]:
    """Write ``sweep.md`` and ``sweep.json`` into ``out_dir`` (created); returns their paths."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    md, js = os.path.join(out_dir, "sweep.md"), os.path.join(out_dir, "sweep.json")
    with open(md, "w") as f:
        f.write(markdown(result))
    with open(js, "w") as f:
        json.dump({"meta": result["meta"], "targets": result["targets"],
                   "rows": [dataclasses.asdict(r) for r in result["rows"]]}, f, indent=1)
    return md, js


# --------------------------------------------------------------------------------------
# Profiler output
# --------------------------------------------------------------------------------------

_NCU_METRICS = {
    "Duration": "duration",
    "DRAM Throughput": "dram_pct",
    "Memory Throughput": "memory_pct",
    "Compute (SM) Throughput": "sm_pct",
    "Achieved Occupancy": "achieved_occupancy_pct",
    "Theoretical Occupancy": "theoretical_occupancy_pct",
    "Registers Per Thread": "registers",
    "Block Size": "block",
    "Grid Size": "grid",
}


def summarize_ncu_csv(text: str) -> list[dict]:
    """The key metrics of each kernel in ``ncu --csv --page details`` output (the
    SpeedOfLight, Occupancy and LaunchStats sections), with a one-word limiter: ``memory``
    (DRAM or memory throughput above 60% of peak and above the SM's), ``compute`` (the SM's
    above 60% and above memory's), else ``latency`` (neither unit busy: too little work in
    flight, launch overhead, or waits)."""
    import csv
    import io

    # ncu's and the program's own lines may precede or interleave the CSV: keep its rows
    lines = [line for line in text.splitlines() if line.startswith('"')]
    start = next((i for i, line in enumerate(lines) if '"Kernel Name"' in line), None)
    if start is None:
        return []
    kernels: dict[tuple[str, str], dict] = {}
    for rec in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        name, metric = rec.get("Kernel Name"), rec.get("Metric Name")
        if not name or metric not in _NCU_METRICS:
            continue
        k = kernels.setdefault((rec.get("ID", ""), name), {"kernel": name})
        value = (rec.get("Metric Value") or "").replace(",", "")
        try:
            k[_NCU_METRICS[metric]] = float(value)
        except ValueError:
            k[_NCU_METRICS[metric]] = value
        if metric == "Duration":
            k["duration_unit"] = rec.get("Metric Unit", "")
    out = []
    for k in kernels.values():
        mem = max(float(k.get("dram_pct", 0) or 0), float(k.get("memory_pct", 0) or 0))
        sm = float(k.get("sm_pct", 0) or 0)
        k["limiter"] = "memory" if mem >= 60 and mem >= sm else "compute" if sm >= 60 else "latency"
        out.append(k)
    return out
