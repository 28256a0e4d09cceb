"""The cost of bitfast's eager paths, one built tree against another, on CPU: a small
GroupNorm+ReLU forward+backward call (where the Python layer around the kernels shows) and
the BiT-R50x1 training step (128x128, batch 16, fp32, channels_last, FusedSGD), both with
the auto backend.

Each round runs one child process per tree, in alternating order (A B, then B A), each with
that tree first on ``PYTHONPATH``; a child reports its best time per case. The report gives
the minimum over the rounds per tree (interference only adds time) and the ratio B / A.

    python tools/tree_ab.py TREE_A TREE_B [--rounds 9] [--threads 1] [--no-train-step]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, torch
threads, train_step = json.loads(sys.argv[1])
torch.set_num_threads(threads)
import bitfast
from bitfast import bench
from bitfast.ops import group_norm_relu

def best(fn):
    return min(bench.time_fn(fn, "cpu", min_time=0.4, min_reps=20, max_reps=2000, warmup=3)) * 1e6

res = {"bitfast": bitfast.__file__}
torch.manual_seed(0)
for shape in ((2, 64, 8, 8), (16, 512, 4, 4)):
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(shape[1], requires_grad=True)
    b = torch.randn(shape[1], requires_grad=True)
    g = torch.randn(*shape)
    def call():
        group_norm_relu(x, 32, w, b).backward(g)
    res["gn_relu_fwd_bwd " + "x".join(map(str, shape)) + " us"] = best(call)
if train_step:
    spec = bench.Spec("train_step", "R50x1 128px b16", "fp32", "channels_last", "step", "bitfast")
    case = bench.make_case(spec, "cpu", quick=False)
    ts = bench.time_fn(case.fn, "cpu", min_time=0.0, min_reps=3, max_reps=3, warmup=1)
    res["r50x1_train_step ms"] = min(ts) * 1e3
print(json.dumps(res))
"""


def _child(tree: str, threads: int, train_step: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([threads, train_step])], env=env,
                         capture_output=True, text=True, check=True, cwd=os.path.abspath(tree))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tree_a")
    p.add_argument("tree_b")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-train-step", dest="train_step", action="store_false")
    args = p.parse_args(argv)
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for r in range(args.rounds):
        order = (("A", args.tree_a), ("B", args.tree_b)) if r % 2 == 0 else (("B", args.tree_b), ("A", args.tree_a))
        for label, tree in order:
            runs[label].append(_child(tree, args.threads, args.train_step))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"A: {runs['A'][0]['bitfast']}\nB: {runs['B'][0]['bitfast']}")
    print(f"{args.rounds} interleaved rounds, {args.threads} thread(s); minimum over the rounds")
    for key in [k for k in runs["A"][0] if k != "bitfast"]:
        a = min(r[key] for r in runs["A"])
        b = min(r[key] for r in runs["B"])
        print(f"  {key:40s} A {a:10.1f}  B {b:10.1f}  B/A {b / a:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
