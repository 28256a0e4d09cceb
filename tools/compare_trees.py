"""The refactoring safety net: do two built trees of bitfast compute bit for bit the same?

``record`` runs, in the tree that Python imports bitfast from, every public op on a fixed
seed grid (shapes, dtypes, memory layouts, every backend this machine has) and keeps its
outputs and the gradients of every differentiable input; then a ``bit_tiny`` training step
(forward, backward, FusedSGD) per norm and layout; and optionally ``bitfast story`` (its
``story.json`` metrics, timings left out, and the tensors of its final checkpoints). An op
that raises records its error type and message, so a change in what is accepted shows too.

``compare`` reads two records and lists every entry that differs: values compared as raw
bytes (NaNs included), dtypes, shapes, strides (the memory layout is part of the contract)
and errors. ``trees`` does both: it records each tree in a child process with that tree
first on ``PYTHONPATH`` (each tree must be built in place:
``python setup.py build_ext --inplace`` or ``pip install --no-build-isolation -e .``), with
the same torch and thread count, then compares. Exit status 0 when everything is equal.

    python tools/compare_trees.py record OUT.pt [--story none|smoke|full] [--threads 1]
    python tools/compare_trees.py compare A.pt B.pt
    python tools/compare_trees.py trees TREE_A TREE_B [--story smoke] [--threads 1] [--keep DIR]

Triton kernels are recorded when ``TRITON_INTERPRET=1`` is set (CPU) or a GPU is present; the
script sets the interpreter itself unless ``--no-triton``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

TIMING_KEYS = ("seconds", "time", "img_per_s", "elapsed")


def _grid():
    """(op name, case name, builder) for every recorded case; builders take (backend, dtype,
    layout) and return the dict of tensors to record."""
    import torch

    import bitfast.ops as ops

    def seeded(*shape, dtype, layout=None, seed=0, scale=1.0):
        g = torch.Generator().manual_seed(seed)
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        return t.contiguous(memory_format=layout) if layout is not None and t.dim() == 4 else t

    cases = []

    for shape in ((16, 8, 3, 3), (32, 16, 1, 1), (8, 3, 7, 7)):
        def ws(backend, dtype, layout, shape=shape):
            w = seeded(*shape, dtype=dtype, layout=layout).requires_grad_()
            out = ops.weight_standardize(w, 1e-8, backend=backend)
            out.backward(seeded(*shape, dtype=dtype, layout=layout, seed=1))
            return {"out": out, "grad_w": w.grad}
        cases.append(("weight_standardize", "x".join(map(str, shape)), ws))

    def conv(backend, dtype, layout):
        x = seeded(2, 8, 9, 9, dtype=dtype, layout=layout).requires_grad_()
        w = seeded(16, 8, 3, 3, dtype=dtype, layout=layout, seed=1).requires_grad_()
        b = seeded(16, dtype=dtype, seed=2).requires_grad_()
        out = ops.std_conv2d(x, w, b, stride=2, padding=1, backend=backend)
        out.backward(seeded(*out.shape, dtype=dtype, layout=layout, seed=3))
        return {"out": out, "grad_x": x.grad, "grad_w": w.grad, "grad_b": b.grad}
    cases.append(("std_conv2d", "2x8x9x9-16x8x3x3-s2p1", conv))

    for shape, groups in (((2, 64, 8, 8), 32), ((3, 32, 5, 7), 8), ((2, 16, 4, 4), 4)):
        for relu in (True, False):
            for affine in (True, False):
                def gn(backend, dtype, layout, shape=shape, groups=groups, relu=relu, affine=affine):
                    x = seeded(*shape, dtype=dtype, layout=layout).requires_grad_()
                    w = seeded(shape[1], dtype=torch.float32, seed=1).requires_grad_() if affine else None
                    b = seeded(shape[1], dtype=torch.float32, seed=2).requires_grad_() if affine else None
                    y = ops.group_norm_relu(x, groups, w, b, 1e-5, relu, backend=backend)
                    y.backward(seeded(*shape, dtype=dtype, layout=layout, seed=3))
                    out = {"y": y, "grad_x": x.grad}
                    if affine:
                        out.update(grad_w=w.grad, grad_b=b.grad)
                    return out
                name = f"{'x'.join(map(str, shape))}-g{groups}-relu{int(relu)}-affine{int(affine)}"
                cases.append(("group_norm_relu", name, gn))

                def gna(backend, dtype, layout, shape=shape, groups=groups, relu=relu, affine=affine):
                    a = seeded(*shape, dtype=dtype, layout=layout).requires_grad_()
                    b_ = seeded(*shape, dtype=dtype, layout=layout, seed=4).requires_grad_()
                    w = seeded(shape[1], dtype=torch.float32, seed=1).requires_grad_() if affine else None
                    b = seeded(shape[1], dtype=torch.float32, seed=2).requires_grad_() if affine else None
                    s, y = ops.group_norm_relu_add(a, b_, groups, w, b, 1e-5, relu, backend=backend)
                    loss = (s.float() * seeded(*shape, dtype=torch.float32, seed=5)).sum()
                    loss = loss + (y.float() * seeded(*shape, dtype=torch.float32, seed=3)).sum()
                    loss.backward()
                    out = {"s": s, "y": y, "grad_a": a.grad, "grad_b": b_.grad}
                    if affine:
                        out.update(grad_w=w.grad, grad_bias=b.grad)
                    return out
                cases.append(("group_norm_relu_add", name, gna))

    for shape in ((4, 16, 6, 6), (2, 32, 4, 4)):
        for training in (True, False):
            for relu in (True, False):
                def bn(backend, dtype, layout, shape=shape, training=training, relu=relu):
                    c = shape[1]
                    x = seeded(*shape, dtype=dtype, layout=layout).requires_grad_()
                    rm, rv = seeded(c, dtype=torch.float32, seed=5), seeded(c, dtype=torch.float32, seed=6).abs() + 0.5
                    w = seeded(c, dtype=torch.float32, seed=1).requires_grad_()
                    b = seeded(c, dtype=torch.float32, seed=2).requires_grad_()
                    y = ops.batch_norm_relu(x, rm, rv, w, b, training, 0.1, 1e-5, relu, backend=backend)
                    y.backward(seeded(*shape, dtype=dtype, layout=layout, seed=3))
                    return {"y": y, "grad_x": x.grad, "grad_w": w.grad, "grad_b": b.grad, "running_mean": rm,
                            "running_var": rv}
                name = f"{'x'.join(map(str, shape))}-train{int(training)}-relu{int(relu)}"
                cases.append(("batch_norm_relu", name, bn))

    for nesterov in (False, True):
        for ema in (False, True):
            def sgd(backend, dtype, layout, nesterov=nesterov, ema=ema):
                shapes = ((7,), (3, 5), (16, 8, 3, 3))
                params = [seeded(*s, dtype=dtype, seed=i) for i, s in enumerate(shapes)]
                bufs = [torch.zeros_like(p) for p in params]
                emas = [p.clone() for p in params] if ema else None
                for step in range(2):
                    grads = [seeded(*p.shape, dtype=dtype, seed=10 + 3 * step + i) for i, p in enumerate(params)]
                    ops.sgd_momentum_(params, grads, bufs, lr=0.1, momentum=0.9, weight_decay=1e-4,
                                      nesterov=nesterov, is_first_step=step == 0, ema_params=emas,
                                      ema_decay=0.9 if ema else 0.0, backend=backend)
                out = {f"p{i}": p for i, p in enumerate(params)}
                out.update({f"buf{i}": b for i, b in enumerate(bufs)})
                out.update({f"ema{i}": e for i, e in enumerate(emas or [])})
                return out
            cases.append(("sgd_momentum_", f"nesterov{int(nesterov)}-ema{int(ema)}", sgd))
    return cases


def _train_steps(record: dict) -> None:
    """A bit_tiny training step (forward, backward, FusedSGD) per norm and layout, auto backend."""
    import torch

    import bitfast
    from bitfast.optim import FusedSGD

    for norm in ("gn", "bn"):
        for layout in ("nchw", "channels_last"):
            key = f"train_step/{norm}/{layout}"
            torch.manual_seed(0)
            model = bitfast.create_model("bit_tiny", num_classes=5, norm=norm)
            x = torch.randn(4, 3, 32, 32)
            y = torch.tensor([0, 1, 2, 3])
            if layout == "channels_last":
                model = model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
            for _ in range(2):
                opt.zero_grad()
                logits = model(x)
                torch.nn.functional.cross_entropy(logits, y).backward()
                opt.step()
            record[f"{key}/logits"] = logits.detach()
            for name, t in model.state_dict().items():
                record[f"{key}/param/{name}"] = t


def _story(record: dict, mode: str) -> None:
    import torch

    from bitfast.train.checkpoint import load_checkpoint
    from bitfast.train.recipes.story import StoryConfig, story

    with tempfile.TemporaryDirectory() as out:
        story(StoryConfig(output=out, smoke=mode == "smoke", progress=False, plots=False), stream=open(os.devnull, "w"))
        with open(os.path.join(out, "story.json")) as f:
            metrics = json.load(f)

        def numbers(obj, prefix):
            if isinstance(obj, dict):
                for k, v in obj.items():
                    if not any(t in k for t in TIMING_KEYS):
                        numbers(v, f"{prefix}/{k}")
            elif isinstance(obj, list):
                for i, v in enumerate(obj):
                    numbers(v, f"{prefix}/{i}")
            elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
                record[prefix] = torch.tensor(obj, dtype=torch.float64)
        numbers(metrics, "story/metrics")
        for run in sorted(os.listdir(out)):
            path = os.path.join(out, run, "last.pt")
            if os.path.isfile(path):
                for name, t in load_checkpoint(path)["model"].items():
                    record[f"story/{run}/{name}"] = t


def record(out_path: str, story_mode: str = "none", threads: int = 1, triton: bool = True) -> dict:
    """Run the grid in this process's bitfast and save ``{key: tensor or "error: ..."}``."""
    if triton:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    torch.set_num_threads(threads)
    import bitfast
    from bitfast import backends

    record: dict = {}
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    names = [b for b in backends.BACKENDS if b in backends.available_backends()]
    if not triton and "triton" in names:
        names.remove("triton")
    for op, case, build in _grid():
        for backend in names:
            for dtype in dtypes:
                for layout_name, layout in (("nchw", torch.contiguous_format), ("cl", torch.channels_last)):
                    key = f"{op}/{case}/{backend}/{str(dtype)[6:]}/{layout_name}"
                    torch.manual_seed(0)
                    try:
                        outs = build(backend, dtype, layout)
                    except Exception as exc:  # noqa: BLE001 - what is refused is part of the record
                        record[key] = f"error: {type(exc).__name__}: {exc}"
                        continue
                    for k, v in outs.items():
                        record[f"{key}/{k}"] = v.detach()
    _train_steps(record)
    if story_mode != "none":
        _story(record, story_mode)
    record["_meta"] = json.dumps({"bitfast": bitfast.__file__, "torch": torch.__version__, "threads": threads,
                                  "backends": names, "story": story_mode})
    torch.save(record, out_path)
    return record


