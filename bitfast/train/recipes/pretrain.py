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
from bitfast.train.config import TrainConfig
from bitfast.train.distributed import DistInfo, init_distributed
from bitfast.train.loop import train_loop
from bitfast.train.options import Options
from bitfast.train.outputs import start_run

__all__ = ["PretrainConfig", "make_upstream_lr", "pretrain"]

LR_SCHEDULES = ("step", "cosine")
RECIPE_EPOCHS, RECIPE_DECAY_EPOCHS = 90, (30, 60, 80)


def decay_epochs(cfg: PretrainConfig) -> tuple[int, ...]:
    """The step schedule's decay epochs: ``--decay-epochs`` when given, else the recipe's
    (30, 60, 80) of 90 epochs scaled to ``--epochs`` (same fractions, rounded; decays that fall
    on epoch 0 or on the last epoch dropped)."""
    if cfg.decay_epochs is not None:
        return tuple(int(e) for e in cfg.decay_epochs)
    scaled = (round(e * cfg.epochs / RECIPE_EPOCHS) for e in RECIPE_DECAY_EPOCHS)
    return tuple(sorted({e for e in scaled if 1 <= e < cfg.epochs}))


@dataclass
class PretrainConfig(TrainConfig):
    """``TrainConfig`` with the upstream recipe's defaults: ``base_lr`` is the rate at batch
    256 (default 0.03), ``warmup_steps`` defaults to 5000 (step schedule; the cosine schedule
    warms up over ``warmup_fraction`` of training), ``epochs`` / ``decay_epochs`` give the step
    schedule (``decay_epochs`` default: the recipe's, scaled to ``epochs``), ``steps_per_epoch`` defaults to ``len(train) // batch_size``. ``inception_crop``:
    random-resized crop (ImageFolder data)."""

    epochs: int = 90
    decay_epochs: Sequence[int] | None = None  # None: the recipe's (30, 60, 80) of 90, scaled to ``epochs``
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

    def validate(self) -> None:
        """``TrainConfig.validate`` plus the upstream schedule's options."""
        super().validate()
        v = Options(self)
        v.number("epochs", low=1, integer=True)
        v.integers("decay_epochs", low=1, high=self.epochs, min_count=0, increasing=True, optional=True)
        v.choice("lr_schedule", LR_SCHEDULES)
        v.number("warmup_fraction", low=0, high=1, high_open=True)
        v.number("steps_per_epoch", low=1, integer=True, optional=True)


DEFAULT_WARMUP = 5000  # steps: the upstream recipe's warm-up
MAX_DEFAULT_WARMUP_FRACTION = 0.1  # the default warm-up never takes more of a (short) run than this


def plan_warmup(cfg: PretrainConfig, total: int, steps_per_epoch: int) -> tuple[int, str]:
    """The warm-up steps of an upstream run of ``total`` steps and how they were chosen.

    ``--warmup-steps`` when given (it must be shorter than the run and, with the step
    schedule, end by the first decay); otherwise the recipe's 5000 steps, scaled down to 10% of
    the run when that is shorter (the cosine schedule: ``--warmup-fraction`` of the run)."""
    decays = decay_epochs(cfg)
    first_decay = min(decays) * steps_per_epoch if decays else total
    if cfg.warmup_steps is not None:
        w = cfg.warmup_steps
        if not w < total:
            raise ValueError(f"--warmup-steps {w} must be shorter than the run ({total} steps = --epochs {cfg.epochs} x "
                             f"{steps_per_epoch} steps per epoch): pass a smaller --warmup-steps or more --epochs")
        if cfg.lr_schedule == "step" and w > first_decay:
            raise ValueError(f"--warmup-steps {w} would end after the first decay (epoch {min(decays)} = step "
                             f"{first_decay}): pass --warmup-steps {first_decay} or less, or later --decay-epochs")
        return w, f"warm-up {w} steps"
    if cfg.lr_schedule == "cosine":
        w = min(round(cfg.warmup_fraction * total), total - 1)
        return w, f"warm-up {w} steps ({cfg.warmup_fraction:.0%} of the run, --warmup-fraction)"
    cap = int(MAX_DEFAULT_WARMUP_FRACTION * total)
    if DEFAULT_WARMUP <= cap:
        return DEFAULT_WARMUP, f"warm-up {DEFAULT_WARMUP} steps"
    w = min(cap, first_decay)
    return w, (f"warm-up {w} steps (the recipe's {DEFAULT_WARMUP}, scaled to {MAX_DEFAULT_WARMUP_FRACTION:.0%} of "
               f"this {total}-step run; --warmup-steps to set)")


