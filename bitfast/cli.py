"""The ``bitfast`` command.

    bitfast env                   versions, native builds, backends and devices
    bitfast models                the BiT architectures bitfast builds
    bitfast demo [options]        build a BiT model, load a checkpoint (a synthetic one in
                                  the official .npz layout unless --checkpoint is given),
                                  run a forward pass on the embedded default images and
                                  report, checked against the reference backend
    bitfast bench [--quick] [--json FILE] [--markdown FILE]
                                  time every op on every backend against the baselines
                                  (eager, torch.compile, torch.optim.SGD) and a BiT-R50x1
                                  training step; print one table (see bitfast.bench)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time

import torch


def _versions() -> dict:
    import numpy

    import bitfast

    out = {
        "bitfast": bitfast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none",
        "numpy": numpy.__version__,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    return out


def env_report() -> dict:
    """Everything ``bitfast env`` prints, as a dict."""
    import bitfast
    from bitfast import _native, backends

    # The path shows which file loaded: an editable install keeps an extension built
    # earlier in the source tree until it is rebuilt or removed.
    builds = {
        name: (f"loaded from {sys.modules[name].__file__}" if _native.loaded(name) else f"not loaded ({_native.load_error(name)})")
        for name in _native.EXTENSIONS
    }
    devices = ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    auto = {
        family: {dev: backends.resolve(family, dev, torch.float32, "auto") for dev in device_types}
        for family in backends.families()
    }
    return {
        "versions": _versions(),
        "builds": builds,
        "available_backends": bitfast.available_backends(),
        "requested_backend": backends.requested_backend(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
        "devices": devices,
        "auto_backend_float32": auto,
    }


def cmd_env(args) -> int:
    report = env_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("bitfast environment")
    for k, v in report["versions"].items():
        print(f"  {k:<12} {v}")
    print("native builds")
    for k, v in report["builds"].items():
        print(f"  {k:<16} {v}")
    print(f"available backends  {', '.join(report['available_backends'])}")
    print(f"requested backend   {report['requested_backend']} (BITFAST_BACKEND / use_backend)")
    print(f"TRITON_INTERPRET    {report['TRITON_INTERPRET']}")
    print(f"devices             {'; '.join(report['devices'])}")
    print("auto choice (float32)")
    for family, choice in report["auto_backend_float32"].items():
        print(f"  {family:<20} " + ", ".join(f"{d}: {b}" for d, b in choice.items()))
    return 0


def cmd_models(args) -> int:
    import bitfast

    for name in bitfast.list_models():
        print(name)
    return 0


def default_images(n: int, size: int) -> torch.Tensor:
    """The embedded default input: ``n`` deterministic synthetic RGB images in [-1, 1]
    (colour gradients, rings and stripes), BiT's input range."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = (xs.square() + ys.square()).sqrt()
    images = []
    for i in range(n):
        k = i + 1
        red = torch.cos(math.pi * k * r)
        green = torch.sin(math.pi * (xs * k + ys))
        blue = torch.sign(torch.sin(2 * math.pi * k * xs)) * 0.5 + 0.25 * ys
        images.append(torch.stack([red, green, blue]).clamp(-1, 1))
    return torch.stack(images)


def _time_forward(model, x, repeats: int) -> tuple[torch.Tensor, float]:
    with torch.inference_mode():
        out = model(x)  # warm-up (Triton compiles, caches fill)
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) / repeats


