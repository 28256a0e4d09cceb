"""A quick side-by-side BiT training-step measurement (one run, one device).

Times a full training step (forward, backward, optimizer) of a BiT model on the current
device for each variant given, in the same process: ``reference`` (bitfast's reference
backend with torch.optim.SGD: the timm-style eager baseline) and ``bitfast`` (default
backends with FusedSGD). Reports img/s (median of timed steps), the ratio to the first
variant, and peak memory. The full benchmark suite lives in benchmarks/ (pytest-benchmark);
this script is the one-call check for a lent GPU.

    python benchmarks/quick_train_step.py --batch 128 --size 224 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import bitfast
from bitfast.optim import FusedSGD


def _variant(name: str, model_name: str, device: str, channels_last: bool):
    backend = "reference" if name == "reference" else None
    model = bitfast.create_model(model_name, num_classes=1000, backend=backend).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if name == "reference":
        opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    else:
        opt = FusedSGD(model.parameters(), lr=0.003, momentum=0.9)
    return model, opt


def measure(name, args, device):
    """img/s (median over timed steps) and peak memory of one variant."""
    torch.manual_seed(0)
    model, opt = _variant(name, args.model, device, args.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    xs = [torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=fmt) for _ in range(2)]
    ys = [torch.randint(0, 1000, (args.batch,), device=device) for _ in range(2)]

    def step(i):
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(xs[i % 2]), ys[i % 2])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup):
        step(i)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = step(i)
        sync()
        times.append(time.perf_counter() - t0)
    assert torch.isfinite(loss), f"{name}: loss is {loss}"
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    spread = (max(times) - min(times)) / med
    return {"variant": name, "img_per_s": args.batch / med, "median_ms": med * 1e3, "spread": spread, "peak_gib": peak}


def main(argv=None):
    """Parse arguments, measure every variant, print a table (and write JSON)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnetv2_50x1_bit")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variants", default="reference,bitfast")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = [measure(v, args, args.device) for v in args.variants.split(",")]
    base = results[0]["img_per_s"]
    header = {
        "device": dev_name, "torch": torch.__version__, "bitfast": bitfast.__version__,
        "backends": bitfast.available_backends(), "model": args.model, "batch": args.batch,
        "size": args.size, "dtype": args.dtype, "channels_last": args.channels_last,
    }
    print(json.dumps(header))
    print(f"{'variant':<12}{'img/s':>10}{'ratio':>8}{'ms/step':>10}{'spread':>8}{'peak GiB':>10}")
    for r in results:
        r["ratio"] = r["img_per_s"] / base
        print(f"{r['variant']:<12}{r['img_per_s']:>10.1f}{r['ratio']:>8.2f}{r['median_ms']:>10.2f}{r['spread']:>8.2f}{r['peak_gib']:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
