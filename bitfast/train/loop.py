"""The training loop shared by fine-tuning, upstream pre-training, few-shot fine-tuning and
the story: SGD with momentum (``bitfast.optim.FusedSGD``), a per-step learning-rate function,
micro-batching, bf16/fp16 autocast (GradScaler for fp16), channels_last, optional
``torch.compile``, MixUp, frozen BatchNorm statistics, linear probing, DDP, periodic atomic
checkpoints with exact resume, a NaN/Inf stop, a progress bar and a JSON-lines metrics file.

Determinism (what makes ``--resume`` bit for bit): the data order is a pure function of the
seed and the step (``StepSampler``: the stream of per-epoch permutations cut into global
batches, each process taking its slice), every sample's augmentation is drawn from a seed
derived from its position in that stream (``SeededDataset``), MixUp draws from the loop's own
generator, and the checkpoint holds every RNG state, the optimizer and the scaler. A run
stopped after step k and resumed therefore replays steps k+1... exactly as the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitfast.train import checkpoint as ckpt
from bitfast.train.distributed import DistInfo, all_reduce_sum, check_batch

__all__ = [
    "NonFiniteLossError",
    "PRECISIONS",
    "ProgressBar",
    "SeededDataset",
    "StepSampler",
    "TrainConfig",
    "MetricsLog",
    "ema_supported",
    "train_loop",
]

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
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    eval_batch_size: int | None = None
    log_every: int = 10
    progress: bool = True
    plots: bool = True
    stop_at_step: int | None = None  # stop after this step as if interrupted (resume later)
    extra: dict = field(default_factory=dict)  # recipe-specific notes saved with the run

    def to_dict(self) -> dict:
        """The config as plain JSON-able values (stored in checkpoints and metrics)."""
        out = dataclasses.asdict(self)
        if out.get("classes") is not None:
            out["classes"] = list(out["classes"])
        return out


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the checkpoint saved."""


def ema_supported() -> bool:
    """Whether ``bitfast.optim.FusedSGD`` keeps Polyak-averaged (EMA) weights (``ema_decay=``)."""
    from bitfast.optim import FusedSGD

    return "ema_decay" in inspect.signature(FusedSGD.__init__).parameters


