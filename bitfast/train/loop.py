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
import inspect
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bitfast.train import checkpoint as ckpt
from bitfast.train import config, guards, outputs, progress, sampling
from bitfast.train.distributed import DistInfo, all_reduce_sum, barrier, check_batch

__all__ = [
    "build_optimizer",
    "ema_state",
    "ema_supported",
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
    "SeededDataset": "bitfast.train.sampling", "StepSampler": "bitfast.train.sampling",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        warnings.warn(f"bitfast.train.loop.{name} moved to {_MOVED[name]}; import it from there",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'bitfast.train.loop' has no attribute {name!r}")


def ema_supported() -> bool:
    """Whether ``bitfast.optim.FusedSGD`` keeps Polyak-averaged (EMA) weights (``ema_decay=``)."""
    from bitfast.optim import FusedSGD

    return "ema_decay" in inspect.signature(FusedSGD.__init__).parameters


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


def _loss_sum(logits: torch.Tensor, target: torch.Tensor, soft: bool, label_smoothing: float) -> torch.Tensor:
    logits = logits.float()
    if soft:
        logp = F.log_softmax(logits, dim=-1)
        if label_smoothing:
            k = logits.shape[-1]
            target = target * (1 - label_smoothing) + label_smoothing / k
        return -(target * logp).sum()
    return F.cross_entropy(logits, target, reduction="sum", label_smoothing=label_smoothing)


def _data_identity(cfg: config.TrainConfig, train_set) -> dict:
    """What identifies a run's training data in its checkpoint: the source ("digits" or the
    folder's resolved path) and the number of training images."""
    source = cfg.data if cfg.data in (None, "digits") else os.path.realpath(cfg.data)
    return {"source": source or "digits", "train_size": len(train_set)}


def train_loop(
    model: nn.Module,
    train_set,
    *,
    cfg: config.TrainConfig,
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
    raise ``guards.RunInterrupted``; under DDP the processes agree on the step to stop after.

    Returns ``{"model", "step", "total_steps", "start_step", "history", "final_eval",
    "checkpoint", "seconds", "img_per_s", "optimizer", "stopped_early"}``. Raises
    ``guards.NonFiniteLossError`` (after saving the last good state, all finite) when the loss, the
    gradients or the coming update are not finite.
    """
    info = info or DistInfo()
    device = info.device
    if cfg.precision not in config.PRECISIONS:
        raise ValueError(f"--precision must be one of {list(config.PRECISIONS)}; got {cfg.precision!r}")
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
    resume = outputs.check_output(cfg)  # every process checks before the main one removes anything
    barrier(info)
    if info.is_main:
        if cfg.resume == "auto" and resume is None:
            print(f"{desc}: --resume auto: no checkpoint in {out}; starting a fresh run", file=sys.stderr)
        elif cfg.resume is None and resume is not None:
            print(f"{desc}: restarted by torchrun (restart {outputs.restart_count()}); resuming from {resume}", file=sys.stderr)
        if resume is None and (cfg.overwrite or cfg.resume == "auto" or outputs.restart_count()):
            for name in outputs.RUN_FILES:
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
    metrics = progress.MetricsLog(metrics_path if info.is_main else None)

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
            progress.truncate_metrics(metrics_path, step)  # the steps after the checkpoint are run again
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

    sampler = sampling.StepSampler(len(train_set), cfg.batch_size, total_steps=total_steps, start_step=step,
                          rank=info.rank, world_size=info.world_size, seed=cfg.seed)
    workers = cfg.workers if cfg.workers is not None else 0
    loader = torch.utils.data.DataLoader(
        sampling.SeededDataset(train_set), batch_sampler=sampler, num_workers=workers, collate_fn=sampling.collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    autocast_dtype = config.PRECISIONS[cfg.precision]
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

    bar = progress.ProgressBar(total_steps, start=step, desc=desc, enabled=cfg.progress and info.is_main)
    set_train_mode(net, freeze_bn=cfg.freeze_bn, linear_probe=cfg.linear_probe)
    t_start = time.perf_counter()
    t_window, img_window = time.perf_counter(), 0
    img_s = None
    final_eval = None
    saved = None
    stop = cfg.stop_at_step
    with guards.stop_on_signals(desc, announce=info.is_main) as signalled:
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
            # Every step is checked before it writes the weights: the state saved as the last good
            # one is then always finite. (DDP: every process holds the same weights and reduced
            # gradients, so all reach the same verdict.) The check's bound is read back with the
            # loss, in one transfer.
            if scaler.is_enabled():
                scaler.unscale_(opt)
            ratio_t, grads_finite = guards.step_overflow_ratio(opt)
            if info.enabled:
                # The loss and the stop flag in one reduction: every process learns of a signal
                # that reached any of them, and all stop after the same step.
                got = [float(signalled["signum"] == s) for s in (signal.SIGTERM, signal.SIGINT)]
                packet = torch.cat([loss_total.reshape(1), torch.tensor(got, device=device)])
                all_reduce_sum(packet, info)
                loss_sum, term, intr, ratio = torch.cat([packet.double(), ratio_t.reshape(1).to(device)]).tolist()
                stop_signal = signal.SIGTERM if term else (signal.SIGINT if intr else 0)
            else:
                loss_sum, ratio = torch.stack([loss_total.double(), ratio_t.to(device)]).tolist()
                stop_signal = signalled["signum"] or 0
            loss_value = loss_sum / cfg.batch_size
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
                raise guards.NonFiniteLossError(
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
                raise guards.RunInterrupted(f"{desc}: stopped by {signal.Signals(stop_signal).name} after step {step} of "
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
