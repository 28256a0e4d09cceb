"""Timing, bandwidth and memory of benchmark cases: device-synchronized timings, the copy
bandwidth measured in the same process, and the peak memory of one call."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from bitfast.bench.harness import Case

__all__ = ["PEAK_CPU", "PEAK_CUDA", "copy_bandwidth", "input_sets", "l2_bytes", "peak_memory", "sync", "synced",
           "time_fn"]

# Peak memory measured by the CUDA caching allocator, or on CPU by the process's resident
# high-water mark (reset through /proc/self/clear_refs): a coarser, whole-process figure.
PEAK_CUDA = "CUDA max_memory_allocated increase during one call"
PEAK_CPU = "resident-set high-water increase during one call (whole process)"


def sync(device: str) -> None:
    """Wait for the device (a no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def l2_bytes(device: str) -> int:
    """The L2 cache size of a CUDA device (0 on CPU)."""
    if device.startswith("cuda"):
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    return 0


def input_sets(device: str, set_bytes: int, limit: int = 8) -> int:
    """How many input sets to rotate through so the working set exceeds the L2 cache
    (three times over); one on CPU."""
    l2 = l2_bytes(device)
    if not l2 or set_bytes <= 0:
        return 1
    return max(1, min(limit, math.ceil(3 * l2 / set_bytes)))


def time_fn(fn: Callable, device: str, *, min_time: float = 0.2, min_reps: int = 3, max_reps: int = 200, warmup: int = 2) -> list[float]:
    """Seconds per call of ``fn``, one sample per call, after ``warmup`` calls; calls are
    repeated until ``min_time`` has passed (at least ``min_reps``, at most ``max_reps``).
    CUDA: events around each call, synchronized at the end."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    sync(device)
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
