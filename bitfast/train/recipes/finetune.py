"""Fine-tuning with BiT-HyperRule (``bitfast finetune``).

Kolesnikov et al., 2020, "Big Transfer (BiT)", section 3.3: every hyper-parameter follows
from the number of training examples and the image size (``bitfast.train.hyperrule``):
resize/crop, the step schedule ``[warmup, d1, d2, d3, total]``, lr 0.003 at batch 512 (scaled
linearly for other batches) with linear warm-up and a tenfold decay after each decay point,
MixUp alpha 0.1 from 20k examples, a zero-initialised head, SGD momentum 0.9 and no weight
decay. Every value can be overridden in ``FinetuneConfig``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitfast.train import hyperrule
from bitfast.train.build import build_model, build_planned_data, finish_run, make_eval_fn
from bitfast.train.config import TrainConfig
from bitfast.train.distributed import DistInfo, init_distributed
from bitfast.train.loop import train_loop
from bitfast.train.options import Options
from bitfast.train.outputs import start_run

__all__ = ["FinetuneConfig", "describe_lr", "finetune", "plan_finetune", "step_lr"]


@dataclass
class FinetuneConfig(TrainConfig):
    """``TrainConfig`` plus the HyperRule's knobs. ``schedule`` ([warmup, d1, d2, d3, total]
    steps) replaces the HyperRule's; ``steps`` alone rescales it (same fractions);
    ``base_lr`` is the rate at batch 512 (default 0.003); ``variant`` picks the resolution
    table (``"release"`` 512/480 or ``"paper"`` 448/384 for large images). ``lora_rank`` > 0
    wraps the model's StdConvs (all but the stem) with rank-``lora_rank`` LoRA updates scaled by
    ``lora_alpha / lora_rank`` (``lora_alpha`` default: the rank) and trains only those and the
    head (``bitfast.adapt.lora``)."""

    schedule: Sequence[int] | None = None
    variant: str = "release"
    lora_rank: int = 0
    lora_alpha: float | None = None
    output: str = "runs/finetune"

    def validate(self) -> None:
        """``TrainConfig.validate`` plus the schedule, the resolution table and LoRA's options."""
        super().validate()
        v = Options(self)
        if self.schedule is not None:
            v.integers("schedule", low=0, min_count=5)
            sched = list(self.schedule)
            if len(sched) != 5 or sorted(sched) != sched or sched[-1] < 1:
                raise ValueError(f"--schedule must be 5 non-decreasing steps W D1 D2 D3 TOTAL with TOTAL >= 1; got {sched}")
        v.choice("variant", hyperrule.VARIANTS)
        v.number("lora_rank", low=0, integer=True)
        v.number("lora_alpha", low=0, low_open=True, optional=True)
        if self.lora_alpha is not None and not self.lora_rank:
            raise ValueError("--lora-alpha scales LoRA updates: pass --lora-rank R too")
        if self.lora_rank and self.linear_probe:
            raise ValueError("--lora-rank and --linear-probe exclude each other (a linear probe trains the head alone); "
                             "drop one of them")


def step_lr(step: int, schedule: Sequence[int], peak: float) -> float | None:
    """The HyperRule's learning rate for an explicit ``schedule`` ``[warmup, d1, ..., total]``:
    linear warm-up from 0, then ``peak / 10**m`` (``m`` decay points strictly below ``step``);
    ``None`` from ``total`` on."""
    warmup, *decays, total = schedule
    if step >= total:
        return None
    if step < warmup:
        return peak * step / warmup
    return peak / 10 ** sum(1 for d in decays if d < step)


def plan_finetune(cfg: FinetuneConfig, n: int, image_size: tuple[int, int] | None) -> dict:
    """The resolved settings of a fine-tuning run of ``n`` examples of ``image_size`` (the
    dataset's typical size, see ``hyperrule.dataset_image_size``): the HyperRule's values with
    the config's overrides. Keys: ``resize``, ``crop``, ``schedule``, ``peak_lr`` (the rate
    used: ``base_lr`` x batch / 512), ``base_lr``, ``mixup_alpha``, ``hyperrule`` (the untouched
    rule, for the record). A ``--warmup-steps`` that does not end before the run does, or
    after the schedule's first decay, raises ``ValueError`` naming the flags."""
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {cfg.batch_size}")
    rule = hyperrule.settings(n, image_size or (8, 8), batch_size=cfg.batch_size, variant=cfg.variant)
    base = hyperrule.BASE_LR if cfg.base_lr is None else float(cfg.base_lr)
    if not (math.isfinite(base) and base >= 0):
        raise ValueError(f"--base-lr must be a finite number >= 0; got {cfg.base_lr}")
    resize, crop = rule["resize"], rule["crop"]
    if cfg.crop is not None:
        crop = cfg.crop
        resize = cfg.resize if cfg.resize is not None else max(crop, round(crop * rule["resize"] / rule["crop"]))
    elif cfg.resize is not None:
        resize = cfg.resize
    sched = list(rule["schedule"])
    if cfg.schedule is not None:
        sched = [int(v) for v in cfg.schedule]
        if len(sched) != 5 or sorted(sched) != sched or sched[-1] < 1 or sched[0] < 0:
            raise ValueError(f"--schedule must be 5 increasing steps: warmup d1 d2 d3 total; got {cfg.schedule}")
    elif cfg.steps is not None:
        if cfg.steps < 1:
            raise ValueError(f"--steps must be >= 1; got {cfg.steps}")
        f = cfg.steps / sched[-1]
        sched = [round(v * f) for v in sched[:-1]] + [cfg.steps]
    if cfg.warmup_steps is not None:
        if not 0 <= cfg.warmup_steps < sched[-1]:
            raise ValueError(f"--warmup-steps {cfg.warmup_steps} must be shorter than the run ({sched[-1]} steps): pass "
                             "a smaller --warmup-steps, or more --steps")
        if cfg.warmup_steps > sched[1]:
            raise ValueError(
                f"--warmup-steps {cfg.warmup_steps} would end after the schedule's first decay (step {sched[1]} of "
                f"{[cfg.warmup_steps, *sched[1:]]}): pass --warmup-steps {sched[1]} or less, or a whole --schedule "
                "W D1 D2 D3 TOTAL"
            )
        sched[0] = cfg.warmup_steps
    if not 0 <= sched[0] < sched[-1]:
        raise ValueError(f"warm-up ({sched[0]} steps) must be shorter than the run ({sched[-1]} steps)")
    return {
        "resize": resize, "crop": crop, "schedule": sched, "peak_lr": base * cfg.batch_size / hyperrule.BASE_BATCH,
        "base_lr": base, "mixup_alpha": rule["mixup_alpha"] if cfg.mixup_alpha is None else cfg.mixup_alpha,
        "hyperrule": rule,
    }


