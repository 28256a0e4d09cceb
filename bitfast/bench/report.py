"""Results of the benchmarks and their reports: one table (time, spread, GB/s, % of the copy
bandwidth, img/s, peak memory, speed-up over each baseline), JSON and markdown files with the
device, versions and commit, and the table of what is benchmarked (from the registry)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
from collections.abc import Sequence

import torch

from bitfast.bench import harness

__all__ = ["Result", "cpu_model", "environment", "format_table", "ops_table", "speedups", "to_json", "to_markdown",
           "write_reports"]


@dataclasses.dataclass
class Result:
    """One measured case: its spec, the median time of each run, and what the derived
    figures (GB/s, % of copy bandwidth, img/s, speed-ups) need."""

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
    baselines measured for the same op, shape, dtype, layout and mode; with more than one
    compiled baseline (``compile``, ``compile-<mode>``) also ``"best compile"``, the fastest
    of them."""
    base: dict[tuple, dict[str, float]] = {}
    for r in results:
        if r.baseline:
            base.setdefault(r.group, {})[r.impl] = r.time_s
    out = {}
    for i, r in enumerate(results):
        times = base.get(r.group, {})
        ups = {b: t / r.time_s for b, t in times.items() if b != r.impl}
        compiled = [t for b, t in times.items() if b == "compile" or b.startswith("compile-")]
        if len(compiled) > 1:
            ups["best compile"] = min(compiled) / r.time_s
        out[i] = ups
    return out


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
    """The CPU's model name."""
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

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "-C", root, "log", "-1", "--format=%h %s"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip()[:80] + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def to_json(meta: dict, results: Sequence[Result], skipped: Sequence[tuple[harness.Spec, str]]) -> str:
    """The results, skips and environment as a JSON document."""
    return json.dumps(
        {
            "meta": meta,
            "results": [r.as_dict() for r in results],
            "skipped": [dict(dataclasses.asdict(s), reason=why) for s, why in skipped],
        },
        indent=1,
        default=str,
    )


def write_reports(meta: dict, results: Sequence[Result], skipped: Sequence[tuple[harness.Spec, str]], *,
                  json_path: str | None = None, markdown_path: str | None = None) -> None:
    """Write the results as JSON (``to_json``) and as a markdown report (``to_markdown``)
    to the paths given (None: not written)."""
    if json_path:
        with open(json_path, "w") as f:
            f.write(to_json(meta, results, skipped))
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(to_markdown(meta, results, skipped))


def skip_summary(skipped: Sequence[tuple[harness.Spec, str]]) -> list[str]:
    """Distinct skip reasons with how many cases each covers."""
    counts: dict[tuple[str, str], int] = {}
    for spec, why in skipped:
        counts[(spec.impl, why)] = counts.get((spec.impl, why), 0) + 1
    return [f"{impl} ({n} cases): {why}" for (impl, why), n in sorted(counts.items())]


def to_markdown(meta: dict, results: Sequence[Result], skipped: Sequence[tuple[harness.Spec, str]]) -> str:
    """The results as a markdown report: the environment, the table, what was not measured."""
    lines = [f"# bitfast bench: {meta.get('device')}, {meta.get('date')}", ""]
    for k, v in meta.items():
        lines.append(f"- {k}: {v}")
    lines += ["", format_table(results), ""]
    if skipped:
        lines += ["Not measured:", ""] + [f"- {s}" for s in skip_summary(skipped)] + [""]
    return "\n".join(lines)


def ops_table() -> str:
    """The markdown table of what is benchmarked (op, modes, bitfast's implementations, the
    baselines), from the registry: README.md and benchmarks/README.md hold it verbatim
    between ``<!-- bench-ops:begin/end -->`` markers (tests/bench/test_bench.py checks that they agree)."""
    lines = ["| op | modes | bitfast | baselines |", "|---|---|---|---|"]
    for name in harness.op_names():
        d = harness.definition(name)
        lines.append(f"| {d.title or f'`{name}`'} | {', '.join(d.modes)} | {d.own_notes} | {d.baseline_notes} |")
    return "\n".join(lines)
