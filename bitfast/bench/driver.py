"""The driver of ``bitfast bench``: check, measure and time every case of the grid, with a
progress line."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence

import torch

from bitfast.bench import harness
from bitfast.bench.harness import Case, Skip, Spec, default_device, grid, is_baseline, make_case
from bitfast.bench.report import Result, environment
from bitfast.bench.timing import copy_bandwidth, peak_memory, time_fn

__all__ = ["FAILED", "Progress", "check_and_peak", "measure", "run"]


class Progress:
    """A one-line progress bar on stderr (a plain line per step when not a terminal)."""

    def __init__(self, total: int, stream=None, width: int = 30) -> None:
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def step(self, label: str) -> None:
        """One more case done (``label`` names it)."""
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


FAILED = "FAILED: "  # the start of the reason of a case whose setup, check or timing raised


def run(ops: Sequence[str] | None = None, *, device: str | None = None, quick: bool = False, runs: int = 2, progress: bool = True,
        specs: Sequence[Spec] | None = None, impls: Sequence[str] | None = None,
        ) -> tuple[dict, list[Result], list[tuple[Spec, str]]]:
    """Measure every case of ``ops`` (or the given ``specs``), only the implementations
    ``impls`` when given; returns (meta, results, skipped).

    A case that raises (a compile or a capture that fails on this machine) does not end the
    run: it is listed in ``skipped`` with a reason starting ``FAILED: `` and the next case
    runs, so that one failure costs one row, not a whole GPU lease's table."""
    device = device or default_device()
    ops = harness.op_names() if ops is None else ops
    meta = environment(device)
    meta["copy_GBps"] = round(copy_bandwidth(device), 2)
    meta["quick"] = quick
    meta["runs"] = runs
    specs = list(specs) if specs is not None else [s for op in ops for s in grid(op, device, quick)]
    if impls is not None:
        specs = [s for s in specs if s.impl in impls]
    bar = Progress(len(specs)) if progress else None
    results, skipped = [], []
    for spec in specs:
        # The train step on a GPU takes about 0.1 s: a second per run gives about ten steps.
        min_time = 1.0 if spec.op == "train_step" and device.startswith("cuda") else 0.1 if quick else 0.3
        outcome = ""
        try:
            case = make_case(spec, device, quick=quick)
            results.append(measure(case, runs=runs, min_time=min_time, copy_gbps=meta["copy_GBps"]))
            outcome = f": {results[-1].time_s * 1e3:.3f} ms"
            del case
        except Skip as exc:
            skipped.append((spec, str(exc)))
            outcome = ": skipped"
        except Exception as exc:  # noqa: BLE001 (reported, and the run goes on)
            skipped.append((spec, f"{FAILED}{type(exc).__name__}: {str(exc)[:300]}"))
            outcome = f": {skipped[-1][1]}"
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        if bar:
            bar.step(f"{spec.op} {spec.shape} {spec.dtype} {spec.mode} {spec.impl}{outcome}")
    return meta, results, skipped
