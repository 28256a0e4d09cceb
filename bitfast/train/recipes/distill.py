"""Knowledge distillation (``bitfast distill``): train a student from a teacher's soft targets.

Hinton et al., 2015; Beyer et al., 2022 ("Knowledge distillation: A good teacher is patient
and consistent"): the teacher sees exactly the student's (augmented, MixUp-mixed) images, in
eval mode under ``torch.no_grad()`` (bf16 autocast on a GPU), and the student minimises
``bitfast.train.distill_loss`` (``(1 - alpha) CE + alpha T^2 KL``). Everything else is
``bitfast finetune``'s: data, BiT-HyperRule schedule and overrides, checkpoints, resume, DDP.
The teacher is a bitfast training checkpoint (``RUN/last.pt``, EMA weights when present) or
a model name with ``teacher_pretrained`` weights.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from bitfast.train.build import (
    build_model,
    build_planned_data,
    checkpoint_resolution,
    finish_run,
    make_eval_fn,
    model_from_checkpoint,
)
from bitfast.train.config import TrainConfig
from bitfast.train.distributed import DistInfo, init_distributed
from bitfast.train.evaluate import evaluate
from bitfast.train.loop import train_loop
from bitfast.train.losses import distill_loss
from bitfast.train.options import Options
from bitfast.train.outputs import start_run
from bitfast.train.recipes.finetune import FinetuneConfig, describe_lr, plan_finetune, step_lr
from bitfast.train.task import Classification

__all__ = ["DistillConfig", "DistillTask", "distill", "load_teacher"]


@dataclass
class DistillConfig(FinetuneConfig):
    """``FinetuneConfig`` (``model`` is the student) plus the teacher: ``teacher`` is a bitfast
    training checkpoint or a model name (then ``teacher_pretrained`` gives its weights);
    ``alpha`` weighs the distillation term and ``temperature`` softens both distributions.
    ``crop`` defaults to the teacher checkpoint's resolution."""

    teacher: str | None = None
    teacher_pretrained: str | None = None
    alpha: float = 0.9
    temperature: float = 4.0
    output: str = "runs/distill"

    def validate(self) -> None:
        """``FinetuneConfig.validate`` plus the teacher and the loss's options."""
        super().validate()
        if not self.teacher:
            raise ValueError("--teacher is required: a bitfast training checkpoint (RUN/last.pt) or a model name "
                             "(with --teacher-pretrained weights)")
        v = Options(self)
        v.number("alpha", low=0, high=1)
        v.number("temperature", low=0, low_open=True)


def _looks_like_path(src: str) -> bool:
    return os.sep in src or src.endswith((".pt", ".pth", ".tar", ".npz", ".bin", ".safetensors"))


def load_teacher(cfg: DistillConfig, num_classes: int, class_names: list[str],
                 device: torch.device) -> tuple[nn.Module, str]:
    """The teacher of ``cfg`` on ``device`` in eval mode with frozen parameters, and a
    description. Raises ``ValueError`` when its head does not predict the data's classes."""
    from bitfast.models import list_models

    src = cfg.teacher
    if not src:
        raise ValueError("--teacher is required: a bitfast training checkpoint (RUN/last.pt) or a model name "
                         "(with --teacher-pretrained weights)")
    if os.path.isfile(src):
        teacher, state = model_from_checkpoint(src, use_ema=True, device=device, trusted=cfg.trust_checkpoint)
        n, names = int(state.get("num_classes", 0)), state.get("classes")
        if n != num_classes:
            raise ValueError(
                f"the teacher {src} predicts {n} classes and the student's data has {num_classes}; distillation needs "
                "both over the same classes: pass the data (and --classes) the teacher was trained on"
            )
        if names is not None and list(names) != list(class_names):
            raise ValueError(f"the teacher {src} was trained on classes {names}, the data has {class_names}; pass the "
                             "data (and --classes) the teacher was trained on")
        name = (state.get("config") or {}).get("model", "?")
        desc = f"{name} from {src} ({'EMA' if state['used_ema'] else 'raw'} weights)"
    elif _looks_like_path(src):
        raise FileNotFoundError(f"--teacher {src!r}: no such file; pass a bitfast training checkpoint or a model name")
    else:
        if src not in list_models(include_aliases=True):
            raise ValueError(f"--teacher {src!r} is neither a file nor a model; models: {', '.join(list_models())}")
        teacher, note = build_model(TrainConfig(model=src, norm=cfg.norm, pretrained=cfg.teacher_pretrained,
                                                trust_checkpoint=cfg.trust_checkpoint),
                                    num_classes, zero_head=False)
        teacher = teacher.to(device).eval()
        desc = f"{src} ({note})"
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher, desc


