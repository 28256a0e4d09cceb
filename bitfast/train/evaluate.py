"""Evaluation: top-1/top-5 accuracy, loss, expected calibration error (15 equal-width
confidence bins, Guo et al., 2017, "On Calibration of Modern Neural Networks"), the
reliability diagram's bins and the confusion matrix, for one model or a logit ensemble.

Every metric is computed from additive sums (counts, correct counts, per-bin confidence and
accuracy sums, confusion counts), so each process evaluates its own shard of the data and a
single all-reduce gives exactly the metrics of the whole set.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bitfast.train.distributed import DistInfo, all_reduce_sum

__all__ = ["EvalSums", "evaluate", "evaluate_checkpoints", "predict", "shard_indices"]


class EvalSums:
    """Additive evaluation statistics over ``num_classes`` classes and ``n_bins`` ECE bins."""

    def __init__(self, num_classes: int, n_bins: int = 15, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"EvalSums: num_classes must be >= 1; got {num_classes}")
        self.num_classes, self.n_bins = num_classes, n_bins
        # [n, correct1, correct5, loss_sum] then bins (count, confidence sum, correct sum), then confusion.
        self.scalars = torch.zeros(4, dtype=torch.float64, device=device)
        self.bins = torch.zeros(3, n_bins, dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Accumulate a batch of ``logits`` (N, C) with integer ``targets`` (N,)."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"EvalSums.add: logits have shape {tuple(logits.shape)}; expected (N, {self.num_classes})")
        logits = logits.detach().double()
        targets = targets.to(logits.device).long()
        k = min(5, self.num_classes)
        topk = logits.topk(k, dim=1).indices
        hit = topk == targets[:, None]
        probs = logits.softmax(1)
        conf, pred = probs.max(1)
        correct = (pred == targets).double()
        self.scalars += torch.stack([
            torch.tensor(float(len(targets)), dtype=torch.float64, device=logits.device),
            hit[:, :1].any(1).double().sum(),
            hit.any(1).double().sum(),
            F.cross_entropy(logits, targets, reduction="sum"),
        ])
        # Bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 cannot occur.
        idx = (conf * self.n_bins).ceil().long().clamp(1, self.n_bins) - 1
        self.bins[0].index_add_(0, idx, torch.ones_like(conf))
        self.bins[1].index_add_(0, idx, conf)
        self.bins[2].index_add_(0, idx, correct)
        self.confusion.index_put_((targets, pred), torch.ones_like(conf), accumulate=True)

    def all_reduce(self, info: DistInfo) -> EvalSums:
        """Sum the statistics over all processes (in place); returns self."""
        for t in (self.scalars, self.bins, self.confusion):
            all_reduce_sum(t, info)
        return self

    def result(self) -> dict:
        """The metrics: ``n``, ``top1``, ``top5``, ``loss``, ``ece`` (fractions in [0, 1]),
        ``reliability`` (per bin: count, mean confidence, accuracy) and ``confusion`` (rows:
        true class, columns: predicted class)."""
        n, c1, c5, loss = self.scalars.tolist()
        if n == 0:
            raise ValueError("evaluate: the evaluation set is empty")
        count, conf, acc = self.bins
        ece = float((acc - conf).abs().sum() / n)
        nz = count.clamp(min=1)
        return {
            "n": int(n), "top1": c1 / n, "top5": c5 / n, "loss": loss / n, "ece": ece,
            "reliability": {
                "count": count.long().tolist(),
                "confidence": (conf / nz).tolist(),
                "accuracy": (acc / nz).tolist(),
            },
            "confusion": self.confusion.long().tolist(),
        }


def shard_indices(n: int, info: DistInfo) -> list[int]:
    """This process's evaluation indices: every ``world_size``-th from ``rank``, no padding
    (so the all-reduced sums count each sample exactly once)."""
    return list(range(info.rank, n, info.world_size))


@torch.no_grad()
def predict(models: Sequence[nn.Module], dataset, *, batch_size: int = 256, info: DistInfo | None = None,
            precision: str = "fp32", channels_last: bool = False, mode: str = "logits",
            workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of this process's shard of ``dataset``, averaged over ``models`` (a logit
    ensemble; ``mode="probs"`` averages probabilities and returns their log). Returns
    ``(logits, targets)`` on the CPU, in shard order."""
    from bitfast.data.sampling import collate
    from bitfast.train.config import PRECISIONS

    info = info or DistInfo()
    if not models:
        raise ValueError("predict: no models given")
    if mode not in ("logits", "probs"):
        raise ValueError(f"predict: mode must be 'logits' or 'probs'; got {mode!r}")
    device = info.device
    subset = torch.utils.data.Subset(dataset, shard_indices(len(dataset), info))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda")
    dtype = PRECISIONS[precision]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    outs, targets = [], []
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            acc = None
            for m in models:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    z = m(x).float()
                z = z.softmax(1) if mode == "probs" else z
                acc = z if acc is None else acc + z
            acc = acc / len(models)
            outs.append((acc.clamp_min(1e-12).log() if mode == "probs" else acc).cpu())
            targets.append(y)
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    if not outs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(targets)


