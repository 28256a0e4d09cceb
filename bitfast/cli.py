"""The ``bitfast`` command.

    bitfast env                   versions, native builds, backends and devices
    bitfast models                the BiT architectures bitfast builds and the pretrained names
    bitfast demo [options]        build a BiT model, load a checkpoint (a synthetic one in
                                  the official .npz layout unless --checkpoint is given),
                                  run a forward pass on the embedded default images and
                                  report, checked against the reference backend
    bitfast bench [--quick] [--json FILE] [--markdown FILE]
                                  time every op on every backend against the baselines
                                  (eager, torch.compile, torch.optim.SGD) and a BiT-R50x1
                                  training step; print one table (see bitfast.bench)
    bitfast story [--smoke]       the BiT story on the embedded digits: upstream training
                                  on 0-4, few-shot ridge heads, HyperRule fine-tuning and
                                  training from scratch on 5-9; table, plots, >= 95% check
    bitfast finetune [options]    fine-tune with BiT-HyperRule (every value overridable)
    bitfast pretrain [options]    upstream training (step or cosine schedule)
    bitfast distill --teacher CKPT --student MODEL [options]
                                  knowledge distillation: train a student from a teacher
    bitfast fewshot [options]     k-shot episodes: ridge heads on frozen features and/or
                                  HyperRule fine-tuning; mean and std over seeds
    bitfast export CKPT --out DIR [--prune AMOUNT [--structured]] [--int8]
                                  inference export (WS folded, plain torch), optional
                                  pruning and int8 weights; accuracy/sparsity/size table
    bitfast eval --checkpoint A [B ...]
                                  top-1/top-5, ECE, reliability diagram, confusion matrix;
                                  a logit ensemble of several checkpoints, EMA weights
    bitfast convert-checkpoint CKPT [--output NEW]
                                  rewrite a trusted training checkpoint of an earlier
                                  bitfast version in the current format (plain data only,
                                  read without running code)

Training checkpoints are read with torch.load(weights_only=True): a file that would need
Python objects (an earlier format, or a crafted file) is refused unless --trust-checkpoint.

This module only parses arguments and calls library functions; its length (a little over 600
lines) is the argument declarations and help texts of fourteen commands.

The training commands run unchanged under torchrun (DDP; NCCL on GPUs, gloo on CPU):
    torchrun --nproc_per_node 8 -m bitfast.cli finetune --data DIR ...
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
import warnings

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
    from bitfast.checkpoint import PRETRAINED_TAGS

    for name in bitfast.list_models():
        print(name)
    print()
    print("pretrained names (create_model(name, pretrained=True): weights from the Hugging Face Hub, hf-hub:timm/<name>)")
    width = max(map(len, PRETRAINED_TAGS))
    print(f"{'name':<{width}}  {'classes':>7}  {'input':>5}  {'crop':>5}  {'interp':<8}  release")
    for name, cfg in PRETRAINED_TAGS.items():
        print(f"{name:<{width}}  {cfg.num_classes:>7}  {cfg.image_size:>5}  {cfg.crop_pct:>5.3f}  "
              f"{cfg.interpolation:<8}  {cfg.release or '-'}")
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
    from bitfast.checkpoint.npz_writer import save_npz

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

    if args.list:
        print(bench.ops_table())
        return 0
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else list(bench.OPS)
    for op in ops:
        if op not in bench.OPS:
            raise ValueError(f"unknown op {op!r} in --ops; expected some of {', '.join(bench.OPS)}")
    impls = None
    if args.impls:
        impls = [i.strip() for i in args.impls.split(",") if i.strip()]
        known = {i for op in ops for i in bench.implementations(op)}
        unknown = [i for i in impls if i not in known]
        if unknown:
            raise ValueError(f"unknown implementation(s) {', '.join(unknown)} in --impls for {', '.join(ops)}; "
                             f"expected some of {', '.join(sorted(known))}")
    device = args.device or bench.default_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    meta, results, skipped = bench.run(ops, device=device, quick=args.quick, runs=args.runs,
                                       progress=not args.no_progress, impls=impls)
    meta["command"] = "bitfast " + " ".join(args.argv)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    bench.write_reports(meta, results, skipped, json_path=args.json, markdown_path=args.markdown)
    print(f"bitfast bench on {meta['device']} (copy bandwidth {meta['copy_GBps']} GB/s), {meta['wall_s']} s; "
          f"torch {meta['torch']}, bitfast {meta['bitfast']}")
    for line in bench.skip_summary(skipped):
        print(f"  not measured: {line}")
    print(bench.format_table(results))
    failed = [spec for spec, why in skipped if why.startswith(bench.FAILED)]
    if failed:
        print(f"bitfast bench: {len(failed)} case(s) FAILED (listed above); the others were measured")
        return 1
    return 0


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help unless the help already says its default or
    there is none worth printing (None, or a switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or isinstance(action.default, bool):
            return text
        return super()._get_help_string(action)


def _add_train_args(p: argparse.ArgumentParser, defaults, recipe: str) -> None:
    """The flags shared by finetune, pretrain and fewshot; defaults from the recipe's config."""
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default=defaults.data,
                   help="'digits' (the embedded UCI digits, no download) or an ImageFolder directory (DIR/<class>/<image>; "
                        "DIR/train and DIR/val are used when present)")
    g.add_argument("--val-data", default=defaults.val_data, help="ImageFolder to evaluate on (default: DIR/val or DIR/test)")
    g.add_argument("--classes", type=int, nargs="+", default=defaults.classes,
                   help="digits only: which digits, e.g. 5 6 7 8 9 (default: all ten)")
    g.add_argument(*(["--student", "--model"] if recipe == "distill" else ["--model"]), dest="model", default=defaults.model,
                   help="a bitfast model (see `bitfast models`; bit_tiny is a 2M-parameter BiT-style ResNet-v2 for CPUs)")
    g.add_argument("--norm", default=defaults.norm, choices=["gn", "bn"], help="GroupNorm (BiT) or BatchNorm variant")
    g.add_argument("--pretrained", default=defaults.pretrained,
                   help="initial weights: a release name (BiT-M-R50x1, ...), a weights file, or a bitfast training "
                        "checkpoint (its backbone; the head is always fresh)")
    g.add_argument("--resize", type=int, default=defaults.resize, help="train-time resize before the random crop")
    g.add_argument("--crop", type=int, default=defaults.crop,
                   help="training/eval resolution (>= 32)" + (" (default: BiT-HyperRule: 128 when at least half of the training images are below 96x96 "
                                                              "pixels (their median area), else 480; a --pretrained "
                                                              "training checkpoint's own resolution)"
                                                            if recipe == "finetune" else ""))
    g.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    o = p.add_argument_group("optimization")
    o.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch (all processes together)")
    o.add_argument("--batch-split", type=int, default=defaults.batch_split,
                   help="micro-batches per step (gradient accumulation; same result, less memory)")
    o.add_argument("--base-lr", type=float, default=defaults.base_lr,
                   help="learning rate at the reference batch, scaled linearly to --batch-size "
                        + ("(default 0.003 at batch 512)" if recipe != "pretrain" else "(default 0.03 at batch 256)"))
    o.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                   help="linear warm-up steps" + (" (default: the HyperRule's)" if recipe != "pretrain" else " (default 5000)"))
    o.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD momentum")
    o.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="weight decay")
    o.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing, help="label smoothing (off by default)")
    o.add_argument("--mixup-alpha", type=float, default=defaults.mixup_alpha,
                   help="MixUp alpha (default: the HyperRule's: 0.1 from 20k examples, else none)" if recipe != "pretrain"
                   else "MixUp alpha (default: none)")
    o.add_argument("--ema-decay", type=float, default=defaults.ema_decay,
                   help="keep Polyak-averaged (EMA) weights with this decay, when FusedSGD supports it (0: off)")
    o.add_argument("--no-freeze-bn", dest="freeze_bn", action="store_false", default=defaults.freeze_bn,
                   help=argparse.SUPPRESS if recipe == "pretrain" else "update BatchNorm statistics (BN variant; frozen by default)")
    o.add_argument("--linear-probe", action="store_true", help="freeze the backbone; train only the head")
    x = p.add_argument_group("execution")
    x.add_argument("--precision", default=defaults.precision, choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype (fp16 uses a GradScaler)")
    x.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    x.add_argument("--compile", action="store_true", help="torch.compile the model")
    x.add_argument("--cuda-graphs", action="store_true",
                   help="capture the whole step (forward, backward, FusedSGD) in a CUDA graph and replay it: one GPU, "
                        "bf16 or fp32, not with --compile; losses are read back and checked every --log-every steps, "
                        "and a NaN/Inf stop rolls back to the last read back that found every step good")
    x.add_argument("--device", default=defaults.device, help="cuda or cpu (default: cuda when available)")
    x.add_argument("--workers", type=int, default=defaults.workers, help="data-loading worker processes (default 0)")
    x.add_argument("--seed", type=int, default=defaults.seed, help="seed of initialisation, data order and augmentation")
    r = p.add_argument_group("output, checkpoints, resume")
    r.add_argument("--output", default=defaults.output, help="directory for checkpoints, metrics.jsonl and plots")
    r.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help="steps between checkpoints (OUTPUT/last.pt; 0: only at the end)")
    r.add_argument("--resume", default=defaults.resume,
                   help="continue bit for bit from a checkpoint ('auto': OUTPUT/last.pt when it exists)")
    r.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps between evaluations (0: only at the end)")
    r.add_argument("--log-every", type=int, default=defaults.log_every, help="steps between metrics.jsonl records")
    r.add_argument("--stop-at-step", type=int, default=None, help="stop after this step, as if interrupted (resume later)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    r.add_argument("--no-plots", dest="plots", action="store_false", help="no PNG plots")
    r.add_argument("--overwrite", action="store_true", default=defaults.overwrite,
                   help="start a new run in an --output that holds one, removing its last.pt and metrics (without it, "
                        "such an --output is refused unless --resume)")
    r.add_argument("--trust-checkpoint", action="store_true", default=defaults.trust_checkpoint, help=TRUST_HELP)


def _add_hyperrule_args(p: argparse.ArgumentParser, defaults, what: str = "the ") -> None:
    """--steps, --schedule and --variant: the HyperRule options of finetune, distill and fewshot."""
    g = p.add_argument_group("BiT-HyperRule schedule and resolution")
    g.add_argument("--steps", type=int, default=None,
                   help=f"{what}total steps; rescales the HyperRule schedule (same fractions)")
    g.add_argument("--schedule", type=int, nargs=5, default=None, metavar=("W", "D1", "D2", "D3", "TOTAL"),
                   help=f"{what}step schedule [warmup, d1, d2, d3, total] (default: the HyperRule's for the data size)")
    g.add_argument("--variant", default=defaults.variant, choices=["release", "paper"],
                   help="HyperRule resolution table for large images: release 512/480, paper 448/384")


TRUST_HELP = ("read training checkpoints (--resume, --pretrained, --teacher, --checkpoint) of the format of earlier "
              "bitfast versions, which unpickles them and so runs any code they carry: only for files you made or "
              "trust (once: `bitfast convert-checkpoint FILE`)")


def _config_from_args(cls, args):
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**values)


