"""The training loop shared by fine-tuning, upstream pre-training, distillation, few-shot
fine-tuning and the story: SGD with momentum (``bitfast.optim.FusedSGD``), a per-step
learning-rate function, micro-batching, bf16/fp16 autocast (GradScaler for fp16),
channels_last, optional ``torch.compile`` or the whole step in a CUDA graph
(``bitfast.train.graphs``), frozen BatchNorm statistics, linear probing, DDP,
periodic atomic checkpoints with exact resume, a NaN/Inf stop, SIGTERM/SIGINT stops that save,
a progress bar and a JSON-lines metrics file.

What the task is (classification with MixUp, a distillation loss, detection ...) comes in as a
``bitfast.train.task.Task``; the step itself is ``bitfast.train.step``. The loop is built of
separate functions: :func:`prepare_output` (the output directory, what to resume),
:func:`restore` (resume), ``step.forward_backward`` / ``step.check_step`` /
``step.apply_update`` (one step), :func:`save_state` (checkpoint), and :func:`train_loop`,
which runs them with evaluation, logging and the stops.

Determinism (what makes ``--resume`` bit for bit): the data order is a pure function of the
seed and the step (``bitfast.data.StepSampler``: the stream of per-epoch permutations cut into
global batches, each process taking its slice), every sample's augmentation is drawn from a
seed derived from its position in that stream (``bitfast.data.SeededDataset``), the task draws
from its own generators (MixUp), and the checkpoint holds every RNG state, the optimizer and
the scaler. A run stopped after step k and resumed therefore replays steps k+1... exactly as
the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from bitfast.data import sampling
from bitfast.train import checkpoint as ckpt
from bitfast.train import config, graphs, guards, outputs, progress
from bitfast.train.distributed import DistInfo, barrier, check_batch
from bitfast.train.step import TrainState, apply_update, check_step, forward_backward, unwrap_ddp
from bitfast.train.task import Classification, Task

__all__ = [
    "build_optimizer",
    "ema_state",
    "ema_supported",
    "prepare_output",
    "restore",
    "save_state",
    "set_train_mode",
    "train_loop",
    "trainable_parameters",
    "unwrap",
    "unwrap_ddp",
]

# Names that moved to the library's own modules; importing them from here still works.
_MOVED = {
    "PRECISIONS": "bitfast.train.config", "TrainConfig": "bitfast.train.config",
    "NonFiniteLossError": "bitfast.train.guards", "RunInterrupted": "bitfast.train.guards",
    "INTERRUPT_EXIT_STATUS": "bitfast.train.guards", "step_overflow_ratio": "bitfast.train.guards",
    "RUN_FILES": "bitfast.train.outputs", "check_output": "bitfast.train.outputs",
    "resolve_resume": "bitfast.train.outputs", "start_run": "bitfast.train.outputs",
    "MetricsLog": "bitfast.train.progress", "ProgressBar": "bitfast.train.progress",
    "SeededDataset": "bitfast.data.sampling", "StepSampler": "bitfast.data.sampling",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        warnings.warn(f"bitfast.train.loop.{name} moved to {_MOVED[name]}; import it from there",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'bitfast.train.loop' has no attribute {name!r}")


def ema_supported() -> bool:
    """Always True: ``bitfast.optim.FusedSGD`` keeps Polyak-averaged (EMA) weights
    (``ema_decay=``). Kept for code written when that was optional; deprecated."""
    warnings.warn("bitfast.train.loop.ema_supported() is always True (FusedSGD takes ema_decay); drop the check",
                  DeprecationWarning, stacklevel=2)
    return True


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


def build_optimizer(params, cfg: config.TrainConfig, lr: float) -> torch.optim.Optimizer:
    """``FusedSGD`` with the config's momentum, weight decay and ``ema_decay`` (None: no average)."""
    from bitfast.optim import FusedSGD

    return FusedSGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    ema_decay=cfg.ema_decay or None)


