"""PNG plots of a run (matplotlib, optional): loss and accuracy curves, the learning-rate
schedule, the reliability diagram and the confusion matrix. Without matplotlib every function
returns None and ``missing_note()`` says how to get the plots."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

__all__ = ["available", "missing_note", "plot_confusion", "plot_curves", "plot_reliability", "plot_story"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def available() -> bool:
    """Whether matplotlib is installed (plots are written)."""
    return _pyplot() is not None


def missing_note() -> str:
    """The note printed when plots are skipped."""
    return "plots skipped: matplotlib is not installed (pip install matplotlib, or bitfast[plots])"


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_curves(history: Sequence[Mapping], out_dir: str, prefix: str = "") -> list[str]:
    """From a run's records (``{"kind": "train", "step", "loss", "lr"}`` and ``{"kind": "eval",
    "step", "top1"}``) write ``PREFIXloss.png``, ``PREFIXaccuracy.png`` (when evaluated) and
    ``PREFIXlr.png`` into ``out_dir``; returns the paths written ([] without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    train = [r for r in history if r.get("kind") == "train"]
    evals = [r for r in history if r.get("kind") == "eval" and r.get("top1") is not None]
    paths = []
    if train:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
        ax.set(xlabel="step", ylabel="training loss", title="loss")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, os.path.join(out_dir, f"{prefix}loss.png")))
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot([r["step"] for r in train], [r["lr"] for r in train], lw=1.5)
        ax.set(xlabel="step", ylabel="learning rate", title="learning-rate schedule")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, os.path.join(out_dir, f"{prefix}lr.png")))
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot([r["step"] for r in evals], [100 * r["top1"] for r in evals], marker="o")
        ax.set(xlabel="step", ylabel="top-1 accuracy (%)", title="accuracy")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, os.path.join(out_dir, f"{prefix}accuracy.png")))
    return paths


def plot_reliability(reliability: Mapping, path: str, title: str = "reliability diagram", ece: float | None = None) -> str | None:
    """Bar chart of accuracy per confidence bin against the diagonal (``reliability`` as in
    ``EvalSums.result()``); returns the path, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    acc, count = reliability["accuracy"], reliability["count"]
    n = len(acc)
    centers = [(i + 0.5) / n for i in range(n)]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(centers, [a if c else 0 for a, c in zip(acc, count)], width=1 / n, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=title + (f" (ECE {100 * ece:.2f}%)" if ece is not None else ""))
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_confusion(confusion: Sequence[Sequence[int]], path: str, labels: Sequence[str] | None = None) -> str | None:
    """The confusion matrix as an image (rows: true class, columns: predicted)."""
    plt = _pyplot()
    if plt is None:
        return None
    k = len(confusion)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * k, 1 + 0.45 * k) if k > 8 else (4.5, 4))
    ax.imshow(confusion, cmap="Blues")
    if k <= 30:
        ticks = list(range(k))
        names = list(labels) if labels is not None else [str(i) for i in ticks]
        ax.set_xticks(ticks, names, rotation=90 if k > 10 else 0)
        ax.set_yticks(ticks, names)
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, str(confusion[i][j]), ha="center", va="center", fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    return _save(fig, path)


def plot_story(curves: Mapping[str, Sequence[Mapping]], fewshot: Mapping[int, tuple[float, float]], out_dir: str) -> list[str]:
    """The story's comparison: accuracy and loss curves of fine-tuned vs from-scratch
    (``curves``: label -> records) and ridge few-shot accuracy vs shots (``fewshot``:
    k -> (mean, std)); returns the paths written."""
    plt = _pyplot()
    if plt is None:
        return []
    paths = []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, hist in curves.items():
        tr = [r for r in hist if r.get("kind") == "train"]
        ev = [r for r in hist if r.get("kind") == "eval" and r.get("top1") is not None]
        if tr:
            a1.plot([r["step"] for r in tr], [r["loss"] for r in tr], lw=1, label=label)
        if ev:
            a2.plot([r["step"] for r in ev], [100 * r["top1"] for r in ev], marker="o", label=label)
    a1.set(xlabel="step", ylabel="training loss", title="digits 5-9: training loss")
    a2.set(xlabel="step", ylabel="test top-1 (%)", title="digits 5-9: test accuracy")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    paths.append(_save(fig, os.path.join(out_dir, "transfer_vs_scratch.png")))
    if fewshot:
        ks = sorted(fewshot)
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.errorbar(ks, [100 * fewshot[k][0] for k in ks], yerr=[100 * fewshot[k][1] for k in ks], marker="o", capsize=3)
        ax.set(xscale="log", xticks=ks, xlabel="examples per class", ylabel="test top-1 (%)",
               title="few-shot ridge heads on frozen upstream features")
        ax.set_xticklabels([str(k) for k in ks])
        ax.grid(alpha=0.3)
        paths.append(_save(fig, os.path.join(out_dir, "fewshot.png")))
    return paths