class StepSampler:
    """The data order as a function of the step: the infinite stream of per-epoch permutations
    of ``range(n)`` (epoch ``e`` shuffled by a generator seeded with ``seed`` and ``e``) cut into
    global batches of ``global_batch``; process ``rank`` of ``world_size`` takes its contiguous
    slice of each. Yields, for steps ``start_step .. total_steps - 1``, lists of
    ``(index, sample_seed)`` keys for ``SeededDataset``.
    """

    def __init__(self, n: int, global_batch: int, *, total_steps: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        if n < 1:
            raise ValueError("StepSampler: the dataset is empty")
        self.n, self.global_batch = n, global_batch
        self.local = check_batch(global_batch, world_size)
        self.total_steps, self.start_step = total_steps, start_step
        self.rank, self.seed, self.shuffle = rank, seed, shuffle
        self._perm: tuple[int, torch.Tensor] | None = None

    def _epoch(self, e: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != e:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
                self._perm = (e, torch.randperm(self.n, generator=g))
            else:
                self._perm = (e, torch.arange(self.n))
        return self._perm[1]

    def batch(self, step: int) -> list[tuple[int, int]]:
        """This process's ``(index, sample_seed)`` keys of global batch ``step``."""
        first = step * self.global_batch + self.rank * self.local
        keys = []
        for p in range(first, first + self.local):
            idx = int(self._epoch(p // self.n)[p % self.n])
            keys.append((idx, (self.seed << 40) ^ p))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that item ``(index, sample_seed)`` runs the wrapped ``__getitem__``
    with torch's and Python's generators seeded from ``sample_seed``: random augmentations
    depend only on the sample's place in the data stream, not on worker count or history."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(state)


class ProgressBar:
    """A dependency-free progress bar on stderr: step/total, loss, lr, img/s and ETA.

    On a terminal it redraws one line; otherwise (logs, CI) it prints a line about every
    ``every_s`` seconds and at the end."""

    def __init__(self, total: int, *, start: int = 0, desc: str = "train", enabled: bool = True,
                 stream=None, every_s: float = 10.0) -> None:
        self.total, self.start, self.desc = total, start, desc
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self._last_print = 0.0

    @staticmethod
    def _clock(seconds: float) -> str:
        seconds = int(max(0, seconds))
        h, rem = divmod(seconds, 3600)
        return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"

    def line(self, step: int, **fields: float) -> str:
        """The text shown after ``step`` steps with ``fields`` (loss, lr, img_s ...)."""
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        width = 20
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        parts = [f"{self.desc} [{bar}] {step}/{self.total}"]
        for k, v in fields.items():
            if v is None:
                continue
            parts.append(f"{k} {v:.3g}" if k != "img/s" else f"{k} {v:.0f}")
        parts.append(f"elapsed {self._clock(elapsed)}")
        parts.append(f"ETA {self._clock(eta) if math.isfinite(eta) else '?'}")
        return " | ".join(parts)

    def update(self, step: int, **fields: float) -> None:
        """Show progress after ``step`` steps."""
        if not self.enabled:
            return
        now = time.perf_counter()
        text = self.line(step, **fields)
        if self.tty:
            self.stream.write("\r" + text.ljust(110))
            self.stream.flush()
        elif step >= self.total or now - self._last_print >= self.every_s:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_print = now

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class MetricsLog:
    """Appends JSON lines (one record per call) to ``path``; a no-op when ``path`` is None."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        """Append ``record`` (plus the wall-clock time) as one JSON line."""
        if self.path is None:
            return
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    @staticmethod
    def read(path: str) -> list[dict]:
        """The records of a metrics file; for a step logged twice (a resumed run replays the
        steps after its last checkpoint) the later record wins."""
        records: dict[tuple, dict] = {}
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    r = json.loads(line)
                    records[(r.get("kind"), r.get("step"), r.get("split"))] = r
        return sorted(records.values(), key=lambda r: (r.get("step") or 0))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def set_train_mode(model: nn.Module, *, freeze_bn: bool, linear_probe: bool) -> None:
    """``model.train()``, then BatchNorm layers back to eval mode when their statistics are
    frozen (``freeze_bn``: BiT fine-tuning of the BN variant) and the whole backbone in eval
    mode for a linear probe (only the head trains)."""
    model.train()
    base = unwrap(model)
    for name, m in base.named_modules():
        if linear_probe and not name.startswith("head"):
            m.eval()
        elif freeze_bn and isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    if linear_probe:
        base.head.train()


def trainable_parameters(model: nn.Module, linear_probe: bool) -> list[nn.Parameter]:
    """The parameters the optimizer updates; a linear probe freezes all but the head."""
    base = unwrap(model)
    if linear_probe:
        for name, p in base.named_parameters():
            p.requires_grad_(name.startswith("head."))
    return [p for p in base.parameters() if p.requires_grad]


def build_optimizer(params, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """``FusedSGD`` with the config's momentum, weight decay (and ``ema_decay`` when both the
    config asks for it and FusedSGD supports it)."""
    from bitfast.optim import FusedSGD

    kwargs = {"lr": lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    if cfg.ema_decay:
        if not ema_supported():
            raise ValueError("--ema-decay needs a bitfast.optim.FusedSGD with ema_decay support; this build has none")
        kwargs["ema_decay"] = cfg.ema_decay
    return FusedSGD(params, **kwargs)


def ema_state(opt: torch.optim.Optimizer, model: nn.Module) -> dict | None:
    """The model's state dict with the optimizer's EMA weights in place of the parameters
    (None when the optimizer keeps no EMA)."""
    getter = getattr(opt, "ema_state_dict", None)
    params = dict(unwrap(model).named_parameters())
    if getter is not None:
        ema = getter()
        if isinstance(ema, dict) and ema and all(isinstance(k, str) for k in ema):
            return {k: v.detach().clone() for k, v in ema.items()}
    averaged = {}
    for name, p in params.items():
        st = opt.state.get(p, {})
        for key in ("ema", "ema_param", "ema_buffer"):
            if key in st:
                averaged[name] = st[key].detach().clone()
                break
    if not averaged:
        return None
    full = unwrap(model).state_dict()
    full.update(averaged)
    return {k: v.detach().clone() for k, v in full.items()}


def _collate(batch):
    xs, ys = zip(*batch)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys, dtype=torch.long)


def _loss_sum(logits: torch.Tensor, target: torch.Tensor, soft: bool, label_smoothing: float) -> torch.Tensor:
    logits = logits.float()
    if soft:
        logp = F.log_softmax(logits, dim=-1)
        if label_smoothing:
            k = logits.shape[-1]
            target = target * (1 - label_smoothing) + label_smoothing / k
        return -(target * logp).sum()
    return F.cross_entropy(logits, target, reduction="sum", label_smoothing=label_smoothing)


def train_loop(
    model: nn.Module,
    train_set,
    *,
    cfg: TrainConfig,
    total_steps: int,
    lr_at: Callable[[int], float | None],
    num_classes: int,
    info: DistInfo | None = None,
    eval_fn: Callable[[nn.Module, int], dict] | None = None,
    desc: str = "train",
    run_meta: dict | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Train ``model`` on ``train_set`` for ``total_steps`` steps of ``cfg.batch_size`` images.

    ``lr_at(step)`` gives the learning rate of each step (``None`` ends the run early).
    ``eval_fn(model, step)`` (optional) returns a metrics dict; it runs every
    ``cfg.eval_every`` steps and at the end. Checkpoints (``OUTPUT/last.pt``) hold the model,
    optimizer, EMA, scaler, step, RNG states and config; ``cfg.resume`` continues from one.
    ``run_meta`` (model name, class names ...) is stored in every checkpoint.
    ``loss_fn(x, logits, targets)`` (optional) replaces the cross-entropy: it gets a
    micro-batch's (possibly MixUp-mixed) inputs, the model's logits and the targets (class
    indices, or soft targets under MixUp) and returns the loss *summed* over the micro-batch
    (``bitfast distill`` adds a teacher's soft targets this way).

    Returns ``{"model", "step", "history", "final_eval", "checkpoint", "seconds", "img_per_s"}``.
    Raises ``NonFiniteLossError`` (after saving the last good state) when the loss is NaN/Inf.
    """
    info = info or DistInfo()
    device = info.device
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {list(PRECISIONS)}; got {cfg.precision!r}")
    if cfg.batch_split < 1:
        raise ValueError(f"--batch-split must be >= 1; got {cfg.batch_split}")
    local_batch = check_batch(cfg.batch_size, info.world_size, cfg.batch_split)
    if total_steps < 1:
        raise ValueError(f"the run has {total_steps} steps; pass --steps >= 1")
    run_meta = dict(run_meta or {})
    # Checkpoints hold only plain data (they load without running code): fail now, not at the
    # first save.
    ckpt.check_plain_data(cfg.to_dict(), "the run's config")
    ckpt.check_plain_data(run_meta, "run_meta")
    out = cfg.output
    model_name = run_meta.get("model", cfg.model)
    last_path = os.path.join(out, "last.pt")

    base = unwrap(model).to(device)
    if cfg.channels_last:
        base = base.to(memory_format=torch.channels_last)
    params = trainable_parameters(base, cfg.linear_probe)
    opt = build_optimizer(params, cfg, lr=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    mix_gen = torch.Generator().manual_seed(cfg.seed + 12345)
    step = 0

    if info.is_main:
        ckpt.probe_output_dir(out, need_bytes=3 * ckpt.state_dict_bytes(base) + (1 << 20))
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl") if info.is_main else None)

    resume = cfg.resume
    if resume == "auto":
        resume = last_path if os.path.exists(last_path) else None
    if resume:
        state = ckpt.load_checkpoint(resume, map_location=device, trusted=cfg.trust_checkpoint)
        ckpt.check_compatible(state, model=model_name, num_classes=num_classes, path=resume)
        base.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        if isinstance(rng, list):  # one state per rank
            rng = rng[info.rank] if len(rng) == info.world_size else rng[0]
        ckpt.set_rng_state(rng, {"mixup": mix_gen})
        step = int(state["step"])
        if info.is_main:
            print(f"{desc}: resumed from {resume} at step {step}/{total_steps}", file=sys.stderr)

    net: nn.Module = base
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            base, device_ids=[device.index] if device.type == "cuda" else None,
        )
    if cfg.compile:
        net = torch.compile(net)

    sampler = StepSampler(len(train_set), cfg.batch_size, total_steps=total_steps, start_step=step,
                          rank=info.rank, world_size=info.world_size, seed=cfg.seed)
    workers = cfg.workers if cfg.workers is not None else 0
    loader = torch.utils.data.DataLoader(
        SeededDataset(train_set), batch_sampler=sampler, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    autocast_dtype = PRECISIONS[cfg.precision]
    mixup_alpha = cfg.mixup_alpha or 0.0
    micro = local_batch // cfg.batch_split
    history: list[dict] = []

    def save(at_step: int, note: str = "") -> str | None:
        rng_all = ckpt.get_rng_state({"mixup": mix_gen})
        if info.enabled:
            gathered: list = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, rng_all)
            rng_all = gathered
        if not info.is_main:
            return None
        ema = ema_state(opt, base)
        return ckpt.save_checkpoint(last_path, {
            "model": base.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "ema": ema,
            "step": at_step, "rng": rng_all, "config": {**cfg.to_dict(), "model": model_name},
            "num_classes": num_classes, "note": note, **{k: v for k, v in run_meta.items() if k != "model"},
        })

    bar = ProgressBar(total_steps, start=step, desc=desc, enabled=cfg.progress and info.is_main)
    set_train_mode(net, freeze_bn=cfg.freeze_bn, linear_probe=cfg.linear_probe)
    t_start = time.perf_counter()
    t_window, img_window = time.perf_counter(), 0
    img_s = None
    final_eval = None
    saved = None
    stop = cfg.stop_at_step
    for x, y in loader:
        lr = lr_at(step)
        if lr is None:
            break
        for group in opt.param_groups:
            group["lr"] = lr
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        soft = False
        if mixup_alpha > 0:
            from bitfast.train.mixup import mixup

            x, y, _ = mixup(x, y, mixup_alpha, num_classes, generator=mix_gen)
            soft = True
        opt.zero_grad(set_to_none=True)
        loss_total = torch.zeros((), device=device, dtype=torch.float32)
        for i in range(cfg.batch_split):
            xs, ys = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
            sync = contextlib.nullcontext()
            if info.enabled and i < cfg.batch_split - 1:
                sync = unwrap_ddp(net).no_sync()
            with sync:
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = net(xs)
                if loss_fn is None:
                    loss_sum = _loss_sum(logits, ys, soft, cfg.label_smoothing)
                else:
                    loss_sum = loss_fn(xs, logits, ys)
                # Each process divides by its own batch; DDP averages the gradients over the
                # processes, so the gradient is that of the mean loss over the global batch.
                scaler.scale(loss_sum / local_batch).backward()
            loss_total += loss_sum.detach()
        loss_value = float(all_reduce_sum(loss_total, info)) / cfg.batch_size
        if not math.isfinite(loss_value):
            path = save(step, note=f"last good state before the non-finite loss of step {step + 1}")
            bar.close()
            where = f"; the last good state (after step {step}) is in {path}" if path else ""
            raise NonFiniteLossError(
                f"{desc}: the loss is {loss_value} at step {step + 1} (lr {lr:.3g}){where}. Lower --base-lr, "
                "use --precision fp32/bf16, or check the data for NaN/Inf"
            )
        scaler.step(opt)
        scaler.update()
        step += 1
        img_window += cfg.batch_size
        now = time.perf_counter()
        if now - t_window > 0.5 or step == total_steps:
            img_s = img_window / (now - t_window)
            t_window, img_window = now, 0
        record = {"kind": "train", "step": step, "loss": loss_value, "lr": lr}
        history.append(record)
        if step % max(cfg.log_every, 1) == 0 or step == total_steps:
            metrics.write(**record, img_per_s=img_s)
        bar.update(step, loss=loss_value, lr=lr, **{"img/s": img_s})
        last = step == total_steps or (stop is not None and step >= stop)
        if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            final_eval = eval_fn(net, step)
            set_train_mode(net, freeze_bn=cfg.freeze_bn, linear_probe=cfg.linear_probe)
            history.append({"kind": "eval", "step": step, **final_eval})
            metrics.write(kind="eval", step=step, **{k: v for k, v in final_eval.items() if _jsonable(v)})
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last:
            saved = save(step) or saved
        if last:
            break
    bar.close()
    seconds = time.perf_counter() - t_start
    return {"model": base, "step": step, "history": history, "final_eval": final_eval,
            "checkpoint": saved, "seconds": seconds, "optimizer": opt,
            "img_per_s": (step - sampler.start_step) * cfg.batch_size / max(seconds, 1e-9)}


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The DDP module inside a ``torch.compile`` wrapper (for ``no_sync``)."""
    return model._orig_mod if hasattr(model, "_orig_mod") else model


def _jsonable(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None