def ema_state(opt: torch.optim.Optimizer, model: nn.Module) -> dict | None:
    """The model's state dict with the optimizer's moving averages in place of the parameters
    it optimizes (None when ``opt`` keeps no average: it is not a ``FusedSGD`` with
    ``ema_decay``). A parameter not stepped yet averages to itself."""
    from bitfast.optim import FusedSGD

    if not isinstance(opt, FusedSGD) or opt.ema_decay is None:
        return None
    base = unwrap(model)
    names = {id(p): name for name, p in base.named_parameters()}
    params = [p for group in opt.param_groups for p in group["params"]]
    full = base.state_dict()
    for p, avg in zip(params, opt.ema_parameters()):
        if id(p) in names:
            full[names[id(p)]] = avg
    return {k: v.detach().clone() for k, v in full.items()}


def _data_identity(cfg: config.TrainConfig, train_set) -> dict:
    """What identifies a run's training data in its checkpoint: the source ("digits" or the
    folder's resolved path) and the number of training images."""
    source = cfg.data if cfg.data in (None, "digits") else os.path.realpath(cfg.data)
    return {"source": source or "digits", "train_size": len(train_set)}


def prepare_output(cfg: config.TrainConfig, info: DistInfo, desc: str) -> str | None:
    """Check the run's output directory (``outputs.check_output``: a directory holding another
    run is refused unless the run resumes or ``cfg.overwrite``), clear the files of a run that
    starts afresh there, and return the checkpoint to resume from (or None). Every process
    checks before the main one removes anything."""
    resume = outputs.check_output(cfg)
    barrier(info)
    if info.is_main:
        if cfg.resume == "auto" and resume is None:
            print(f"{desc}: --resume auto: no checkpoint in {cfg.output}; starting a fresh run", file=sys.stderr)
        elif cfg.resume is None and resume is not None:
            print(f"{desc}: restarted by torchrun (restart {outputs.restart_count()}); resuming from {resume}", file=sys.stderr)
        if resume is None and (cfg.overwrite or cfg.resume == "auto" or outputs.restart_count()):
            for name in outputs.RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(cfg.output, name))
    barrier(info)
    return resume


def restore(state: TrainState, path: str, *, trusted: bool, model: str, num_classes: int | None,
            identity: dict) -> None:
    """Load the checkpoint ``path`` into ``state`` (model, optimizer, scaler, every RNG state
    including the task's generators, step) after checking that it belongs to this run
    (``checkpoint.check_compatible``)."""
    info = state.info
    saved = ckpt.load_checkpoint(path, map_location=info.device, trusted=trusted)
    ckpt.check_compatible(saved, model=model, num_classes=num_classes, path=path, run=identity)
    try:
        state.base.load_state_dict(saved["model"])
        state.opt.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ckpt.CheckpointError(f"cannot resume from {path}: its state does not fit this run ({exc})") from exc
    if saved.get("scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(saved["scaler"])
    rng = saved["rng"]
    if isinstance(rng, list):  # one state per rank
        rng = rng[info.rank] if len(rng) == info.world_size else rng[0]
    ckpt.set_rng_state(rng, state.task.generators())
    state.step = int(saved["step"])


def save_state(state: TrainState, path: str, *, note: str = "", extra: dict) -> str | None:
    """Write the run's checkpoint to ``path`` (main process; the others contribute their RNG
    states under DDP and return None): model, optimizer, EMA weights, scaler, step, every
    process's RNG states, and ``extra`` (config, identity, run metadata)."""
    info = state.info
    rng_all = ckpt.get_rng_state(state.task.generators())
    if info.enabled:
        gathered: list = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, rng_all)
        rng_all = gathered
    if not info.is_main:
        return None
    # Before the first step the average is the weights themselves: nothing to store.
    ema = ema_state(state.opt, state.base) if state.step else None
    return ckpt.save_checkpoint(path, {
        "model": state.base.state_dict(), "optimizer": state.opt.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None, "ema": ema,
        "step": state.step, "rng": rng_all, "note": note, **extra,
    })


