"""Upstream (pre-)training (``bitfast pretrain``), the recipe of BiT-S/BiT-M.

Kolesnikov et al., 2020, "Big Transfer (BiT)", section 3.1: SGD momentum 0.9, lr 0.03 x
batch/256, linear warm-up (5000 steps), weight decay 1e-4, 90 epochs with the rate divided by
10 at epochs 30, 60 and 80; inception-style random-resized crop (scale 0.08-1) and flip.
``lr_schedule="cosine"`` gives cosine decay after a warm-up over 10% of training instead.
Label smoothing is off unless asked for.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitfast.train import schedules
from bitfast.train.build import build_data, build_model, finish_run, make_eval_fn
from bitfast.train.distributed import DistInfo, init_distributed
from bitfast.train.loop import TrainConfig, train_loop

__all__ = ["PretrainConfig", "make_upstream_lr", "pretrain"]

LR_SCHEDULES = ("step", "cosine")


@dataclass
class PretrainConfig(TrainConfig):
    """``TrainConfig`` with the upstream recipe's defaults: ``base_lr`` is the rate at batch
    256 (default 0.03), ``warmup_steps`` defaults to 5000 (step schedule; the cosine schedule
    warms up over ``warmup_fraction`` of training), ``epochs`` / ``decay_epochs`` give the step
    schedule, ``steps_per_epoch`` defaults to ``len(train) // batch_size``. ``inception_crop``:
    random-resized crop (ImageFolder data)."""

    epochs: int = 90
    decay_epochs: Sequence[int] = (30, 60, 80)
    lr_schedule: str = "step"
    warmup_fraction: float = 0.1
    steps_per_epoch: int | None = None
    inception_crop: bool = True
    weight_decay: float = 1e-4
    freeze_bn: bool = False
    zero_head: bool = False
    crop: int | None = 224
    resize: int | None = None
    output: str = "runs/pretrain"


def make_upstream_lr(cfg: PretrainConfig, steps_per_epoch: int):
    """``(lr_at, total_steps, peak)`` of the upstream recipe for ``cfg``."""
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {LR_SCHEDULES}; got {cfg.lr_schedule!r}")
    if cfg.epochs < 1:
        raise ValueError(f"--epochs must be >= 1; got {cfg.epochs}")
    base = cfg.base_lr if cfg.base_lr is not None else 0.03
    total = cfg.epochs * steps_per_epoch
    peak = schedules.scaled_lr(base, cfg.batch_size, 256)
    if cfg.lr_schedule == "cosine":
        return (lambda s: schedules.cosine_lr(s, total, peak, warmup_fraction=cfg.warmup_fraction)), total, peak
    warmup = 5000 if cfg.warmup_steps is None else cfg.warmup_steps
    decay = tuple(cfg.decay_epochs)
    return (lambda s: schedules.upstream_step_lr(s, steps_per_epoch, cfg.batch_size, base, warmup, cfg.epochs, decay)), total, peak


def pretrain(cfg: PretrainConfig, info: DistInfo | None = None, stream=None) -> dict:
    """Train ``cfg.model`` from scratch (or from ``cfg.pretrained``) on ``cfg.data`` with the
    upstream recipe; under torchrun, with DDP. Prints the plan, a progress bar and a summary;
    writes checkpoints, ``metrics.jsonl``, ``final_eval.json`` and plots into ``cfg.output``.
    Returns ``{"result", "final", "data", "model", "total_steps", "peak_lr"}``."""
    stream = stream or sys.stdout
    info = info or init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    crop = cfg.crop if cfg.crop is not None else 224
    resize = cfg.resize if cfg.resize is not None else crop
    data = build_data(cfg, resize, crop, inception=cfg.inception_crop)
    spe = cfg.steps_per_epoch or max(1, len(data.train) // cfg.batch_size)
    lr_at, total, peak = make_upstream_lr(cfg, spe)
    model, init_note = build_model(cfg, data.num_classes, zero_head=cfg.zero_head)
    if info.is_main:
        sched = (f"cosine, warm-up {cfg.warmup_fraction:.0%}" if cfg.lr_schedule == "cosine" else
                 f"step: /10 at epochs {tuple(cfg.decay_epochs)} of {cfg.epochs}, warm-up "
                 f"{5000 if cfg.warmup_steps is None else cfg.warmup_steps} steps")
        print(f"bitfast pretrain: {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{init_note}) on {data.description}", file=stream)
        print(f"  upstream recipe: {cfg.epochs} epochs x {spe} steps = {total} steps of {cfg.batch_size}, lr {peak:.3g} "
              f"(0.03 x {cfg.batch_size}/256), {sched}, weight decay {cfg.weight_decay}, label smoothing "
              f"{cfg.label_smoothing}; {info.world_size} process(es) on {info.device}", file=stream)
    result = train_loop(
        model, data.train, cfg=cfg, total_steps=total, lr_at=lr_at, num_classes=data.num_classes, info=info,
        eval_fn=make_eval_fn(data, cfg, info), desc="pretrain",
        run_meta={"model": cfg.model, "classes": data.class_names, "resolution": crop},
    )
    final = finish_run(result, data, cfg, info, "bitfast pretrain: summary", stream=stream)
    return {"result": result, "final": final, "data": data, "model": result["model"], "total_steps": total, "peak_lr": peak}
