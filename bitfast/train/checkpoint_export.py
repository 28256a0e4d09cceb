"""Inference export of a training checkpoint (``bitfast export``): the model with weight
standardization folded, optionally pruned and/or int8, each variant evaluated and reported."""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Sequence

import torch

__all__ = ["conv_sparsity", "export_checkpoint"]


def conv_sparsity(model) -> float:
    """Zero weights over all conv weights outside the head (float or int8 convs)."""
    from bitfast.plain_model import Int8Conv2d

    zeros = total = 0
    for name, m in model.named_modules():
        if name.startswith("head"):
            continue
        w = m.weight_int8 if isinstance(m, Int8Conv2d) else (m.weight if isinstance(m, torch.nn.Conv2d) else None)
        if w is not None:
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / max(total, 1)


def export_checkpoint(checkpoint: str, out: str, *, prune: float | None = None, structured: bool = False,
                      prune_scope: str = "global", int8: bool = False, use_ema: bool = True, data: str | None = None,
                      val_data: str | None = None, classes: Sequence[int] | None = None, crop: int | None = None,
                      evaluate_variants: bool = True, batch_size: int = 256, device: str | None = None,
                      trusted: bool = False, stream=None) -> dict:
    """Export a training checkpoint for inference into ``out``: weight standardization folded
    into plain convs (``model.pt`` with ``config.json`` and the one-file torch-only module
    ``bitfast_plain_model.py``), optionally magnitude-pruned (``prune``, ``structured``,
    ``prune_scope``: ``model_pruned.pt``) and/or with int8 weights (``int8``: ``model_int8.pt``,
    after pruning when both); each variant evaluated on the checkpoint's own test data unless
    ``data`` / ``val_data`` / ``classes`` say otherwise (``evaluate_variants=False``: none),
    reported in ``export.json`` and a table on ``stream``. The command ``bitfast export``.
    Returns the ``export.json`` content."""
    from bitfast.compress import prune_magnitude, quantize_int8
    from bitfast.export import for_inference, write_plain_module
    from bitfast.train.build import checkpoint_eval_data, model_from_checkpoint, summary_table
    from bitfast.train.evaluate import evaluate
    from bitfast.train.options import check_device

    stream = stream or sys.stdout
    check_device(device)
    if prune is not None and not 0.0 <= prune < 1.0:
        raise ValueError(f"--prune must be a fraction in [0, 1); got {prune}")
    if structured and prune is None:
        raise ValueError("--structured applies to pruning: pass --prune AMOUNT too")
    device = torch.device(device or "cpu")
    model, state = model_from_checkpoint(checkpoint, use_ema=use_ema, device=device,
                                         trusted=trusted)
    exported = for_inference(model)
    if not hasattr(exported, "config_json"):
        raise ValueError(f"{checkpoint}: its model ({type(exported).__name__}) does not export to a PlainResNetV2")
    os.makedirs(out, exist_ok=True)

    # The evaluation data: the checkpoint's own (its digits, its ImageFolder's val/) unless given.
    d, crop = None, crop or int(state.get("resolution") or 128)
    if evaluate_variants:
        d, crop = checkpoint_eval_data(state, data=data, val_data=val_data, classes=classes, crop=crop)

    def accuracy(net) -> dict | None:
        if d is None:
            return None
        res = evaluate(net, d.eval, d.num_classes, batch_size=batch_size)
        return {k: res[k] for k in ("top1", "top5", "loss", "n")}

    def save(net, name: str) -> str:
        path = os.path.join(out, name)
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, path)
        return path

    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(exported.config_json)
    write_plain_module(os.path.join(out, "bitfast_plain_model.py"))
    rows = [{"variant": "training model (bitfast)", "file": None, "sparsity": conv_sparsity(for_inference(model)),
             "eval": accuracy(model)}]
    rows.append({"variant": "exported float", "file": save(exported, "model.pt"), "sparsity": conv_sparsity(exported),
                 "eval": accuracy(exported)})
    last, notes = exported, []
    if prune is not None:
        pruned = copy.deepcopy(exported)
        rep = prune_magnitude(pruned, prune, structured=structured, scope=prune_scope)
        kind = "structured" if structured else "unstructured"
        rows.append({"variant": f"pruned {prune:g} ({kind}, {prune_scope})", "file": save(pruned, "model_pruned.pt"),
                     "sparsity": conv_sparsity(pruned), "eval": accuracy(pruned)})
        last = pruned
        notes.append(str(rep).splitlines()[0])
    if int8:
        q = copy.deepcopy(last)
        rep = quantize_int8(q)
        rows.append({"variant": "int8 weights" + (" (pruned)" if last is not exported else ""),
                     "file": save(q, "model_int8.pt"), "sparsity": conv_sparsity(q), "eval": accuracy(q)})
        notes.append(str(rep))
        rounded = rows[-1]["sparsity"] - conv_sparsity(last)
        if rounded > 0:
            rows[-1]["rounding_zeros"] = rounded
            notes.append(f"int8: {100 * rounded:.1f}% of the conv weights became 0 by rounding (|w| below half a "
                         "quantization step); they are counted in its conv sparsity")
    for r in rows:
        r["MiB"] = os.path.getsize(r["file"]) / 2**20 if r["file"] else None
    report = {"checkpoint": checkpoint, "ema": state["used_ema"], "classes": state.get("classes"),
              "resolution": crop, "data": d.description if d else None, "variants": rows}
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"bitfast export: {checkpoint} ({'EMA' if state['used_ema'] else 'raw'} weights) -> {out}"
          + (f"; evaluated on {d.description}" if d else ""), file=stream)
    table = [[r["variant"], os.path.basename(r["file"]) if r["file"] else "-",
              f"{r['MiB']:.2f}" if r["MiB"] is not None else "-",
              f"{100 * r['sparsity']:.1f}%" + (f" ({100 * r['rounding_zeros']:.1f}% by rounding)"
                                               if r.get("rounding_zeros") else ""),
              f"{100 * r['eval']['top1']:.2f}%" if r["eval"] else "-", f"{r['eval']['loss']:.4f}" if r["eval"] else "-"]
             for r in rows]
    print(summary_table(table, ["model", "file", "MiB", "conv sparsity", "test top-1", "test loss"]), file=stream)
    for n in notes:
        print(n, file=stream)
    print("load without bitfast: bitfast_plain_model.PlainResNetV2(**json.load(open('config.json'))), then "
          "load_state_dict(torch.load('model.pt', weights_only=True))"
          + (" or load_int8_state_dict(model, torch.load('model_int8.pt', weights_only=True))" if int8 else ""),
          file=stream)
    return report