class DistillTask(Classification):
    """Classification trained on a frozen teacher's soft targets as well as the labels:
    ``(1 - alpha) CE + alpha T^2 KL(teacher_T || student_T)`` summed over the micro-batch
    (``bitfast.train.losses.distill_loss``), MixUp as in ``Classification`` (the teacher sees
    the mixed images). The teacher's forward runs without gradients, under ``teacher_autocast``
    (a dtype; None: float32)."""

    def __init__(self, teacher: nn.Module, num_classes: int, *, alpha: float, temperature: float,
                 mixup_alpha: float = 0.0, label_smoothing: float = 0.0, seed: int = 0,
                 teacher_autocast: torch.dtype | None = None) -> None:
        super().__init__(num_classes, mixup_alpha=mixup_alpha, label_smoothing=label_smoothing, seed=seed)
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.teacher_autocast = teacher_autocast

    def loss(self, output: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The distillation loss of the micro-batch, summed."""
        dtype = self.teacher_autocast
        with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            t = self.teacher(x)
        return distill_loss(output.float(), t.float(), y, alpha=self.alpha, T=self.temperature, reduction="sum"), {}


def distill(cfg: DistillConfig, info: DistInfo | None = None, stream=None) -> dict:
    """Train ``cfg.model`` (the student) on ``cfg.data`` from the teacher's soft targets with
    the HyperRule's schedule (see ``bitfast.train.recipes.finetune``), evaluate teacher and student,
    print a summary, write ``distill.json`` beside the run's checkpoint and metrics.
    Returns ``{"plan", "result", "final", "teacher", "data", "model"}``."""
    stream = stream or sys.stdout
    start_run(cfg)
    info = info or init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    teacher_note = ""
    if cfg.crop is None and cfg.resize is None:
        # The student sees what the teacher was trained on: its resolution unless --crop says otherwise.
        resolution = checkpoint_resolution(cfg.teacher, trusted=cfg.trust_checkpoint)
        if resolution:
            cfg.crop = resolution
            teacher_note = f"resolution {resolution}: the teacher checkpoint's (pass --crop to change)"
    data, plan, size_note = build_planned_data(cfg, lambda n, size: plan_finetune(cfg, n, size))
    size_note = teacher_note or size_note
    teacher, teacher_desc = load_teacher(cfg, data.num_classes, data.class_names, info.device)
    torch.manual_seed(cfg.seed)  # the student's initialisation does not depend on how the teacher was built
    student, init_note = build_model(cfg, data.num_classes)
    sched, peak = plan["schedule"], plan["peak_lr"]
    cfg.mixup_alpha = plan["mixup_alpha"]
    device = info.device
    half = device.type == "cuda"  # the teacher's forward in bf16 on a GPU; float32 on a CPU

    task = DistillTask(teacher, data.num_classes, alpha=cfg.alpha, temperature=cfg.temperature,
                       mixup_alpha=cfg.mixup_alpha, label_smoothing=cfg.label_smoothing, seed=cfg.seed,
                       teacher_autocast=torch.bfloat16 if half else None)

    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    if info.is_main:
        default = " (the default student; choose one with --student)" if cfg.model == DistillConfig.model else ""
        print(f"bitfast distill: teacher {teacher_desc}, {n_t / 1e6:.2f}M parameters -> student {cfg.model}{default}, "
              f"{n_s / 1e6:.2f}M parameters ({init_note}) on {data.description}", file=stream)
        print(f"  loss (1 - {cfg.alpha}) CE + {cfg.alpha} T^2 KL, T {cfg.temperature}; resolution {plan['crop']}, "
              f"schedule {sched}, {describe_lr(plan, cfg.batch_size)}, "
              f"MixUp alpha {plan['mixup_alpha']}; {info.world_size} process(es) on {device}", file=stream)
        if size_note:
            print(f"  {size_note}", file=stream)
    result = train_loop(
        student, data.train, cfg=cfg, total_steps=sched[-1], lr_at=lambda s: step_lr(s, sched, peak),
        task=task, info=info, eval_fn=make_eval_fn(data, cfg, info), desc="distill",
        run_meta={"model": cfg.model, "classes": data.class_names, "resolution": plan["crop"], "plan": {
            k: v for k, v in plan.items() if k != "hyperrule"}, "teacher": cfg.teacher},
    )
    final = finish_run(result, data, cfg, info, "bitfast distill: student summary", stream=stream)
    teacher_eval = {}
    if data.eval is not None:
        batch = cfg.eval_batch_size or max(cfg.batch_size // max(info.world_size, 1), 1)
        teacher_eval = evaluate(teacher, data.eval, data.num_classes, batch_size=batch, info=info,
                                precision=cfg.precision, channels_last=cfg.channels_last)
    if info.is_main and final:
        from bitfast.train.build import summary_table

        rows = [["teacher", teacher_desc, f"{n_t / 1e6:.2f}M", f"{100 * teacher_eval['top1']:.2f}%"],
                ["student", f"{cfg.model}, {result['step']} steps", f"{n_s / 1e6:.2f}M", f"{100 * final['top1']:.2f}%"]]
        print(summary_table(rows, ["", "model", "parameters", f"test top-1 ({final['n']} images)"]), file=stream)
        with open(os.path.join(cfg.output, "distill.json"), "w") as f:
            json.dump({"teacher": cfg.teacher, "student": cfg.model, "teacher_params": n_t, "student_params": n_s,
                       "teacher_top1": teacher_eval["top1"], "student_top1": final["top1"], "alpha": cfg.alpha,
                       "temperature": cfg.temperature, "steps": result["step"]}, f)
    return {"plan": plan, "result": result, "final": final, "teacher": teacher_eval, "data": data,
            "model": result["model"]}
