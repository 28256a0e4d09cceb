"""The norm ops on a GPU: bitfast's ``cuda`` and ``triton`` kernels against the eager
baseline, in fp32 and bf16, NCHW and channels_last, forward + backward ("full") by default.
``bitfast bench --quick`` measures bf16 channels_last only; this fills in the rest of the
grid without the ``torch.compile`` baseline (whose compile time a short GPU lease cannot
spare). Same case factory, checks and timing as ``bitfast bench``.

    python tools/cuda_norms.py [--ops group_norm_relu,batch_norm_relu] [--modes full]
                                    [--dtypes fp32,bf16] [--layouts nchw,channels_last]
                                    [--shapes "R50x1 s1 mid,R50x1 s4 out"] [--json F] [--markdown F]
"""

import argparse
import sys

import torch

from bitfast import bench

NORM_OPS = ("group_norm_relu", "group_norm_relu_add", "batch_norm_relu")
DEFAULT_SHAPES = ("R50x1 s1 mid", "R50x1 s3 out", "R50x1 s4 out", "R101x3 s1 out")


def main(argv=None) -> int:
    """Measure the selected grid on the current GPU; print the table, write JSON/markdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(NORM_OPS), help="comma-separated norm ops of bitfast bench")
    p.add_argument("--impls", default="eager,cuda,triton", help="comma-separated implementations")
    p.add_argument("--modes", default="full", help="comma-separated: fwd, bwd, full")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--layouts", default="nchw,channels_last", help="comma-separated: nchw, channels_last")
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated shape labels of bitfast bench")
    p.add_argument("--runs", type=int, default=2, help="time each case this many times")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None, metavar="FILE")
    p.add_argument("--markdown", default=None, metavar="FILE")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("cuda_norms: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    split = lambda s: [v.strip() for v in s.split(",") if v.strip()]  # noqa: E731
    ops, labels = split(args.ops), split(args.shapes)
    for op in ops:
        if op not in NORM_OPS:
            p.error(f"unknown op {op!r}; expected some of {', '.join(NORM_OPS)}")
    specs = []
    for op in ops:
        table = bench.shapes(op, args.device, quick=False)
        for label in labels:
            matches = [s for s in table if s.split(" ")[:-1] == label.split(" ")]
            if not matches:
                p.error(f"unknown shape label {label!r}; expected some of: "
                        + ", ".join(" ".join(s.split(" ")[:-1]) for s in table))
            specs += [bench.Spec(op, matches[0], dt, lay, mode, impl)
                      for dt in split(args.dtypes) for lay in split(args.layouts)
                      for mode in split(args.modes) for impl in split(args.impls)]
    meta, results, skipped = bench.run(device=args.device, runs=args.runs, specs=specs, progress=False)
    meta["command"] = "python " + " ".join(["tools/cuda_norms.py"] + list(sys.argv[1:] if argv is None else argv))
    bench.write_reports(meta, results, skipped, json_path=args.json, markdown_path=args.markdown)
    print(f"cuda_norms on {meta['device']} (copy bandwidth {meta['copy_GBps']} GB/s)")
    for line in bench._skip_summary(skipped):
        print(f"  not measured: {line}")
    print(bench.format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