def make_upstream_lr(cfg: PretrainConfig, steps_per_epoch: int):
    """``(lr_at, total_steps, peak)`` of the upstream recipe for ``cfg`` (see ``plan_warmup``)."""
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {LR_SCHEDULES}; got {cfg.lr_schedule!r}")
    if cfg.epochs < 1:
        raise ValueError(f"--epochs must be >= 1; got {cfg.epochs}")
    base = cfg.base_lr if cfg.base_lr is not None else 0.03
    total = cfg.epochs * steps_per_epoch
    peak = base * cfg.batch_size / 256  # the linear scaling rule (schedules.scaled_lr, which refuses 0)
    warmup, _ = plan_warmup(cfg, total, steps_per_epoch)
    if peak == 0:
        return (lambda s: 0.0 if s < total else None), total, peak
    if cfg.lr_schedule == "cosine":
        fraction = warmup / total
        return (lambda s: schedules.cosine_lr(s, total, peak, warmup_fraction=fraction)), total, peak
    decay = decay_epochs(cfg)
    return (lambda s: schedules.upstream_step_lr(s, steps_per_epoch, cfg.batch_size, base, warmup, cfg.epochs, decay)), total, peak


def pretrain(cfg: PretrainConfig, info: DistInfo | None = None, stream=None) -> dict:
    """Train ``cfg.model`` from scratch (or from ``cfg.pretrained``) on ``cfg.data`` with the
    upstream recipe; under torchrun, with DDP. Prints the plan, a progress bar and a summary;
    writes checkpoints, ``metrics.jsonl``, ``final_eval.json`` and plots into ``cfg.output``.
    Returns ``{"result", "final", "data", "model", "total_steps", "peak_lr"}``."""
    stream = stream or sys.stdout
    start_run(cfg)
    info = info or init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    crop = cfg.crop if cfg.crop is not None else 224
    resize = cfg.resize if cfg.resize is not None else crop
    data = build_data(cfg, resize, crop, inception=cfg.inception_crop)
    spe = cfg.steps_per_epoch or max(1, len(data.train) // cfg.batch_size)
    lr_at, total, peak = make_upstream_lr(cfg, spe)
    _, warmup_note = plan_warmup(cfg, total, spe)
    model, init_note = build_model(cfg, data.num_classes, zero_head=cfg.zero_head)
    if info.is_main:
        base = cfg.base_lr if cfg.base_lr is not None else 0.03
        sched = (f"cosine, {warmup_note}" if cfg.lr_schedule == "cosine" else
                 f"step: /10 at epochs {decay_epochs(cfg)} of {cfg.epochs}"
                 + ("" if cfg.decay_epochs is not None else " (the recipe's 30, 60, 80 of 90, scaled)")
                 + f", {warmup_note}")
        print(f"bitfast pretrain: {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{init_note}) on {data.description}", file=stream)
        print(f"  upstream recipe: {cfg.epochs} epochs x {spe} steps = {total} steps of {cfg.batch_size}, lr {peak:.3g} "
              f"({base:g} x {cfg.batch_size}/256), {sched}, weight decay {cfg.weight_decay}, label smoothing "
              f"{cfg.label_smoothing}; {info.world_size} process(es) on {info.device}", file=stream)
    result = train_loop(
        model, data.train, cfg=cfg, total_steps=total, lr_at=lr_at, num_classes=data.num_classes, info=info,
        eval_fn=make_eval_fn(data, cfg, info), desc="pretrain",
        run_meta={"model": cfg.model, "classes": data.class_names, "resolution": crop},
    )
    final = finish_run(result, data, cfg, info, "bitfast pretrain: summary", stream=stream)
    return {"result": result, "final": final, "data": data, "model": result["model"], "total_steps": total, "peak_lr": peak}
