"""GroupNorm+ReLU (and the other norm ops) on CPU: bitfast's C++ kernels against the
timm-style eager baseline (``F.group_norm`` then ``relu_``), measured in interleaved rounds
with the same case factory as ``bitfast bench``, so that the slow drifts of a shared
machine hit both sides alike. Prints one line per (shape, dtype, layout, mode) with the
median time of each side and the ratio, then a markdown table.

    python tools/norm_ab.py [--ops group_norm_relu,batch_norm_relu] [--dtypes fp32,bf16]
                                 [--shapes 16x1024x8x8,16x2048x4x4] [--rounds 5] [--threads 2]

Without ``--shapes`` the shapes are those of ``bitfast bench`` on CPU.
"""

import argparse
import statistics

import torch

from bitfast import bench

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--ops", default="group_norm_relu", help="comma-separated norm ops of bitfast bench")
p.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16")
p.add_argument("--layouts", default="channels_last,nchw", help="comma-separated: channels_last, nchw")
p.add_argument("--shapes", default=None, help="comma-separated NxCxHxW shapes instead of the bench's")
p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is kept)")
p.add_argument("--min-time", type=float, default=0.05, help="seconds of calls per case per round")
p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
args = p.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

impls = ("eager", "cpp")
rows = []
for op in args.ops.split(","):
    if args.shapes:
        table = {s: tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")}
    else:
        table = bench.shapes(op, "cpu", False)
    for shape, value in table.items():
        for dt in args.dtypes.split(","):
            for lay in args.layouts.split(","):
                for mode in ("fwd", "bwd", "full"):
                    cases = {i: bench.make_case(bench.Spec(op, shape, dt, lay, mode, i), "cpu", shape=value) for i in impls}
                    for c in cases.values():
                        c.check()
                    t = {i: [] for i in impls}
                    for _ in range(args.rounds):
                        for i in impls:
                            samples = bench.time_fn(cases[i].fn, "cpu", min_time=args.min_time, warmup=1)
                            t[i].append(statistics.median(samples))
                    med = {i: statistics.median(v) for i, v in t.items()}
                    ratio = med["eager"] / med["cpp"]
                    rows.append((op, shape, dt, lay, mode, med["eager"], med["cpp"], ratio))
                    print(f"{op:20} {shape:28} {dt} {lay:13} {mode:4} eager {med['eager'] * 1e6:8.1f} us "
                          f"cpp {med['cpp'] * 1e6:8.1f} us  x{ratio:.2f}", flush=True)

print()
print("| op | shape | dtype | layout | mode | eager us | cpp us | speed-up |")
print("|---|---|---|---|---|---|---|---|")
for op, shape, dt, lay, mode, e, c, r in rows:
    print(f"| {op} | {shape} | {dt} | {lay} | {mode} | {e * 1e6:.1f} | {c * 1e6:.1f} | {r:.2f}x |")
print()
print("torch", torch.__version__, "threads", torch.get_num_threads(), "rounds", args.rounds)
