"""BiT-R50x1 training step on CPU (128x128, batch 16, fp32, channels_last) in interleaved
rounds: bitfast (auto backends: the C++ kernels and FusedSGD), bitfast's model under
``torch.compile`` (``bitfast-compile``), the timm-style eager baseline (``eager``) and its
``torch.compile`` (``compile``), built by the same case factory as ``bitfast bench``.

Each variant is compiled and checked first (the two compiles take minutes on 2 cores); then
every round times each variant in turn (3 steps after one warm-up step; the order rotates
from round to round). The report gives each variant's minimum and median over the rounds
(seconds per step and img/s) and every ratio to the eager and the compiled baselines.

The GPU-only variants (``bitfast-cudagraphs``, the whole step in a CUDA graph, and
``compile-reduce-overhead``) are not for this CPU tool: ``tools/gpu_check.sh``'s train-step
table (``bitfast bench --ops train_step`` on a GPU) measures them beside the others.

    python tools/train_step_ab.py [--rounds 7] [--variants bitfast,bitfast-compile,eager,compile] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bitfast import bench

SHAPE, BATCH = "R50x1 128px b16", 16


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--variants", default="bitfast,bitfast-compile,eager,compile")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    cases = {}
    for impl in variants:
        t0 = time.perf_counter()
        spec = bench.Spec("train_step", SHAPE, "fp32", "channels_last", "step", impl)
        cases[impl] = bench.make_case(spec, "cpu", quick=False)
        cases[impl].check()
        print(f"{impl}: built and checked in {time.perf_counter() - t0:.0f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for k in order:
            ts = bench.time_fn(cases[k].fn, "cpu", min_time=0.0, min_reps=3, max_reps=3, warmup=1)
            times[k].append(statistics.median(ts))
        print(f"round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.3f} s" for k in variants), flush=True)
    summary = {k: {"min_s": min(v), "median_s": statistics.median(v), "img_per_s_at_min": BATCH / min(v),
                   "rounds_s": v} for k, v in times.items()}
    print(f"\nR50x1 train step, CPU, {SHAPE}, fp32 channels_last; {args.rounds} interleaved rounds; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print("| variant | min s/step | median s/step | img/s (min) |")
    print("|---|---|---|---|")
    for k, s in summary.items():
        print(f"| {k} | {s['min_s']:.3f} | {s['median_s']:.3f} | {s['img_per_s_at_min']:.1f} |")
    ratios = {}
    for k in summary:
        for base in ("eager", "compile"):
            if base in summary and k != base:
                ratios[f"{k} vs {base}"] = summary[base]["min_s"] / summary[k]["min_s"]
    for name, x in ratios.items():
        print(f"{name}: {x:.2f}x (by minimum)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "ratios": ratios, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "rounds": args.rounds}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
