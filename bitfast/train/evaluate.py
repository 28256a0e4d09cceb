"""Evaluation: top-1/top-5 accuracy, loss, expected calibration error (15 equal-width
confidence bins, Guo et al., 2017, "On Calibration of Modern Neural Networks"), the
reliability diagram's bins and the confusion matrix, for one model or a logit ensemble.

Every metric is computed from additive sums (counts, correct counts, per-bin confidence and
accuracy sums, confusion counts), so each process evaluates its own shard of the data and a
single all-reduce gives exactly the metrics of the whole set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bitfast.train.distributed import DistInfo, all_reduce_sum

__all__ = ["EvalSums", "evaluate", "predict", "shard_indices"]


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
    from bitfast.train.loop import PRECISIONS, _collate

    info = info or DistInfo()
    if not models:
        raise ValueError("predict: no models given")
    if mode not in ("logits", "probs"):
        raise ValueError(f"predict: mode must be 'logits' or 'probs'; got {mode!r}")
    device = info.device
    subset = torch.utils.data.Subset(dataset, shard_indices(len(dataset), info))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=_collate, pin_memory=device.type == "cuda")
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
