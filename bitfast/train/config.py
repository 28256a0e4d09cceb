"""``TrainConfig``: everything a training run needs besides the model and data (every field
has a command-line flag), and ``validate``, which checks every option before any work."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from bitfast.train.options import Options, check_device

__all__ = ["PRECISIONS", "TrainConfig"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model and data; every field has a CLI flag.

    Fields left ``None`` are filled by the recipe (``finetune`` fills them from BiT-HyperRule,
    ``pretrain`` from the upstream recipe) before the loop runs.
    """

    # data and model
    data: str = "digits"  # "digits" (the embedded UCI digits) or an ImageFolder directory
    val_data: str | None = None  # ImageFolder for evaluation (default: DATA/val or DATA/test)
    classes: Sequence[int] | None = None  # digits only: which digits (default all ten)
    model: str = "resnetv2_50x1_bit"  # a bitfast model name, or "bit_tiny" (R?x1-w32, 2M params)
    norm: str = "gn"
    pretrained: str | None = None
    resize: int | None = None
    crop: int | None = None
    flip: bool = True
    # optimization
    batch_size: int = 512
    batch_split: int = 1
    steps: int | None = None
    base_lr: float | None = None
    warmup_steps: int | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    mixup_alpha: float | None = None
    ema_decay: float = 0.0
    freeze_bn: bool = True
    linear_probe: bool = False
    # execution
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False  # the whole step in a CUDA graph (bitfast.train.graphs)
    device: str | None = None
    workers: int | None = None
    seed: int = 0
    # output
    output: str = "runs/bitfast"
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    resume: str | None = None  # a checkpoint path, or "auto" (OUTPUT/last.pt when it exists)
    # Read training checkpoints of the earlier format (pickled objects: runs their code) from
    # --resume, --pretrained, --teacher and --checkpoint; only for files the user vouches for.
    trust_checkpoint: bool = False
    overwrite: bool = False  # start a new run in an --output that holds one (its files are removed)
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    eval_batch_size: int | None = None
    log_every: int = 10
    progress: bool = True
    plots: bool = True
    stop_at_step: int | None = None  # stop after this step as if interrupted (resume later)
    extra: dict = field(default_factory=dict)  # recipe-specific notes saved with the run

    def validate(self) -> None:
        """Check every option before any work (the recipes call this first); each error
        names the command-line flag and what it accepts. Subclasses add their own."""
        v = Options(self)
        if self.data not in (None, "digits"):
            v.directory("data", optional=False)
            if self.classes is not None:
                raise ValueError("--classes selects digits of the embedded dataset; an ImageFolder uses all its class "
                                 "folders (drop --classes, or pass --data digits)")
        v.integers("classes", low=0, high=10, min_count=2, unique=True, optional=True)
        v.directory("val_data")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"--model must be a model name (see `bitfast models`); got {self.model!r}")
        from bitfast.models.registry import resolve_name

        try:
            resolve_name(self.model)
        except ValueError as exc:
            raise ValueError(f"--model {self.model!r} is not a bitfast model; `bitfast models` lists them") from exc
        v.choice("norm", ("gn", "bn"))
        v.number("crop", low=1, integer=True, optional=True)
        if self.crop is not None and self.crop < 32:
            raise ValueError(f"resolution {self.crop} is smaller than the network's minimum of 32 pixels (BiT ResNet-v2 "
                             "downsamples 32x); pass --crop 32 or more")
        v.number("resize", low=1, integer=True, optional=True)
        if self.crop is not None and self.resize is not None and self.resize < self.crop:
            raise ValueError(f"--resize ({self.resize}) must be >= --crop ({self.crop})")
        v.number("batch_size", low=1, integer=True)
        v.number("batch_split", low=1, integer=True)
        v.number("steps", low=1, integer=True, optional=True)
        v.number("base_lr", low=0, optional=True)
        v.number("warmup_steps", low=0, integer=True, optional=True)
        v.number("momentum", low=0, high=1, high_open=True)
        v.number("weight_decay", low=0)
        v.number("label_smoothing", low=0, high=1, high_open=True)
        v.number("mixup_alpha", low=0, optional=True)
        v.number("ema_decay", low=0, high=1, high_open=True)
        v.choice("precision", PRECISIONS)
        check_device(self.device)
        if self.cuda_graphs:
            from bitfast.train.graphs import conflicts

            found = conflicts(device=self.device, precision=self.precision, compile=self.compile)
            if found:
                raise ValueError("; ".join(found))
        v.number("workers", low=0, integer=True, optional=True)
        v.number("checkpoint_every", low=0, integer=True)
        v.number("eval_every", low=0, integer=True)
        v.number("eval_batch_size", low=1, integer=True, optional=True)
        v.number("log_every", low=1, integer=True)
        v.number("stop_at_step", low=1, integer=True, optional=True)
        if self.resume not in (None, "auto") and not os.path.isfile(self.resume):
            raise FileNotFoundError(f"--resume {self.resume!r}: no such checkpoint (pass a file, or 'auto')")
        if not isinstance(self.output, str) or not self.output:
            raise ValueError(f"--output must be a directory path; got {self.output!r}")

    def to_dict(self) -> dict:
        """The config as plain JSON-able values (stored in checkpoints and metrics)."""
        out = dataclasses.asdict(self)
        if out.get("classes") is not None:
            out["classes"] = list(out["classes"])
        return out
