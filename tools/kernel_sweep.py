"""Launch-configuration sweep of the GroupNorm+ReLU forward and backward and the SGD step
(``triton`` and ``cuda`` backends) at BiT-R50x1 sizes on a GPU, against the same run's copy
bandwidth and the baselines (eager; ``torch.optim.SGD(fused=True)``), with the best
configuration marked and the targets of docs/performance.md reported met or not
(``bitfast.bench.sweep``). Without a GPU, or with --dry-run, every configuration runs once
on tiny shapes (Triton under its interpreter, CUDA skipped): proof that the sweep works.

    python tools/kernel_sweep.py OUTDIR [--kernels gn,sgd] [--min-time 0.05] [--budget 90]
                                        [--inductor] [--dry-run]
    python tools/kernel_sweep.py --profile-run    # each kernel's default once (under ncu/nsys)

Writes OUTDIR/sweep.md and OUTDIR/sweep.json; prints the targets and the best
configurations. Exit status 0 unless the sweep itself could not run (failing
configurations are reported in the tables, not as an error).
"""

from __future__ import annotations

import argparse
import os
import sys


def _profile_run() -> int:
    """Each kernel's default configuration once at R50x1 stage 1 (bf16 channels_last) and
    on R50x1's parameters, after a warm-up call (Triton compiles there): what a profiler
    wrapped around this process should record."""
    import torch

    import bitfast  # noqa: F401  (loads the native builds)
    from bitfast.bench import harness as h
    from bitfast.bench.layers import param_shapes
    from bitfast.kernels import group_norm_relu as gk
    from bitfast.kernels import sgd_momentum as sk

    if not torch.cuda.is_available():
        print("kernel_sweep --profile-run: no GPU", file=sys.stderr)
        return 2
    shape = (128, 64, 56, 56)
    x = torch.randn(shape, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    w, b = torch.ones(64, device="cuda"), torch.zeros(64, device="cuda")
    params = [torch.randn(s, device="cuda") for s in param_shapes("r50x1")]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    native = hasattr(torch.ops.bitfast, "native_group_norm_relu_fwd")

    def once():
        _, mean, rstd = gk.group_norm_relu_fwd(x, w, b, h.GN_GROUPS, h.EPS, True)
        gk.group_norm_relu_bwd(dy, x, w, b, mean, rstd, h.GN_GROUPS, True)
        sk.sgd_momentum_(params, grads, bufs, h.LR, h.MOMENTUM, 0.0, h.WEIGHT_DECAY, False, False, False)
        if native:
            _, mean, rstd = torch.ops.bitfast.native_group_norm_relu_fwd(x, w, b, h.GN_GROUPS, h.EPS, True)
            torch.ops.bitfast.native_group_norm_relu_bwd(dy, x, w, b, mean, rstd, h.GN_GROUPS, True)
            torch.ops.bitfast.native_sgd_momentum_(params, grads, bufs, h.LR, h.MOMENTUM, 0.0, h.WEIGHT_DECAY,
                                                   False, False, False, None, [], 0.0)

    once()  # warm-up: Triton compiles
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    once()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("kernel_sweep --profile-run: done")
    return 0


def main(argv=None) -> int:
    """Run the sweep (or --profile-run) and write the reports."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=None, help="output directory (sweep.md, sweep.json)")
    p.add_argument("--kernels", default="gn,sgd", help="comma-separated: gn, sgd")
    p.add_argument("--min-time", type=float, default=0.05, help="seconds each configuration is timed for")
    p.add_argument("--budget", type=float, default=None, help="seconds after which no measurement starts")
    p.add_argument("--inductor", action="store_true", help="add torch.compile of the eager GroupNorm (slow)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, every configuration once, no timing")
    p.add_argument("--profile-run", action="store_true", help="each kernel's default once, for a profiler")
    args = p.parse_args(argv)
    if args.profile_run:
        return _profile_run()
    if args.out is None:
        p.error("the output directory is required (unless --profile-run)")
    import torch

    if args.dry_run or not torch.cuda.is_available():
        # the dry run runs the Triton kernels under the interpreter, on the CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from bitfast.bench import sweep

    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    kernels = tuple(k.strip() for k in args.kernels.split(",") if k.strip())

    def log(row):
        what = f"{row.ms:.4f} ms" if row.ms else row.status
        print(f"  {row.kernel:6} {row.shape[:28]:28} {row.impl:11} {row.config[:60]:60} {what}", flush=True)

    try:
        result = sweep.run_sweep(device, dry=device == "cpu", kernels=kernels, min_time=args.min_time,
                                 budget_s=args.budget, inductor=args.inductor, log=log)
    except ValueError as exc:
        p.error(str(exc))
    md, js = sweep.write_reports(result, args.out)
    meta = result["meta"]
    print(f"kernel_sweep on {meta['device']} in {meta['seconds']} s (copy bandwidth {meta['copy_GBps']} GB/s; "
          f"{'dry run' if meta['dry_run'] else 'timed'}): {md}, {js}")
    for t in result["targets"]:
        print(f"  target {t['target']}: {t['status']} {t.get('best', '')}")
    for r in result["rows"]:
        if r.best:
            print(f"  best {r.kernel} {r.shape} {r.impl}: {r.config} ({r.ms:.4f} ms, {r.pct_copy or 0:.0f}% of copy)")
    failed = [r for r in result["rows"] if r.status.startswith("FAILED")]
    for r in failed:
        print(f"  failed {r.kernel} {r.shape} {r.impl} {r.config}: {r.status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