def describe_lr(plan: dict, batch_size: int) -> str:
    """The plan's learning rate as printed: ``lr 0.0006 (0.003 x 64/512)``."""
    return f"lr {plan['peak_lr']:.3g} ({plan['base_lr']:g} x {batch_size}/{hyperrule.BASE_BATCH})"


def _apply_lora(model: torch.nn.Module, cfg: FinetuneConfig) -> str:
    """Wrap ``model`` with LoRA when ``cfg.lora_rank`` asks for it; returns the report ("" without)."""
    if not cfg.lora_rank:
        return ""
    if cfg.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 1 (or 0 for full fine-tuning); got {cfg.lora_rank}")
    if cfg.linear_probe:
        raise ValueError("--lora-rank and --linear-probe exclude each other (a linear probe trains the head alone); "
                         "drop one of them")
    from bitfast.adapt import lora, lora_report

    try:
        lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    except ValueError as exc:
        flags = f"--lora-rank {cfg.lora_rank}" + (f" --lora-alpha {cfg.lora_alpha}" if cfg.lora_alpha is not None else "")
        raise ValueError(f"{flags}: {exc}") from exc
    # FusedSGD keeps one momentum buffer per trained parameter, plus the average with --ema-decay.
    return str(lora_report(model, states_per_param=1 + (1 if cfg.ema_decay else 0)))


def finetune(cfg: FinetuneConfig, info: DistInfo | None = None, stream=None) -> dict:
    """Fine-tune ``cfg.model`` (``cfg.pretrained`` weights, fresh zero-initialised head) on
    ``cfg.data`` with BiT-HyperRule; under torchrun, with DDP. Prints the plan, a progress bar
    (stderr) and a summary table; writes checkpoints, ``metrics.jsonl``, ``final_eval.json`` and
    plots into ``cfg.output``. Returns ``{"plan", "result", "final", "data", "model"}``.
    """
    stream = stream or sys.stdout
    start_run(cfg)
    info = info or init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    # HyperRule counts the training examples and decides the resolution on their sizes.
    data, plan, size_note = build_planned_data(cfg, lambda n, size: plan_finetune(cfg, n, size))
    model, init_note = build_model(cfg, data.num_classes)
    lora_note = _apply_lora(model, cfg)
    if cfg.model != "bit_tiny" and cfg.pretrained is None and info.is_main:
        print("note: no --pretrained weights: fine-tuning from a random initialisation", file=stream)
    sched, peak = plan["schedule"], plan["peak_lr"]
    cfg.mixup_alpha = plan["mixup_alpha"]
    if info.is_main:
        print(f"bitfast finetune: {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{init_note}) on {data.description}", file=stream)
        print(f"  HyperRule: n={len(data.train)} -> resize {plan['resize']}, crop {plan['crop']}, schedule {sched}, "
              f"{describe_lr(plan, cfg.batch_size)}, MixUp alpha {plan['mixup_alpha']}, momentum {cfg.momentum}, "
              f"weight decay {cfg.weight_decay}; {info.world_size} process(es) on {info.device}", file=stream)
        if size_note:
            print(f"  {size_note}", file=stream)
        if lora_note:
            print("  " + lora_note.replace("\n", "\n  "), file=stream)
    result = train_loop(
        model, data.train, cfg=cfg, total_steps=sched[-1], lr_at=lambda s: step_lr(s, sched, peak),
        num_classes=data.num_classes, info=info, eval_fn=make_eval_fn(data, cfg, info), desc="finetune",
        run_meta={"model": cfg.model, "classes": data.class_names, "resolution": plan["crop"], "plan": {
            k: v for k, v in plan.items() if k != "hyperrule"}},
    )
    final = finish_run(result, data, cfg, info, "bitfast finetune: summary", stream=stream)
    return {"plan": plan, "result": result, "final": final, "data": data, "model": result["model"]}