def train_loop(
    model: nn.Module,
    train_set,
    *,
    cfg: config.TrainConfig,
    total_steps: int,
    lr_at: Callable[[int], float | None],
    num_classes: int | None = None,
    info: DistInfo | None = None,
    eval_fn: Callable[[nn.Module, int], dict] | None = None,
    desc: str = "train",
    run_meta: dict | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    task: Task | None = None,
) -> dict:
    """Train ``model`` on ``train_set`` for ``total_steps`` steps of ``cfg.batch_size`` examples.

    ``task`` says how a batch becomes a loss and what else to log (``bitfast.train.task``);
    by default classification into ``num_classes`` classes (``task.Classification``) with the
    config's MixUp and label smoothing, where ``loss_fn(x, logits, targets)`` (optional)
    replaces the cross-entropy: it gets a micro-batch's (possibly MixUp-mixed) inputs, the
    model's logits and the targets (class indices, or soft targets under MixUp) and returns the
    loss *summed* over the micro-batch (``bitfast distill`` adds a teacher's soft targets this
    way). Pass either ``task`` or ``num_classes`` (with ``loss_fn``).

    ``lr_at(step)`` gives the learning rate of each step (``None`` ends the run early).
    ``eval_fn(model, step)`` (optional) returns a metrics dict; it runs every
    ``cfg.eval_every`` steps and at the end. Checkpoints (``OUTPUT/last.pt``) hold the model,
    optimizer, EMA, scaler, step, RNG states, config and what identifies the run (model, norm,
    classes, data, batch, steps, seed); ``cfg.resume`` continues from one and refuses one
    whose identity differs. An output directory that holds a run is refused unless the run
    resumes or ``cfg.overwrite``. ``run_meta`` (model name, class names ...) is stored in every
    checkpoint.

    SIGTERM and SIGINT (in the main thread) finish the current step, write the checkpoint and
    raise ``guards.RunInterrupted``; under DDP the processes agree on the step to stop after.

    Returns ``{"model", "step", "total_steps", "start_step", "history", "final_eval",
    "checkpoint", "seconds", "img_per_s", "optimizer", "stopped_early"}``. Raises
    ``guards.NonFiniteLossError`` (after saving the last good state, all finite) when the loss, the
    gradients or the coming update are not finite.

    ``cfg.cuda_graphs`` runs the steps through ``bitfast.train.graphs.CUDAGraphStep`` (one CUDA
    GPU, one process, bf16 or fp32, no ``cfg.compile``; ``ValueError`` otherwise): the steps'
    losses and checks are read back every ``cfg.log_every`` steps and before every evaluation,
    checkpoint and stop, and a non-finite step rolls the run back to the state of the last read
    back that found every step good, which is saved as the last good state.
    """
    info = info or DistInfo()
    device = info.device
    if cfg.precision not in config.PRECISIONS:
        raise ValueError(f"--precision must be one of {list(config.PRECISIONS)}; got {cfg.precision!r}")
    if cfg.batch_split < 1:
        raise ValueError(f"--batch-split must be >= 1; got {cfg.batch_split}")
    local_batch = check_batch(cfg.batch_size, info.world_size, cfg.batch_split)
    if cfg.cuda_graphs:
        graphs.check_supported(cfg, info)
    if total_steps < 1:
        raise ValueError(f"the run has {total_steps} steps; pass --steps >= 1")
    if task is None:
        if num_classes is None:
            raise TypeError("train_loop: pass task= or num_classes= (classification)")
        task = Classification(num_classes, mixup_alpha=cfg.mixup_alpha, label_smoothing=cfg.label_smoothing,
                              seed=cfg.seed, loss_fn=loss_fn)
    elif loss_fn is not None:
        raise TypeError("train_loop: loss_fn= belongs to the default classification task; with task= put the loss "
                        "in the task")
    elif num_classes is not None and num_classes != task.num_classes:
        raise ValueError(f"train_loop: num_classes={num_classes} but the task has {task.num_classes}")
    num_classes = task.num_classes
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
    resume = prepare_output(cfg, info, desc)

    base = unwrap(model).to(device)
    if cfg.channels_last:
        base = base.to(memory_format=torch.channels_last)
    params = trainable_parameters(base, cfg.linear_probe)
    opt = build_optimizer(params, cfg, lr=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    state = TrainState(base=base, net=base, opt=opt, scaler=scaler, task=task, info=info, local_batch=local_batch,
                       batch_split=cfg.batch_split, autocast_dtype=config.PRECISIONS[cfg.precision])

    if info.is_main:
        ckpt.probe_output_dir(out, need_bytes=3 * ckpt.state_dict_bytes(base) + (1 << 20))
    metrics = progress.MetricsLog(metrics_path if info.is_main else None)

    if resume:
        restore(state, resume, trusted=cfg.trust_checkpoint, model=model_name, num_classes=num_classes,
                identity=identity)
        if info.is_main:
            progress.truncate_metrics(metrics_path, state.step)  # the steps after the checkpoint are run again
            if state.step >= total_steps:
                print(f"{desc}: {resume} is a finished run (step {state.step} of {total_steps}); nothing left to "
                      "train", file=sys.stderr)
            else:
                print(f"{desc}: resumed from {resume} at step {state.step}/{total_steps}", file=sys.stderr)
    start_step = state.step

    if info.enabled:
        state.net = nn.parallel.DistributedDataParallel(
            base, device_ids=[device.index] if device.type == "cuda" else None,
        )
    if cfg.compile:
        state.net = torch.compile(state.net)
    net = state.net
    graphed = pending = good = None
    if cfg.cuda_graphs:
        # The step in a CUDA graph: packets read back every --log-every steps, and a device
        # copy of the last state a read back found good to roll back to (bitfast.train.graphs).
        graphed = graphs.CUDAGraphStep(state)
        pending = graphs.PendingSteps(max(cfg.log_every, 1), device)
        good = graphs.LastGoodState(state)
        good.take()

    sampler = sampling.StepSampler(len(train_set), cfg.batch_size, total_steps=total_steps, start_step=start_step,
                                   rank=info.rank, world_size=info.world_size, seed=cfg.seed)
    workers = cfg.workers if cfg.workers is not None else 0
    loader = torch.utils.data.DataLoader(
        sampling.SeededDataset(train_set), batch_sampler=sampler, num_workers=workers, collate_fn=sampling.collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    history: list[dict] = []
    extra = {"config": {**cfg.to_dict(), "model": model_name}, "num_classes": num_classes, "run": identity,
             **{k: v for k, v in run_meta.items() if k != "model"}}

    def save(note: str = "") -> str | None:
        return save_state(state, last_path, note=note, extra=extra)

    def stop_non_finite(problem: str, lr: float, failed_step: int | None = None) -> None:
        # The state saved is the last good one: every step is checked before it writes the
        # weights (eager), or rolled back to the last read back that found all good (graphs).
        if failed_step is None:
            path = save(note=f"last good state, before step {state.step + 1}: {problem}")
            rolled = ""
        else:
            path = save(note=f"last good state, after step {state.step} (CUDA graphs: rolled back from step "
                             f"{failed_step}): {problem}")
            rolled = (f"; CUDA graphs check the steps at each read back (--log-every {cfg.log_every}): the run was "
                      f"rolled back to step {state.step}")
        bar.close()
        where = f"; the last good state (after step {state.step}, all finite) is in {path}" if path else ""
        raise guards.NonFiniteLossError(
            f"{desc}: {problem} (lr {lr:.3g}){rolled}{where}. Lower --base-lr, use --precision fp32/bf16, or "
            "check the data for NaN/Inf"
        )

    def read_back_due(step: int, stop_signal: int) -> bool:
        # Under CUDA graphs: whether the pending steps must be checked now (before anything
        # reads or saves the weights, or the buffer overflows).
        return (pending.full or step == total_steps or (stop is not None and step >= stop) or bool(stop_signal)
                or (eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0)
                or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0))

    def read_pending() -> list:
        # Under CUDA graphs: check the pending steps; roll back and stop at a bad one.
        done = pending.read(graphed.part_names or [], cfg.batch_size)
        bad = next((d for d in done if d[2].problem), None)
        if bad is not None:
            good.restore()
            stop_non_finite(bad[2].problem, bad[1], failed_step=bad[0])
        good.take()
        return done

    def log_steps(done: list, img_s: float | None) -> None:
        for done_step, done_lr, check in done:
            record = {"kind": "train", "step": done_step, "loss": check.loss, **check.parts, "lr": done_lr}
            history.append(record)
            if done_step % max(cfg.log_every, 1) == 0 or done_step == total_steps:
                metrics.write(**record, img_per_s=img_s)

    def evaluate_and_save(last: bool) -> None:
        nonlocal final_eval, saved
        step = state.step
        if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            final_eval = eval_fn(net, step)
            set_train_mode(net, freeze_bn=cfg.freeze_bn, linear_probe=cfg.linear_probe)
            history.append({"kind": "eval", "step": step, **final_eval})
            metrics.write(kind="eval", step=step, **{k: v for k, v in final_eval.items() if _jsonable(v)})
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last:
            saved = save() or saved

    bar = progress.ProgressBar(total_steps, start=start_step, desc=desc, enabled=cfg.progress and info.is_main)
    set_train_mode(net, freeze_bn=cfg.freeze_bn, linear_probe=cfg.linear_probe)
    t_start = time.perf_counter()
    t_window, img_window = time.perf_counter(), 0
    img_s = None
    final_eval = None
    saved = None
    stop = cfg.stop_at_step
    with guards.stop_on_signals(desc, announce=info.is_main) as signalled:
        for x, y in loader:
            lr = lr_at(state.step)
            if lr is None:
                break
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if graphed is None:
                for group in opt.param_groups:
                    group["lr"] = lr
                loss_total, parts = forward_backward(state, x, y)
                check = check_step(state, loss_total, parts, cfg.batch_size, signalled)
                if check.problem:
                    stop_non_finite(check.problem, lr)
                apply_update(state)
                done = [(state.step, lr, check)]
                stop_signal = check.stop_signal
            else:
                graphed.set_lr(lr)
                pending.push(state.step + 1, lr, graphed(x, y))
                stop_signal = signalled["signum"] or 0
                if not read_back_due(state.step, stop_signal):
                    continue
                done = read_pending()
            step = state.step
            img_window += cfg.batch_size * len(done)
            now = time.perf_counter()
            if now - t_window > 0.5 or step == total_steps:
                img_s = img_window / (now - t_window)
                t_window, img_window = now, 0
            log_steps(done, img_s)
            _, last_lr, last_check = done[-1]
            bar.update(step, loss=last_check.loss, lr=last_lr, **{"img/s": img_s})
            last = step == total_steps or (stop is not None and step >= stop)
            evaluate_and_save(last)
            if last:
                break
            if stop_signal:
                t_save = time.perf_counter()
                name = signal.Signals(stop_signal).name
                path = save(note=f"stopped by {name} after step {step}")
                bar.close()
                where = (f"; checkpoint {path} written in {time.perf_counter() - t_save:.1f} s. Continue with "
                         f"--resume auto --output {out} (or --resume {path})") if path else ""
                raise guards.RunInterrupted(f"{desc}: stopped by {name} after step {step} of {total_steps}{where}",
                                            signum=stop_signal, step=step, checkpoint=path)
        if pending is not None and len(pending):  # the schedule ended the run between read backs
            log_steps(read_pending(), img_s)
    bar.close()
    seconds = time.perf_counter() - t_start
    step = state.step
    return {"model": base, "step": step, "total_steps": total_steps, "start_step": start_step, "history": history,
            "final_eval": final_eval, "checkpoint": saved, "seconds": seconds, "optimizer": opt,
            "stopped_early": step < total_steps,
            "img_per_s": (step - start_step) * cfg.batch_size / max(seconds, 1e-9)}


def _jsonable(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None