def cmd_demo(args) -> int:
    import bitfast
    from bitfast.checkpoint.export import save_npz

    device = torch.device(args.device)
    print(f"bitfast {bitfast.__version__} demo: {args.model}, {args.batch} images of {args.size}x{args.size} on {device}")
    model = bitfast.create_model(args.model, num_classes=args.num_classes, backend=args.backend)
    with tempfile.TemporaryDirectory() as tmp:
        source = args.checkpoint
        if source is None:
            # A synthetic checkpoint in the official release layout (HWIO kernels, resnet/...
            # keys), written from a second, differently seeded model: loading it exercises the
            # same path as a downloaded BiT-M file.
            torch.manual_seed(args.seed)
            donor = bitfast.create_model(args.model, num_classes=args.num_classes)
            with torch.no_grad():
                donor.head.fc.weight.normal_(0, 0.05)
            source = os.path.join(tmp, "synthetic-bit.npz")
            keys = save_npz(donor, source)
            print(f"checkpoint: synthetic official-layout .npz, {len(keys)} arrays ({os.path.getsize(source) / 2**20:.1f} MiB)")
        report = bitfast.load_pretrained(model, source, strict=True)
        print(f"loaded: {report}")
    model = model.to(device).eval()
    reference = bitfast.create_model(args.model, num_classes=args.num_classes, backend="reference")
    reference.load_state_dict(model.state_dict())
    reference = reference.to(device).eval()

    x = default_images(args.batch, args.size).to(device)
    logits, t_fast = _time_forward(model, x, args.repeats)
    ref_logits, t_ref = _time_forward(reference, x, args.repeats)
    with torch.inference_mode():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    diff = (logits - ref_logits).abs().max().item()
    scale = ref_logits.abs().max().item()
    n_params = sum(p.numel() for p in model.parameters())
    probs = logits.softmax(-1)
    top = probs[0].topk(min(5, probs.shape[-1]))
    print(f"model: {n_params / 1e6:.2f}M parameters, features {tuple(features.shape)}, logits {tuple(logits.shape)}")
    print("backends: " + ", ".join(f"{f}={bitfast.backends.resolve(f, device.type, torch.float32, args.backend)}" for f in ("weight_standardize", "group_norm_relu")))
    print("image 0 top-5: " + ", ".join(f"class {int(i)} ({p:.3f})" for p, i in zip(top.values.tolist(), top.indices.tolist())))
    print(f"forward: {args.batch / t_fast:.1f} img/s with bitfast, {args.batch / t_ref:.1f} img/s with the reference backend ({t_ref / t_fast:.2f}x)")
    ok = diff <= 1e-3 * max(scale, 1.0) and bool(torch.isfinite(logits).all())
    print(f"parity vs reference: max |logit difference| = {diff:.2e} (logit scale {scale:.2f}): {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def cmd_bench(args) -> int:
    from bitfast import bench

    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else list(bench.OPS)
    for op in ops:
        if op not in bench.OPS:
            raise ValueError(f"unknown op {op!r} in --ops; expected some of {', '.join(bench.OPS)}")
    device = args.device or bench.default_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    meta, results, skipped = bench.run(ops, device=device, quick=args.quick, runs=args.runs, progress=not args.no_progress)
    meta["command"] = "bitfast " + " ".join(args.argv)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(bench.to_json(meta, results, skipped))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(bench.to_markdown(meta, results, skipped))
    print(f"bitfast bench on {meta['device']} (copy bandwidth {meta['copy_GBps']} GB/s), {meta['wall_s']} s; "
          f"torch {meta['torch']}, bitfast {meta['bitfast']}")
    for line in bench._skip_summary(skipped):
        print(f"  not measured: {line}")
    print(bench.format_table(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bitfast`` command."""
    p = argparse.ArgumentParser(prog="bitfast", description="Fast Big Transfer (BiT) training for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="versions, native builds, backends and devices")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=cmd_env)
    m = sub.add_parser("models", help="list the BiT architectures")
    m.set_defaults(func=cmd_models)
    d = sub.add_parser("demo", help="build a BiT model, load a checkpoint, run a forward pass and report")
    d.add_argument("--model", default="resnetv2_50x1_bit")
    d.add_argument("--checkpoint", default=None, help="a .npz/.pth/.safetensors/bit.pth.tar file or a release name (default: a synthetic .npz)")
    d.add_argument("--num-classes", type=int, default=1000)
    d.add_argument("--batch", type=int, default=4)
    d.add_argument("--size", type=int, default=128)
    d.add_argument("--repeats", type=int, default=2)
    d.add_argument("--backend", default=None, help="force a backend (reference, cpp, cuda, triton)")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("bench", help="benchmark the ops and a BiT training step against the baselines")
    b.add_argument("--quick", action="store_true", help="fewer shapes and dtypes; no torch.compile on CPU")
    b.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    b.add_argument("--markdown", default=None, metavar="FILE", help="write the results as a markdown report")
    b.add_argument("--ops", default=None, help="comma-separated subset of: weight_standardize, group_norm_relu, "
                   "batch_norm_relu, sgd_momentum, train_step (default: all)")
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    b.add_argument("--runs", type=int, default=2, help="time each case this many times and report the spread")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bitfast`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"bitfast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