def cmd_finetune(args) -> int:
    from bitfast.train.recipes.finetune import FinetuneConfig, finetune

    finetune(_config_from_args(FinetuneConfig, args))
    return 0


def cmd_pretrain(args) -> int:
    from bitfast.train.recipes.pretrain import PretrainConfig, pretrain

    pretrain(_config_from_args(PretrainConfig, args))
    return 0


def cmd_fewshot(args) -> int:
    from bitfast.train.recipes.fewshot import FewshotConfig, fewshot

    fewshot(_config_from_args(FewshotConfig, args))
    return 0


def cmd_distill(args) -> int:
    from bitfast.train.recipes.distill import DistillConfig, distill

    distill(_config_from_args(DistillConfig, args))
    return 0


def cmd_eval(args) -> int:
    from bitfast.train.evaluate import evaluate_checkpoints

    evaluate_checkpoints(args.checkpoint, output=args.output, data=args.data, val_data=args.val_data,
                         classes=args.classes, crop=args.crop, ensemble=args.ensemble, use_ema=not args.no_ema,
                         batch_size=args.batch_size, device=args.device, trusted=args.trust_checkpoint)
    return 0


def cmd_export(args) -> int:
    from bitfast.train.checkpoint_export import export_checkpoint

    export_checkpoint(args.checkpoint, args.out, prune=args.prune, structured=args.structured,
                      prune_scope=args.prune_scope, int8=args.int8, use_ema=not args.no_ema, data=args.data,
                      val_data=args.val_data, classes=args.classes, crop=args.crop, evaluate_variants=not args.no_eval,
                      batch_size=args.batch_size, device=args.device, trusted=args.trust_checkpoint)
    return 0


