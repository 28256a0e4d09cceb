"""What a recipe tells the training loop about its task: how a batch becomes a loss, and what
else to log. The loop (``bitfast.train.loop``) knows nothing else about the task, so a new task
(detection, segmentation, distillation) is a new :class:`Task`, not an edit of the loop.

A step of the loop, as the task sees it::

    x, y = task.prepare(x, y)                      # once per step, the process's whole batch
    for each micro-batch (xs, ys):
        with autocast: out = task.forward(net, xs)
        loss_sum, parts = task.loss(out, xs, ys)   # summed over the micro-batch
        (loss_sum / local_batch).backward()

The loop logs ``loss`` (the step's sum over the global batch divided by the batch size) and
each entry of ``parts`` the same way, all read back from the device in one transfer. The
task's random generators (:meth:`Task.generators`) are saved in checkpoints and restored on
resume, so a resumed run draws what the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bitfast.ops.checks import int_at_least, real

__all__ = ["Classification", "Task"]


class Task:
    """The task-specific part of a training step (subclass it; see the module docs).

    Attributes:
        num_classes: the number of output classes, or None where the task has none; stored in
            checkpoints and checked on resume.
    """

    num_classes: int | None = None

    def generators(self) -> dict[str, torch.Generator]:
        """The task's random generators by name: saved in every checkpoint and restored on
        resume (none by default)."""
        return {}

    def prepare(self, x: torch.Tensor, y):
        """The step's whole batch (this process's share) before it is cut into micro-batches;
        returns ``(x, y)`` (unchanged by default)."""
        return x, y

    def forward(self, net: nn.Module, x: torch.Tensor):
        """The model's output for a micro-batch; runs under the run's autocast (``net(x)`` by
        default)."""
        return net(x)

    def loss(self, output, x: torch.Tensor, y) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss *summed* over the micro-batch (a 0-d float tensor the loop back-propagates)
        and named parts to log (0-d tensors, also sums over the micro-batch; may be empty)."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(output, x, y)")


class Classification(Task):
    """Image classification: cross-entropy on the model's logits, with optional label smoothing
    and MixUp (one Beta draw and pairing per step from the task's own generator, seeded from
    the run's seed; targets become soft).

    ``loss_fn(x, logits, targets)`` (optional) replaces the cross-entropy: it gets the
    micro-batch's (possibly mixed) inputs, the logits and the targets (class indices, or soft
    targets under MixUp) and returns the loss summed over the micro-batch (``bitfast distill``
    adds a teacher's soft targets this way).
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.0, label_smoothing: float = 0.0, seed: int = 0,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.num_classes = int_at_least("Classification", "num_classes", num_classes, 1)
        self.mixup_alpha = real("Classification", "mixup_alpha", mixup_alpha or 0.0, low=0.0)
        self.label_smoothing = real("Classification", "label_smoothing", label_smoothing or 0.0, low=0.0, high=1.0)
        self.loss_fn = loss_fn
        self._mix_gen = torch.Generator().manual_seed(int(seed) + 12345)

    def generators(self) -> dict[str, torch.Generator]:
        """The MixUp generator, saved as ``"mixup"``."""
        return {"mixup": self._mix_gen}

    def prepare(self, x: torch.Tensor, y: torch.Tensor):
        """MixUp the step's batch when ``mixup_alpha > 0`` (soft targets), else nothing."""
        if self.mixup_alpha > 0:
            from bitfast.train.mixup import mixup

            x, y, _ = mixup(x, y, self.mixup_alpha, self.num_classes, generator=self._mix_gen)
        return x, y

    def loss(self, output: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Summed cross-entropy in float32 (soft targets under MixUp), or ``loss_fn``'s loss."""
        if self.loss_fn is not None:
            return self.loss_fn(x, output, y), {}
        logits = output.float()
        if self.mixup_alpha > 0:
            logp = F.log_softmax(logits, dim=-1)
            if self.label_smoothing:
                y = y * (1 - self.label_smoothing) + self.label_smoothing / logits.shape[-1]
            return -(y * logp).sum(), {}
        return F.cross_entropy(logits, y, reduction="sum", label_smoothing=self.label_smoothing), {}
