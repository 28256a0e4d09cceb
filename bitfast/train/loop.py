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
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitfast.train import checkpoint as ckpt
from bitfast.train.distributed import DistInfo, all_reduce_sum, barrier, check_batch
from bitfast.train.options import Options, check_device

__all__ = [
    "INTERRUPT_EXIT_STATUS",
    "NonFiniteLossError",
    "PRECISIONS",
    "ProgressBar",
    "RUN_FILES",
    "RunInterrupted",
    "SeededDataset",
    "StepSampler",
    "TrainConfig",
    "MetricsLog",
    "check_output",
    "ema_state",
    "ema_supported",
    "resolve_resume",
    "start_run",
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


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the checkpoint saved."""


# The exit status of a training command stopped by a signal after saving its checkpoint: what
# a shell reports for a process ended by that signal (128 + its number).
INTERRUPT_EXIT_STATUS = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


class RunInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped a run after it finished its current step and wrote its
    checkpoint. ``signum``, ``step``, ``checkpoint`` (the file, or None on ranks that write
    none) and ``exit_status`` (128 + the signal's number) describe it."""

    def __init__(self, message: str, *, signum: int, step: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_status = 128 + int(signum)


# The files that make an --output directory hold a run.
RUN_FILES: tuple[str, ...] = ("last.pt", "metrics.jsonl", "final_eval.json")


def _restarted() -> int:
    """How many times torchrun has restarted this worker group (0 outside torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def resolve_resume(cfg: TrainConfig) -> str | None:
    """The checkpoint a run of ``cfg`` continues from: ``cfg.resume`` (``"auto"``: OUTPUT/last.pt
    when it exists, else None), or OUTPUT/last.pt in a worker group that torchrun restarted
    (``--max-restarts``) when it exists, so that a restarted run resumes instead of restarting."""
    last = os.path.join(cfg.output, "last.pt")
    if cfg.resume == "auto" or (cfg.resume is None and _restarted()):
        return last if os.path.exists(last) else None
    return cfg.resume


def check_output(cfg: TrainConfig, files: Sequence[str] = RUN_FILES) -> str | None:
    """Fail at start when ``cfg.output`` holds a run (any of ``files``) that this run would
    replace: unless it resumes (``--resume``), ``cfg.overwrite`` (``--overwrite``) says to
    replace it, or ``--resume auto`` (or a torchrun restart) finds no checkpoint to continue
    (then the loop starts afresh and removes the stale files). Returns the checkpoint the run
    resumes from (``resolve_resume``), or None."""
    resume = resolve_resume(cfg)
    if resume:
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        return resume
    if cfg.resume == "auto" or _restarted():
        return None
    held = [name for name in files if os.path.exists(os.path.join(cfg.output, name))]
    if held and not cfg.overwrite:
        raise ckpt.CheckpointError(
            f"--output {cfg.output} holds a run ({', '.join(held)}): pass --resume auto to continue it, --overwrite to "
            "replace it, or another --output"
        )
    return None


def start_run(cfg: TrainConfig, files: Sequence[str] = RUN_FILES) -> str | None:
    """What every training command does first, before any work: check every option
    (``cfg.validate()``), make the data folders absolute (checkpoints then find them from any
    directory) and check the output directory (``check_output``). Returns the checkpoint the
    run resumes from, or None."""
    cfg.validate()
    if cfg.data not in (None, "digits"):
        cfg.data = os.path.abspath(cfg.data)
    if cfg.val_data is not None:
        cfg.val_data = os.path.abspath(cfg.val_data)
    return check_output(cfg, files)


def _truncate_metrics(path: str, step: int) -> None:
    """Drop the records after ``step`` from a metrics file (a resumed run writes them again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if (json.loads(line).get("step") or 0) <= step]
    if len(keep) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


@contextlib.contextmanager
def _stop_on_signals(desc: str, announce: bool):
    """While the body runs, SIGTERM and SIGINT set ``flag["signum"]`` instead of ending the
    process (the loop finishes its step, saves and raises ``RunInterrupted``); a second signal
    acts at once as it would have without this. Outside the main thread nothing is installed."""
    flag: dict = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {}

    def handler(signum, frame):
        if flag["signum"] is not None:
            signal.signal(signum, old[signum])
            signal.raise_signal(signum)
            return
        flag["signum"] = signum
        if announce:
            print(f"\n{desc}: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint and stopping "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    for s in (signal.SIGTERM, signal.SIGINT):
        old[s] = signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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


def _inf_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The largest |value| over ``tensors`` (0 for none), in float64 on their device."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(torch._foreach_norm(tensors, ord=float("inf"))).max().double()


@torch.no_grad()
def step_overflow_ratio(opt: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
    """How close the coming SGD step can bring any weight or momentum value to overflow.

    Returns ``(ratio, grads_finite)`` as 0-d tensors on the parameters' device (no host sync):
    ``ratio`` bounds the largest |value| the step can write (momentum ``mu * buf + g + wd * p``,
    weight ``p - lr * (1 + mu) * that``) as a fraction of the dtype's largest finite value; it is
    NaN or Inf when a weight, momentum buffer or gradient already is non-finite. A ratio below
    0.5 proves the step's results finite (and the averaged weights, a convex mix of finite
    values). The training loop stops before a step that fails this test, so the state it saves
    as the last good one never holds a non-finite tensor."""
    worst: list[torch.Tensor] = []
    grads_finite: list[torch.Tensor] = []
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        lr, mu = float(group["lr"]), float(group.get("momentum", 0.0))
        wd = float(group.get("weight_decay", 0.0))
        bufs = [b for b in (opt.state.get(p, {}).get("momentum_buffer") for p in params) if b is not None]
        pm, gm, bm = _inf_norm(params), _inf_norm([p.grad for p in params]), _inf_norm(bufs).to(params[0].device)
        update = gm + wd * pm + mu * bm
        grow = (1.0 + mu) if group.get("nesterov", False) else 1.0
        largest = torch.maximum(pm + abs(lr) * grow * update, update)
        worst.append(largest / torch.finfo(params[0].dtype).max)
        grads_finite.append(torch.isfinite(gm))
    if not worst:
        return torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.bool)
    return torch.stack(worst).max(), torch.stack(grads_finite).all()


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


def _data_identity(cfg: TrainConfig, train_set) -> dict:
    """What identifies a run's training data in its checkpoint: the source ("digits" or the
    folder's resolved path) and the number of training images."""
    source = cfg.data if cfg.data in (None, "digits") else os.path.realpath(cfg.data)
    return {"source": source or "digits", "train_size": len(train_set)}


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
    optimizer, EMA, scaler, step, RNG states, config and what identifies the run (model, norm,
    classes, data, batch, steps, seed); ``cfg.resume`` continues from one and refuses one
    whose identity differs. An output directory that holds a run is refused unless the run
    resumes or ``cfg.overwrite``. ``run_meta`` (model name, class names ...) is stored in every
    checkpoint. ``loss_fn(x, logits, targets)`` (optional) replaces the cross-entropy: it gets
    a micro-batch's (possibly MixUp-mixed) inputs, the model's logits and the targets (class
    indices, or soft targets under MixUp) and returns the loss *summed* over the micro-batch
    (``bitfast distill`` adds a teacher's soft targets this way).

    SIGTERM and SIGINT (in the main thread) finish the current step, write the checkpoint and
    raise ``RunInterrupted``; under DDP the processes agree on the step to stop after.

    Returns ``{"model", "step", "total_steps", "start_step", "history", "final_eval",
    "checkpoint", "seconds", "img_per_s", "optimizer", "stopped_early"}``. Raises
    ``NonFiniteLossError`` (after saving the last good state, all finite) when the loss, the
    gradients or the coming update are not finite.
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
    identity = {"norm": cfg.norm, "classes": run_meta.get("classes"), "data": _data_identity(cfg, train_set),
                "batch_size": cfg.batch_size, "total_steps": total_steps, "seed": cfg.seed}
    # Checkpoints hold only plain data (they load without running code): fail now, not at the
    # first save.
    ckpt.check_plain_data(cfg.to_dict(), "the run's config")
    ckpt.check_plain_data(run_meta, "run_meta")
    ckpt.check_plain_data(identity, "the run's identity")
    out = cfg.output
    model_name = run_meta.get("model", cfg.model)
    last_path = os.path.join(out, "last.pt")
    metrics_path = os.path.join(out, "metrics.jsonl")

    if info.is_main and cfg.ema_decay and total_steps * (1 - cfg.ema_decay) < 1:
        print(f"{desc}: warning: --ema-decay {cfg.ema_decay} over {total_steps} steps: the average keeps "
              f"{cfg.ema_decay ** total_steps:.0%} of the initial weights (steps x (1 - decay) = "
              f"{total_steps * (1 - cfg.ema_decay):.2g} < 1), and eval and export use the average: lower --ema-decay "
              f"(e.g. {max(0.0, 1 - 10 / total_steps):.3g}) or train longer", file=sys.stderr)
    resume = check_output(cfg)  # every process checks before the main one removes anything
    barrier(info)
    if info.is_main:
        if cfg.resume == "auto" and resume is None:
            print(f"{desc}: --resume auto: no checkpoint in {out}; starting a fresh run", file=sys.stderr)
        elif cfg.resume is None and resume is not None:
            print(f"{desc}: restarted by torchrun (restart {_restarted()}); resuming from {resume}", file=sys.stderr)
        if resume is None and (cfg.overwrite or cfg.resume == "auto" or _restarted()):
            for name in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out, name))
    barrier(info)

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
    metrics = MetricsLog(metrics_path if info.is_main else None)

    if resume:
        state = ckpt.load_checkpoint(resume, map_location=device, trusted=cfg.trust_checkpoint)
        ckpt.check_compatible(state, model=model_name, num_classes=num_classes, path=resume, run=identity)
        try:
            base.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ckpt.CheckpointError(f"cannot resume from {resume}: its state does not fit this run ({exc})") from exc
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        if isinstance(rng, list):  # one state per rank
            rng = rng[info.rank] if len(rng) == info.world_size else rng[0]
        ckpt.set_rng_state(rng, {"mixup": mix_gen})
        step = int(state["step"])
        if info.is_main:
            _truncate_metrics(metrics_path, step)  # the steps after the checkpoint are run again
            if step >= total_steps:
                print(f"{desc}: {resume} is a finished run (step {step} of {total_steps}); nothing left to train",
                      file=sys.stderr)
            else:
                print(f"{desc}: resumed from {resume} at step {step}/{total_steps}", file=sys.stderr)
    start_step = step

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
            "num_classes": num_classes, "note": note, "run": identity,
            **{k: v for k, v in run_meta.items() if k != "model"},
        })

    bar = ProgressBar(total_steps, start=step, desc=desc, enabled=cfg.progress and info.is_main)
    set_train_mode(net, freeze_bn=cfg.freeze_bn, linear_probe=cfg.linear_probe)
    t_start = time.perf_counter()
    t_window, img_window = time.perf_counter(), 0
    img_s = None
    final_eval = None
    saved = None
    stop = cfg.stop_at_step
    with _stop_on_signals(desc, announce=info.is_main) as signalled:
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
            if info.enabled:
                # The loss and the stop flag in one reduction: every process learns of a signal
                # that reached any of them, and all stop after the same step.
                got = [float(signalled["signum"] == s) for s in (signal.SIGTERM, signal.SIGINT)]
                packet = torch.cat([loss_total.reshape(1), torch.tensor(got, device=device)])
                all_reduce_sum(packet, info)
                loss_value = float(packet[0]) / cfg.batch_size
                counts = packet[1:].tolist()
                stop_signal = signal.SIGTERM if counts[0] else (signal.SIGINT if counts[1] else 0)
            else:
                loss_value = float(loss_total) / cfg.batch_size
                stop_signal = signalled["signum"] or 0
            # Every step is checked before it writes the weights: the state saved as the last good
            # one is then always finite. (DDP: every process holds the same weights and reduced
            # gradients, so all reach the same verdict.)
            if scaler.is_enabled():
                scaler.unscale_(opt)
            ratio, grads_finite = step_overflow_ratio(opt)
            ratio = float(ratio)
            # Under fp16 an overflowing gradient is the GradScaler's business: it skips the step.
            unsafe = not ratio < 0.5 and not (scaler.is_enabled() and not bool(grads_finite))
            if not math.isfinite(loss_value) or unsafe:
                if not math.isfinite(loss_value):
                    what = f"the loss is {loss_value} at step {step + 1}"
                elif not math.isfinite(ratio):  # the weights and momentum were checked finite a step ago
                    what = f"the gradients of step {step + 1} are not finite"
                else:
                    what = (f"the update of step {step + 1} would take the weights or momentum to {ratio:.2g} of the "
                            "largest float (overflow)")
                path = save(step, note=f"last good state, before step {step + 1}: {what}")
                bar.close()
                where = f"; the last good state (after step {step}, all finite) is in {path}" if path else ""
                raise NonFiniteLossError(
                    f"{desc}: {what} (lr {lr:.3g}){where}. Lower --base-lr, use --precision fp32/bf16, or check the "
                    "data for NaN/Inf"
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
            if stop_signal:
                t_save = time.perf_counter()
                path = save(step, note=f"stopped by {signal.Signals(stop_signal).name} after step {step}")
                bar.close()
                where = (f"; checkpoint {path} written in {time.perf_counter() - t_save:.1f} s. Continue with "
                         f"--resume auto --output {out} (or --resume {path})") if path else ""
                raise RunInterrupted(f"{desc}: stopped by {signal.Signals(stop_signal).name} after step {step} of "
                                     f"{total_steps}{where}", signum=stop_signal, step=step, checkpoint=path)
    bar.close()
    seconds = time.perf_counter() - t_start
    return {"model": base, "step": step, "total_steps": total_steps, "start_step": start_step, "history": history,
            "final_eval": final_eval, "checkpoint": saved, "seconds": seconds, "optimizer": opt,
            "stopped_early": step < total_steps,
            "img_per_s": (step - sampler.start_step) * cfg.batch_size / max(seconds, 1e-9)}


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The DDP module inside a ``torch.compile`` wrapper (for ``no_sync``)."""
    return model._orig_mod if hasattr(model, "_orig_mod") else model


def _jsonable(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None