def cmd_convert_checkpoint(args) -> int:
    from bitfast.train.checkpoint import FORMAT, convert_checkpoint, load_checkpoint

    try:
        load_checkpoint(args.checkpoint)
        already = True
    except ValueError:  # not readable safely (an earlier format), or not a checkpoint: convert says which
        already = False
    out = convert_checkpoint(args.checkpoint, args.output)
    what = "was already in" if already else "converted to"
    print(f"bitfast convert-checkpoint: {args.checkpoint} {what} format {FORMAT}; wrote {out} (reads without "
          "--trust-checkpoint)")
    return 0


def cmd_story(args) -> int:
    from bitfast.train.recipes.story import StoryConfig, story

    cfg = StoryConfig(output=args.output, seed=args.seed, device=args.device, progress=args.progress, smoke=args.smoke,
                      plots=args.plots)
    if args.min_accuracy is not None:
        cfg.min_accuracy = args.min_accuracy
    if args.threads:
        torch.set_num_threads(args.threads)
    report = story(cfg)
    return 0 if report["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bitfast`` command."""
    p = argparse.ArgumentParser(prog="bitfast", description="Fast Big Transfer (BiT) training for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="versions, native builds, backends and devices")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=cmd_env)
    m = sub.add_parser("models", help="list the model names create_model and the training commands accept",
                       description="List the model names: the BiT family (resnetv2_{50x1,...}_bit, timm's names) and "
                                   "bit_tiny, a 2M-parameter BiT-style network for CPUs; then timm's pretrained names "
                                   "(resnetv2_50x1_bit.goog_in21k ...) with their class count, input size, crop "
                                   "fraction, interpolation and the official release holding the same weights.")
    m.set_defaults(func=cmd_models)
    d = sub.add_parser("demo", formatter_class=_DefaultsFormatter,
                       help="build a BiT model, load a checkpoint, run a forward pass and report",
                       description="The checkpoint check: build a BiT model, load a checkpoint (a synthetic one in the "
                                   "official .npz layout unless --checkpoint is given), run a forward pass on the "
                                   "embedded default images and compare it with the reference backend.")
    d.add_argument("--model", default="resnetv2_50x1_bit", help="the architecture (see `bitfast models`)")
    d.add_argument("--checkpoint", default=None, help="a .npz/.pth/.safetensors/bit.pth.tar file or a release name (default: a synthetic .npz)")
    d.add_argument("--num-classes", type=int, default=1000, help="classes of the model's head")
    d.add_argument("--batch", type=int, default=4, help="images in the forward pass")
    d.add_argument("--size", type=int, default=128, help="image resolution")
    d.add_argument("--repeats", type=int, default=2, help="timed forward passes")
    d.add_argument("--backend", default=None, help="force a backend (reference, cpp, cuda, triton)")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    d.add_argument("--seed", type=int, default=0, help="seed of the synthetic checkpoint and images")
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("bench", help="benchmark the ops and a BiT training step against the baselines",
                       description="Time every op on every backend against the strongest baselines (eager PyTorch, "
                                   "torch.compile, torch.optim.SGD) and a BiT-R50x1 training step; print one table "
                                   "(and write JSON / markdown on request).")
    b.add_argument("--quick", action="store_true", help="fewer shapes and dtypes; no torch.compile on CPU")
    b.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    b.add_argument("--markdown", default=None, metavar="FILE", help="write the results as a markdown report")
    from bitfast import bench

    b.add_argument("--ops", default=None, help=f"comma-separated subset of: {', '.join(bench.OPS)} (default: all)")
    b.add_argument("--list", action="store_true", help="print the table of what is benchmarked (markdown) and exit")
    b.add_argument("--impls", default=None,
                   help="comma-separated subset of the implementations to run (bitfast's and the baselines', "
                        "e.g. bitfast,compile; default: all)")
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    b.add_argument("--runs", type=int, default=2, help="time each case this many times and report the spread")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)
    _add_training_commands(sub)
    return p


def _add_training_commands(sub) -> None:
    from bitfast.train.recipes.distill import DistillConfig
    from bitfast.train.recipes.fewshot import FewshotConfig
    from bitfast.train.recipes.finetune import FinetuneConfig
    from bitfast.train.recipes.pretrain import PretrainConfig

    fmt = _DefaultsFormatter
    s = sub.add_parser("story", formatter_class=fmt,
                       help="the BiT story on the embedded digits (upstream 0-4, transfer to 5-9): table, plots, >= 95%% check",
                       description="Big Transfer in minutes on a CPU: upstream training of a small BiT ResNet-v2 on digits "
                                   "0-4; few-shot ridge heads, HyperRule fine-tuning and training from scratch on digits "
                                   "5-9. Exits 1 when the fine-tuned accuracy misses --min-accuracy.")
    s.add_argument("--output", default="runs/story", help="directory for checkpoints, metrics, plots and story.json")
    s.add_argument("--smoke", action="store_true", help="a seconds-long configuration (a few steps; no accuracy check)")
    s.add_argument("--min-accuracy", type=float, default=None, help="required fine-tuned top-1 on digits 5-9 (default 0.95)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--seed", type=int, default=0, help="seed of everything")
    s.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    s.add_argument("--no-plots", dest="plots", action="store_false", help="no PNG plots")
    s.set_defaults(func=cmd_story)

    f = sub.add_parser("finetune", formatter_class=fmt, help="fine-tune with BiT-HyperRule",
                       description="Fine-tune a BiT model with BiT-HyperRule: resolution, schedule, lr 0.003 x batch/512 "
                                   "with warm-up and step decays, MixUp from 20k examples, zero-initialised head, SGD "
                                   "momentum 0.9, no weight decay. Every value can be overridden. Under torchrun: DDP.")
    fd = FinetuneConfig()
    _add_train_args(f, fd, "finetune")
    _add_hyperrule_args(f, fd)
    f.add_argument("--lora-rank", type=int, default=fd.lora_rank, metavar="R",
                   help="LoRA: wrap every StdConv but the stem with a rank-R update, freeze the base, train the updates "
                        "and the head (0: full fine-tuning). last.pt keeps the LoRA factors (resumable); eval, export "
                        "and fewshot merge them on load")
    f.add_argument("--lora-alpha", type=float, default=fd.lora_alpha, metavar="A",
                   help="LoRA: scale the updates by A/R (default: A = R)")
    f.set_defaults(func=cmd_finetune)

    ds = sub.add_parser("distill", formatter_class=fmt, help="knowledge distillation: train a student from a teacher",
                        description="Train a student (any bitfast model, e.g. a narrower BiT) from a teacher's soft "
                                    "targets: the teacher sees the student's images in eval mode under no_grad (bf16 on "
                                    "a GPU); loss (1 - alpha) CE + alpha T^2 KL(teacher || student). Data, schedule and "
                                    "every other option as in bitfast finetune. Reports teacher and student accuracy.")
    dd = DistillConfig()
    _add_train_args(ds, dd, "distill")
    _add_hyperrule_args(ds, dd)
    ds.add_argument("--teacher", required=True,
                    help="a bitfast training checkpoint (RUN/last.pt; EMA weights when present) or a model name "
                         "(weights from --teacher-pretrained)")
    ds.add_argument("--teacher-pretrained", default=None,
                    help="weights of a teacher given by model name (a release name, a file or a training checkpoint)")
    ds.add_argument("--alpha", type=float, default=dd.alpha, help="weight of the distillation term (0: plain CE)")
    ds.add_argument("--temperature", type=float, default=dd.temperature, help="softmax temperature T")
    ds.set_defaults(func=cmd_distill)

    pt = sub.add_parser("pretrain", formatter_class=fmt, help="upstream training (BiT-S/M recipe)",
                        description="Upstream training: SGD momentum 0.9, lr 0.03 x batch/256, warm-up (5000 steps, at "
                                    "most 10% of the run), weight decay 1e-4, step schedule (/10 at epochs 30, 60, 80 of "
                                    "90) or cosine with 10% warm-up; label smoothing off by default. Under torchrun: DDP.")
    pd = PretrainConfig()
    _add_train_args(pt, pd, "pretrain")
    pt.add_argument("--epochs", type=int, default=pd.epochs, help="epochs")
    pt.add_argument("--decay-epochs", type=int, nargs="+", default=None, metavar="E",
                    help="step schedule: divide the lr by 10 at these epochs (default: 30 60 80 of 90 epochs, scaled to "
                         "--epochs)")
    pt.add_argument("--lr-schedule", default=pd.lr_schedule, choices=["step", "cosine"], help="learning-rate schedule")
    pt.add_argument("--warmup-fraction", type=float, default=pd.warmup_fraction, help="cosine schedule: warm-up share")
    pt.add_argument("--steps-per-epoch", type=int, default=None, help="default: training images // batch size")
    pt.add_argument("--no-inception-crop", dest="inception_crop", action="store_false",
                    help="ImageFolder data: resize + random crop instead of the inception random-resized crop")
    pt.set_defaults(func=cmd_pretrain)

    fs = sub.add_parser("fewshot", formatter_class=fmt, help="few-shot transfer: ridge heads and/or HyperRule fine-tuning",
                        description="k-shot episodes (balanced subsets, one per seed): a closed-form ridge head on frozen "
                                    "features and/or HyperRule fine-tuning on the subset; mean and std over seeds.")
    fsd = FewshotConfig()
    _add_train_args(fs, fsd, "fewshot")
    _add_hyperrule_args(fs, fsd, what="the fine-tuning episodes' ")
    fs.add_argument("--checkpoint", default=None, help="a bitfast training checkpoint whose backbone is transferred "
                                                       "(else --model and --pretrained)")
    fs.add_argument("--shots", type=int, nargs="+", default=list(fsd.shots), metavar="K", help="examples per class")
    fs.add_argument("--seeds", type=int, nargs="+", default=list(fsd.seeds), metavar="S", help="one episode per seed")
    fs.add_argument("--methods", nargs="+", choices=["ridge", "finetune"], default=list(fsd.methods),
                    help="ridge (frozen features) and/or finetune (HyperRule on the subset)")
    fs.set_defaults(func=cmd_fewshot)

    ex = sub.add_parser("export", formatter_class=fmt, help="export a checkpoint for inference; optional pruning and int8",
                        description="Export a bitfast training checkpoint (bitfast finetune/story/distill; EMA weights "
                                    "when present, LoRA merged) for inference: weight standardization folded into plain "
                                    "conv weights, written as a torch state dict (model.pt) with config.json and the "
                                    "one-file torch-only definition bitfast_plain_model.py. Optionally magnitude-pruned "
                                    "(model_pruned.pt) and/or int8-quantized (model_int8.pt; after pruning when both). "
                                    "Reports accuracy, sparsity and size of each on the checkpoint's eval data.")
    ex.add_argument("checkpoint", help="a bitfast training checkpoint (RUN/last.pt)")
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--prune", type=float, default=None, metavar="AMOUNT",
                    help="zero this fraction of the standardized conv weights (or output channels with --structured)")
    ex.add_argument("--structured", action="store_true", help="prune whole output channels")
    ex.add_argument("--prune-scope", default="global", choices=["global", "layer"],
                    help="one magnitude threshold over all convs, or the same fraction in each")
    ex.add_argument("--int8", action="store_true", help="int8 weights with per-output-channel scales")
    ex.add_argument("--no-ema", action="store_true", help="export the raw weights even when EMA weights are present")
    ex.add_argument("--data", default=None, help="'digits' or an ImageFolder to evaluate on (default: the checkpoint's "
                                                 "training data: for the digits, the test split of its classes)")
    ex.add_argument("--val-data", default=None, help="ImageFolder to evaluate (default: DATA/val or DATA/test)")
    ex.add_argument("--classes", type=int, nargs="+", default=None, help="digits only (default: the checkpoint's)")
    ex.add_argument("--crop", type=int, default=None, help="evaluation resolution (default: the checkpoint's)")
    ex.add_argument("--no-eval", action="store_true", help="export only, no accuracy")
    ex.add_argument("--batch-size", type=int, default=256, help="evaluation batch")
    ex.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    ex.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    ex.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", formatter_class=fmt, help="evaluate checkpoints: accuracy, ECE, reliability, confusion",
                        description="Evaluate one bitfast training checkpoint or a logit ensemble of several: top-1/top-5, "
                                    "loss, ECE (15 bins) with a reliability diagram, confusion matrix. Uses the EMA "
                                    "weights when a checkpoint has them.")
    ev.add_argument("--checkpoint", nargs="+", required=True, help="one or more training checkpoints (same classes)")
    ev.add_argument("--data", default=None, help="'digits' or an ImageFolder (default: the checkpoint's training data)")
    ev.add_argument("--val-data", default=None, help="ImageFolder to evaluate (default: DATA/val or DATA/test)")
    ev.add_argument("--classes", type=int, nargs="+", default=None, help="digits only (default: the checkpoint's)")
    ev.add_argument("--crop", type=int, default=None, help="resolution (default: the checkpoint's)")
    ev.add_argument("--ensemble", default="logits", choices=["logits", "probs"], help="average logits or probabilities")
    ev.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights are present")
    ev.add_argument("--batch-size", type=int, default=256, help="evaluation batch")
    ev.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ev.add_argument("--output", default="runs/eval", help="directory for eval.json, reliability.png, confusion.png")
    ev.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    ev.set_defaults(func=cmd_eval)

    cv = sub.add_parser("convert-checkpoint", formatter_class=fmt,
                        help="rewrite a trusted checkpoint of an earlier bitfast version in the current safe format",
                        description="Read a bitfast training checkpoint of an earlier format (bitfast-train-v1, which "
                                    "holds pickled Python objects) by unpickling it, which runs any code it carries: "
                                    "convert only files you made or trust. Write it in the current format "
                                    "(plain data only), which every bitfast command reads without running code and "
                                    "without --trust-checkpoint. Same weights, optimizer, RNG states and config: a "
                                    "converted checkpoint resumes bit for bit.")
    cv.add_argument("checkpoint", help="the checkpoint to convert (e.g. RUN/last.pt)")
    cv.add_argument("--output", default=None, help="where to write the converted file (default: replace CHECKPOINT "
                                                   "atomically)")
    cv.set_defaults(func=cmd_convert_checkpoint)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bitfast`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # Under torchrun every process runs this; only the first one speaks.
    speak = os.environ.get("RANK", "0") in ("", "0")
    formatwarning, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as exc:
        if speak:
            print(f"bitfast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from bitfast.train.guards import NonFiniteLossError, RunInterrupted

        if isinstance(exc, RunInterrupted):
            if speak:
                print(f"bitfast {args.command}: {exc}", file=sys.stderr)
            return exc.exit_status
        if not isinstance(exc, NonFiniteLossError):
            raise
        if speak:
            print(f"bitfast {args.command}: error: {exc}", file=sys.stderr)
        return 3
    finally:
        warnings.formatwarning = formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line for command-line users (no source line of bitfast's code)."""
    return f"warning: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