def _bytes(t):
    import torch

    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


def compare(a_path: str, b_path: str, stream=None) -> int:
    """Print the entries of two records that differ; return how many."""
    import torch

    stream = stream or sys.stdout
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    ma, mb = json.loads(a.pop("_meta")), json.loads(b.pop("_meta"))
    print(f"A: {ma}\nB: {mb}", file=stream)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            diffs.append(f"{key}: only in {'A' if key in a else 'B'}")
            continue
        x, y = a[key], b[key]
        if isinstance(x, str) or isinstance(y, str):
            if x != y if isinstance(x, str) and isinstance(y, str) else True:
                diffs.append(f"{key}: {x if isinstance(x, str) else 'a tensor'} vs {y if isinstance(y, str) else 'a tensor'}")
            continue
        if x.dtype != y.dtype or x.shape != y.shape or x.stride() != y.stride():
            diffs.append(f"{key}: {x.dtype}{tuple(x.shape)} strides {x.stride()} vs {y.dtype}{tuple(y.shape)} "
                         f"strides {y.stride()}")
        elif not torch.equal(_bytes(x), _bytes(y)):
            diffs.append(f"{key}: values differ (max |a-b| {(x.double() - y.double()).abs().max().item():.3g})")
    tensors = sum(1 for v in a.values() if not isinstance(v, str))
    for line in diffs[:200]:
        print(line, file=stream)
    print(f"{len(a)} entries in A ({tensors} tensors), {len(b)} in B: {len(diffs)} differ", file=stream)
    return len(diffs)


