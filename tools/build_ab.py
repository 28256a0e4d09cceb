"""A/B of two builds of bitfast's C++ norm kernels on CPU: the native GroupNorm+ReLU and
BatchNorm+ReLU ops (forward and backward, called directly, under ``torch.no_grad``) of this
tree against those of another checkout with its own built ``bitfast._C`` (for example a
``git worktree`` of an older commit, built with ``python setup.py build_ext --inplace``).

Each round runs one child process per tree, in alternating order (A B, then B A); each
child reports its best time per case. The report gives, per tree, the fastest of the
rounds (interference from other work on the machine only adds time, so the minimum is the
steadiest statistic) and the median, and the ratio of the minima. On the shared 2-core
development machine, an A/A run (a tree against itself) read up to 1.4x apart in medians of
6 rounds: differences under about 10% need many rounds and an A/A run beside them.

    python tools/build_ab.py OTHER_TREE [--rounds 7] [--threads 2] [--dtypes fp32,bf16]
        [--layouts nchw,channels_last] [--gn-shapes 16x2048x4x4,...] [--bn-shapes ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# BiT's late stages at small batch, where a call is short and per-row costs show, and two
# larger shapes (R50x1 stage 3 and stage 1 at batch 2).
GN_SHAPES = "16x2048x4x4,1x2048x7x7,16x512x4x4,2x1024x14x14,2x64x56x56"
BN_SHAPES = "16x2048x4x4,16x512x7x7"

CHILD = r"""
import json, sys, time, torch
import bitfast  # noqa: F401  (loads bitfast._C)
threads, dtypes, layouts, gn_shapes, bn_shapes = json.loads(sys.argv[1])
torch.set_num_threads(threads)
ops = torch.ops.bitfast
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}
FMT = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

def best(fn, total=0.25, reps=5):
    for _ in range(3):
        fn()
    out = float("inf")
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            e = time.perf_counter() - t0
            if e > total / reps:
                break
        out = min(out, e / n)
    return out * 1e6

res = {}
torch.manual_seed(0)
with torch.no_grad():
    for dn in dtypes:
        for ln in layouts:
            for s in gn_shapes:
                shape = tuple(map(int, s.split("x")))
                x = torch.randn(shape).to(DT[dn]).contiguous(memory_format=FMT[ln])
                w, b = torch.randn(shape[1]), torch.randn(shape[1])
                y, m, r = ops.native_group_norm_relu_fwd(x, w, b, 32, 1e-5, True)
                g = torch.randn_like(y)
                res[f"GN {s} {dn} {ln} fwd"] = best(lambda: ops.native_group_norm_relu_fwd(x, w, b, 32, 1e-5, True))
                res[f"GN {s} {dn} {ln} bwd"] = best(lambda: ops.native_group_norm_relu_bwd(g, x, w, b, m, r, 32, True))
            for s in bn_shapes:
                shape = tuple(map(int, s.split("x")))
                x = torch.randn(shape).to(DT[dn]).contiguous(memory_format=FMT[ln])
                w, b = torch.randn(shape[1]), torch.randn(shape[1])
                y, m, v = ops.native_batch_norm_relu_fwd(x, None, None, w, b, True, 1e-5, True)
                g = torch.randn_like(y)
                res[f"BN {s} {dn} {ln} fwd"] = best(
                    lambda: ops.native_batch_norm_relu_fwd(x, None, None, w, b, True, 1e-5, True))
                res[f"BN {s} {dn} {ln} bwd"] = best(
                    lambda: ops.native_batch_norm_relu_bwd(g, x, w, b, m, v, True, 1e-5, True))
print(json.dumps(res))
"""


def run_child(tree: str, config: list) -> dict[str, float]:
    """One child process on ``tree``'s bitfast: {case: best microseconds}."""
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"build_ab: the run on {tree} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    """Run the interleaved rounds and print one line per case (and a markdown table)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other", help="the other checkout (its bitfast/_C*.so built)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--layouts", default="nchw")
    p.add_argument("--gn-shapes", default=GN_SHAPES)
    p.add_argument("--bn-shapes", default=BN_SHAPES)
    args = p.parse_args(argv)
    other = os.path.abspath(args.other)
    if not os.path.isdir(os.path.join(other, "bitfast")):
        p.error(f"{other} has no bitfast package")
    split = lambda v: [s for s in v.split(",") if s]  # noqa: E731
    config = [args.threads, split(args.dtypes), split(args.layouts), split(args.gn_shapes), split(args.bn_shapes)]
    trees = {"this": ROOT, "other": other}
    times: dict[str, dict[str, list[float]]] = {k: {} for k in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for name in order:
            for case, us in run_child(trees[name], config).items():
                times[name].setdefault(case, []).append(us)
    print(f"{args.rounds} rounds, {args.threads} threads; this: {ROOT}; other: {other}")
    print("| case | other us (min / median) | this us (min / median) | this vs other (min) |")
    print("|---|---|---|---|")
    for case in times["this"]:
        a, b = times["other"][case], times["this"][case]
        print(f"| {case} | {min(a):.1f} / {statistics.median(a):.1f} | {min(b):.1f} / {statistics.median(b):.1f} "
              f"| {min(a) / min(b):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