def evaluate(models: nn.Module | Sequence[nn.Module], dataset, num_classes: int, *, batch_size: int = 256,
             info: DistInfo | None = None, precision: str = "fp32", channels_last: bool = False,
             mode: str = "logits", n_bins: int = 15, workers: int = 0) -> dict:
    """Evaluate one model or an ensemble (``mode``: average ``"logits"`` or ``"probs"``) on
    ``dataset``, sharded over the processes and reduced; see ``EvalSums.result`` for the keys."""
    info = info or DistInfo()
    if isinstance(models, nn.Module):
        models = [models]
    logits, targets = predict(models, dataset, batch_size=batch_size, info=info, precision=precision,
                              channels_last=channels_last, mode=mode, workers=workers)
    sums = EvalSums(num_classes, n_bins, device=info.device)
    if len(targets):
        sums.add(logits.to(info.device), targets.to(info.device))
    return sums.all_reduce(info).result()


def evaluate_checkpoints(checkpoints: Sequence[str], *, output: str = "runs/eval", data: str | None = None,
                         val_data: str | None = None, classes: Sequence[int] | None = None, crop: int | None = None,
                         ensemble: str = "logits", use_ema: bool = True, batch_size: int = 256,
                         device: str | None = None, trusted: bool = False, stream=None) -> dict:
    """Evaluate one training checkpoint, or a logit (``ensemble="probs"``: probability) ensemble
    of several of the same task, on its own test data unless ``data`` / ``val_data`` /
    ``classes`` say otherwise (see ``checkpoint_eval_data``): top-1/top-5, loss, ECE with a
    reliability diagram and a confusion matrix, written to ``output`` (``eval.json`` and the
    plots) and printed to ``stream``. EMA weights are used when present and ``use_ema``. The
    command ``bitfast eval``. Returns the metrics."""
    from bitfast.train import plots
    from bitfast.train.build import checkpoint_eval_data, model_from_checkpoint, summary_table
    from bitfast.train.options import check_device

    stream = stream or sys.stdout
    check_device(device)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoints = list(checkpoints)
    models, states = [], []
    for path in checkpoints:
        model, state = model_from_checkpoint(path, use_ema=use_ema, device=device, trusted=trusted)
        models.append(model)
        states.append(state)
    first = states[0]
    names = first.get("classes")
    for path, st in zip(checkpoints[1:], states[1:]):
        if st.get("num_classes") != first.get("num_classes") or st.get("classes") != names:
            raise ValueError(f"cannot ensemble {path} with {checkpoints[0]}: they were trained on other classes "
                             f"({st.get('classes')} vs {names}); pass checkpoints of the same task")
    d, _ = checkpoint_eval_data(first, data=data, val_data=val_data, classes=classes, crop=crop)
    res = evaluate(models, d.eval, d.num_classes, batch_size=batch_size, info=None, mode=ensemble)
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "eval.json"), "w") as f:
        json.dump({**res, "checkpoints": checkpoints, "ema": [s["used_ema"] for s in states],
                   "classes": d.class_names}, f)
    written = []
    if plots.available():
        written.append(plots.plot_reliability(res["reliability"], os.path.join(output, "reliability.png"), ece=res["ece"]))
        if d.num_classes <= 100:
            written.append(plots.plot_confusion(res["confusion"], os.path.join(output, "confusion.png"), d.class_names))
    else:
        print(plots.missing_note(), file=stream)
    what = f"ensemble of {len(models)} ({ensemble})" if len(models) > 1 else checkpoints[0]
    kinds = ["EMA" if s["used_ema"] else "raw" for s in states]
    ema = f"{kinds[0]} weights" if len(set(kinds)) == 1 else "weights: " + ", ".join(kinds)
    print(f"bitfast eval: {what} ({ema}) on {d.description}", file=stream)
    rows = [["top-1", f"{100 * res['top1']:.2f}% of {res['n']}"], ["top-5", f"{100 * res['top5']:.2f}%"],
            ["loss", f"{res['loss']:.4f}"], ["ECE (15 bins)", f"{100 * res['ece']:.2f}%"],
            ["outputs", ", ".join(["eval.json"] + [os.path.basename(p) for p in written if p])]]
    print(summary_table(rows, ["metric", "value"]), file=stream)
    if d.num_classes <= 20:
        print("confusion matrix (rows: true, columns: predicted)", file=stream)
        width = max(len(n) for n in d.class_names + [str(max(map(max, res["confusion"])))])
        print(" " * (width + 1) + " ".join(n.rjust(width) for n in d.class_names), file=stream)
        for name, row in zip(d.class_names, res["confusion"]):
            print(name.rjust(width) + " " + " ".join(str(v).rjust(width) for v in row), file=stream)
    return res