def trees(tree_a: str, tree_b: str, story_mode: str, threads: int, triton: bool, keep: str | None) -> int:
    """Record each tree in a child process (that tree first on PYTHONPATH) and compare."""
    folder = keep or tempfile.mkdtemp(prefix="compare-trees-")
    os.makedirs(folder, exist_ok=True)
    outs = []
    for label, tree in (("A", tree_a), ("B", tree_b)):
        out = os.path.join(folder, f"{label}.pt")
        env = {**os.environ, "PYTHONPATH": os.path.abspath(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, os.path.abspath(__file__), "record", out, "--story", story_mode, "--threads", str(threads)]
        if not triton:
            cmd.append("--no-triton")
        print(f"recording {label} ({tree}) ...", flush=True)
        subprocess.run(cmd, env=env, check=True, cwd=os.path.abspath(tree))
        outs.append(out)
    return compare(*outs)


def main(argv=None) -> int:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="record this tree's results")
    r.add_argument("out")
    c = sub.add_parser("compare", help="compare two records")
    c.add_argument("a")
    c.add_argument("b")
    t = sub.add_parser("trees", help="record two built trees and compare them")
    t.add_argument("tree_a")
    t.add_argument("tree_b")
    t.add_argument("--keep", default=None, help="folder for the two records (default: a temporary one)")
    for s in (r, t):
        s.add_argument("--story", default="none", choices=["none", "smoke", "full"],
                       help="also run bitfast story and record its metrics and final checkpoints")
        s.add_argument("--threads", type=int, default=1, help="torch threads (the same for both trees)")
        s.add_argument("--no-triton", dest="triton", action="store_false", help="leave the Triton kernels out")
    args = p.parse_args(argv)
    if args.cmd == "record":
        rec = record(args.out, args.story, args.threads, args.triton)
        print(f"recorded {len(rec) - 1} entries into {args.out}")
        return 0
    if args.cmd == "compare":
        return 1 if compare(args.a, args.b) else 0
    return 1 if trees(args.tree_a, args.tree_b, args.story, args.threads, args.triton, args.keep) else 0


if __name__ == "__main__":
    sys.exit(main())
