"""What every recipe builds before its loop: the datasets (the embedded digits or an
ImageFolder), the model (a bitfast model name or ``bit_tiny``, optionally initialised from
released weights or a bitfast training checkpoint), the evaluation callback, and what every
recipe does after it: the final evaluation, plots and summary."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch
from torch import nn

from bitfast.train import plots
from bitfast.train.checkpoint import CheckpointError, UntrustedCheckpointError, load_checkpoint
from bitfast.train.config import TrainConfig
from bitfast.train.distributed import DistInfo
from bitfast.train.evaluate import evaluate
from bitfast.train.loop import ema_state, unwrap

__all__ = [
    "MIN_RESOLUTION",
    "TINY_MODEL",
    "Data",
    "build_data",
    "build_model",
    "build_planned_data",
    "check_resolution",
    "checkpoint_eval_data",
    "checkpoint_resolution",
    "finish_run",
    "make_eval_fn",
    "merge_lora_weights",
    "model_from_checkpoint",
    "retransform",
    "summary_table",
]

# The BiT ResNet-v2 reduces its input 32-fold (stem 4x, three strided stages): below 32
# pixels the last stage computes on zero padding alone.
MIN_RESOLUTION = 32
# A narrow BiT-style network (units (1, 1, 1, 1), stem width 32: about 2M parameters) for
# CPU runs: the story and the tests.
TINY_MODEL = "bit_tiny"


def check_resolution(crop: int, what: str = "--crop") -> int:
    """``crop`` unless it is below the network's minimum (``MIN_RESOLUTION``): then a
    ``ValueError`` naming the flag to change."""
    if crop < MIN_RESOLUTION:
        raise ValueError(
            f"resolution {crop} is smaller than the network's minimum of {MIN_RESOLUTION} pixels (BiT ResNet-v2 "
            f"downsamples 32x); pass {what} {MIN_RESOLUTION} or more"
        )
    return crop


class DigitAugment:
    """Train-time augmentation of a digits tensor image: random ``crop`` x ``crop`` crop of
    the (already resized) image and, when ``flip``, a random horizontal flip; randomness from
    torch's generator (seeded per sample by the loop)."""

    def __init__(self, crop: int, flip: bool = False) -> None:
        self.crop, self.flip = crop, flip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Augment one (C, H, W) image."""
        h, w = x.shape[-2:]
        top = int(torch.randint(0, h - self.crop + 1, ()))
        left = int(torch.randint(0, w - self.crop + 1, ()))
        x = x[..., top:top + self.crop, left:left + self.crop]
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x.contiguous()


class Data:
    """A run's datasets: ``train``, ``eval`` (or None), ``class_names``, ``num_classes``."""

    def __init__(self, train, eval_set, class_names: Sequence[str], description: str) -> None:
        self.train, self.eval, self.class_names = train, eval_set, list(class_names)
        self.num_classes = len(self.class_names)
        self.description = description


def _is_digits(data: str) -> bool:
    return data is None or data == "digits"


def build_data(cfg: TrainConfig, resize: int, crop: int, *, inception: bool = False, classes=None,
               split_seed: int = 0, min_classes: int = 2) -> Data:
    """The train and eval datasets of ``cfg.data``: ``"digits"`` (the embedded UCI digits,
    ``cfg.classes`` or all ten, stratified 80/20 split) or an ImageFolder directory (its
    ``train/`` and ``val/`` (or ``test/``) subfolders when present, else the folder itself
    for training and ``cfg.val_data`` for evaluation).

    Train images are resized to ``resize`` and randomly cropped to ``crop`` (``inception``:
    random-resized crop, the upstream recipe); eval images are resized to ``crop``. Data with
    fewer than ``min_classes`` classes is refused (training needs two; evaluation passes 1).
    """
    data = _build_data(cfg, resize, crop, inception=inception, classes=classes, split_seed=split_seed)
    if data.num_classes < min_classes:
        raise ValueError(
            f"{data.description} has {data.num_classes} class(es) ({data.class_names}); training a classifier needs at "
            "least two: add class folders (ImageFolder) or pass more --classes"
        )
    return data


def retransform(data: Data, cfg: TrainConfig, resize: int, crop: int, *, inception: bool = False) -> Data:
    """``data`` at another resolution: the digits are built again (cheap); an ImageFolder's
    transforms are replaced, without scanning its files again."""
    if _is_digits(cfg.data):
        return build_data(cfg, resize, crop, inception=inception)
    from bitfast.data import transforms

    check_resolution(crop)
    if resize < crop:
        raise ValueError(f"--resize ({resize}) must be >= --crop ({crop})")
    data.train.transform = transforms.train_transform(resize, crop, inception=inception, flip=cfg.flip)
    if data.eval is not None:
        data.eval.transform = transforms.eval_transform(crop)
    return data


def checkpoint_resolution(source: str | None, trusted: bool = False) -> int | None:
    """The resolution a bitfast training checkpoint was trained at, when ``source`` is one
    (else None): runs that start from it default to it. The file's tensors are mapped, not
    read (``mmap``): the run reads them once, when it builds its model from the file."""
    if not source or not os.path.isfile(source):
        return None
    try:
        state = load_checkpoint(source, trusted=trusted, mmap=True)
    except UntrustedCheckpointError:
        raise
    except CheckpointError:
        return None  # released or timm weights: the HyperRule decides
    value = state.get("resolution")
    return int(value) if value else None


def build_planned_data(cfg: TrainConfig, plan_fn, *, inception: bool = False) -> tuple[Data, dict, str]:
    """The datasets of a run whose resolution follows from its data (BiT-HyperRule): build them,
    decide the image size on the training images (``hyperrule.dataset_image_size``: the
    median image area; 8x8 for the digits), call ``plan_fn(n, image_size)`` for the plan (a
    dict with ``resize`` and ``crop``) and apply its resolution. Without ``cfg.crop``, a
    ``cfg.pretrained`` bitfast training checkpoint sets the resolution it was trained at.
    Returns ``(data, plan, note)``, the note saying what the resolution was decided on."""
    from bitfast.train import hyperrule

    note = ""
    if cfg.crop is None and cfg.resize is None:
        crop = checkpoint_resolution(cfg.pretrained, trusted=cfg.trust_checkpoint)
        if crop is not None:
            cfg.crop = crop
            note = f"resolution {crop}: the --pretrained checkpoint's (pass --crop to change)"
    probe = plan_fn(1, None)
    data = build_data(cfg, probe["resize"], probe["crop"], inception=inception)
    image_size = (8, 8)
    sizes = getattr(data.train, "image_sizes", None)
    if sizes is not None:
        image_size, small = hyperrule.dataset_image_size(sizes)
        if not note and cfg.crop is None and cfg.resize is None:
            note = (f"image size decided on the median image area of {len(data.train)} training images: "
                    f"{image_size[0]}x{image_size[1]} ({small:.0%} below 96x96)")
    plan = plan_fn(len(data.train), image_size)
    if (plan["resize"], plan["crop"]) != (probe["resize"], probe["crop"]):
        data = retransform(data, cfg, plan["resize"], plan["crop"], inception=inception)
    return data, plan, note


def _build_data(cfg: TrainConfig, resize: int, crop: int, *, inception: bool, classes, split_seed: int) -> Data:
    check_resolution(crop)
    if resize < crop:
        raise ValueError(f"--resize ({resize}) must be >= --crop ({crop})")
    if _is_digits(cfg.data):
        from bitfast.data.digits import DigitsDataset

        digits = list(classes if classes is not None else (cfg.classes if cfg.classes is not None else range(10)))
        train = DigitsDataset(classes=digits, split="train", resolution=resize, seed=split_seed,
                              transform=DigitAugment(crop, flip=cfg.flip))
        test = DigitsDataset(classes=digits, split="test", resolution=crop, seed=split_seed)
        return Data(train, test, [str(d) for d in digits],
                    f"embedded digits {digits} ({len(train)} train / {len(test)} test, {crop}x{crop})")
    if cfg.classes is not None:
        raise ValueError("--classes selects digits of the embedded dataset; an ImageFolder uses all its class folders")
    from bitfast.data import ImageFolder, transforms

    root = cfg.data
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root!r} is not a directory; pass an ImageFolder (one subfolder per class)")
    train_root, val_root = root, cfg.val_data
    for name in ("train", "val", "test"):
        sub = os.path.join(root, name)
        if os.path.isdir(sub):
            if name == "train":
                train_root = sub
            elif val_root is None:
                val_root = sub
    train = ImageFolder(train_root, transform=transforms.train_transform(resize, crop, inception=inception, flip=cfg.flip))
    eval_set = None
    if val_root is not None:
        eval_set = ImageFolder(val_root, transform=transforms.eval_transform(crop))
        if list(eval_set.classes) != list(train.classes):
            raise ValueError(
                f"the evaluation folder {val_root!r} has classes {list(eval_set.classes)[:10]}..., the training folder "
                f"{train_root!r} has {list(train.classes)[:10]}...: they must have the same class subfolders"
            )
    skipped = train.skipped + (eval_set.skipped if eval_set is not None else 0)
    desc = f"ImageFolder {train_root} ({len(train)} train images, {len(train.classes)} classes"
    desc += f", {skipped} unreadable file(s) skipped" if skipped else ""
    desc += f", {len(eval_set)} eval images from {val_root})" if eval_set is not None else ", no eval set)"
    return Data(train, eval_set, list(train.classes), desc)


def merge_lora_weights(weights: dict, config: dict | None) -> dict:
    """The plain model weights of a checkpoint written by ``bitfast finetune --lora-rank``:
    every ``<conv>.lora_A`` / ``<conv>.lora_B`` pair folded into ``<conv>.weight`` as
    ``weight + (lora_alpha / rank) * (A @ B^T)`` (what ``bitfast.adapt.merge`` computes), the
    LoRA keys dropped. Weights without LoRA keys come back unchanged."""
    if not any(k.endswith(".lora_A") for k in weights):
        return weights
    config = config or {}
    out = {k: v for k, v in weights.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key, a in weights.items():
        if not key.endswith(".lora_A"):
            continue
        name = key[: -len(".lora_A")]
        b, w = weights[name + ".lora_B"], out[name + ".weight"]
        rank = a.shape[1]
        scale = float(config.get("lora_alpha") or rank) / rank
        out[name + ".weight"] = w + (a.to(w.dtype) @ b.to(w.dtype).t()).mul(scale).reshape(w.shape)
    return out


def _load_init(model: nn.Module, source: str, trusted: bool = False) -> str:
    """Initialise ``model`` from ``source``: the backbone of a bitfast training checkpoint (its
    EMA weights when it has them; the head stays fresh) or anything ``bitfast.load_pretrained``
    reads (which loads the head only when the class count matches). A file that only a full
    unpickling could read is refused unless ``trusted`` (see ``load_checkpoint``)."""
    if os.path.isfile(source):
        try:
            state = load_checkpoint(source, trusted=trusted)
        except UntrustedCheckpointError as exc:
            raise UntrustedCheckpointError(f"--pretrained {source}: {exc}") from None
        except CheckpointError:
            state = None
        if state is not None:
            # BiT transfers the backbone and trains a fresh head: the head is never loaded.
            weights = merge_lora_weights(state.get("ema") or state["model"], state.get("config"))
            own = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
            keep = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
            missing = sorted(set(own) - set(keep))
            if missing:
                raise CheckpointError(
                    f"--pretrained {source}: its weights do not fit this model (e.g. {missing[:3]}); it was written for "
                    f"{state.get('config', {}).get('model')!r}: pass the same --model"
                )
            model.load_state_dict(keep, strict=False)
            return f"backbone ({len(keep)} tensors) from the training checkpoint {source}, fresh head"
    from bitfast import load_pretrained

    return str(load_pretrained(model, source, strict=True))


def build_model(cfg: TrainConfig, num_classes: int, *, zero_head: bool = True) -> tuple[nn.Module, str]:
    """The model of ``cfg.model`` with a fresh ``num_classes`` head (zero-initialised unless
    ``zero_head`` is False) and ``cfg.pretrained`` weights when given (a training checkpoint of
    the earlier format only with ``cfg.trust_checkpoint``); returns ``(model, note)``."""
    from bitfast import create_model

    model = create_model(cfg.model, num_classes=num_classes, norm=cfg.norm, zero_head=zero_head)
    note = "random initialisation"
    if cfg.pretrained:
        note = _load_init(model, cfg.pretrained, trusted=cfg.trust_checkpoint)
    return model, note


def make_eval_fn(data: Data, cfg: TrainConfig, info: DistInfo):
    """The loop's evaluation callback (top-1/top-5/loss/ECE on ``data.eval``), or None
    without an eval set."""
    if data.eval is None:
        return None
    batch = cfg.eval_batch_size or max(cfg.batch_size // max(info.world_size, 1), 1)

    def eval_fn(net: nn.Module, step: int) -> dict:
        res = evaluate(unwrap(net), data.eval, data.num_classes, batch_size=batch, info=info,
                       precision=cfg.precision, channels_last=cfg.channels_last)
        return {k: res[k] for k in ("top1", "top5", "loss", "ece", "n")}

    return eval_fn


def summary_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """A plain-text table (columns padded to their widest cell)."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    out = [line, "| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |", line]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    out.append(line)
    return "\n".join(out)


def finish_run(result: dict, data: Data, cfg: TrainConfig, info: DistInfo, title: str, stream=None) -> dict:
    """After the loop: evaluate the final model fully (reliability, confusion), write
    ``final_eval.json`` and the plots (rank 0), print the summary table; returns the final
    metrics (or {} without an eval set). With EMA weights both are evaluated: the raw weights
    (the top-level metrics) and the average (``"ema"``: what ``bitfast eval`` and ``export``
    use). The table says when the run stopped early (``--stop-at-step``) and how to continue
    it, and when a resumed run had already finished."""
    import copy
    import json

    stream = stream or sys.stdout
    final, final_ema = {}, {}
    averaged = ema_state(result["optimizer"], result["model"]) if result.get("optimizer") is not None else None
    if data.eval is not None:
        batch = cfg.eval_batch_size or max(cfg.batch_size // max(info.world_size, 1), 1)
        final = evaluate(result["model"], data.eval, data.num_classes, batch_size=batch, info=info,
                         precision=cfg.precision, channels_last=cfg.channels_last)
        if averaged is not None:
            ema_model = copy.deepcopy(result["model"])
            ema_model.load_state_dict(averaged)
            final_ema = evaluate(ema_model, data.eval, data.num_classes, batch_size=batch, info=info,
                                 precision=cfg.precision, channels_last=cfg.channels_last)
            final["ema"] = {k: final_ema[k] for k in ("top1", "top5", "loss", "ece", "n")}
    if not info.is_main:
        return final
    written = []
    if final:
        with open(os.path.join(cfg.output, "final_eval.json"), "w") as f:
            json.dump({**final, "classes": data.class_names, "step": result["step"]}, f)
    if cfg.plots:
        if plots.available():
            written += plots.plot_curves(result["history"], cfg.output)
            if final:
                written.append(plots.plot_reliability(final["reliability"], os.path.join(cfg.output, "reliability.png"),
                                                      ece=final["ece"]))
                if data.num_classes <= 100:
                    written.append(plots.plot_confusion(final["confusion"], os.path.join(cfg.output, "confusion.png"),
                                                        data.class_names))
        else:
            print(plots.missing_note(), file=stream)
    train = [r for r in result["history"] if r.get("kind") == "train"]
    total = result.get("total_steps", result["step"])
    rows = [["data", data.description], ["steps", f"{result['step']} x {cfg.batch_size} images"]]
    if result["step"] == result.get("start_step") and result["step"] >= total:
        rows.append(["time", f"- (the checkpoint had finished all {total} steps; nothing was trained)"])
    else:
        rows.append(["time", f"{result['seconds']:.1f} s ({result['img_per_s']:.1f} img/s)"])
    if result.get("stopped_early"):
        rows.append(["stopped early", f"after step {result['step']} of {total} (--stop-at-step): continue with the same "
                                      f"command and --resume auto (or --resume {result.get('checkpoint') or 'last.pt'})"])
    if train:
        rows.append(["final training loss", f"{train[-1]['loss']:.4f}"])
    raw = " (raw weights)" if final_ema else ""
    if final:
        rows += [[f"test top-1{raw}", f"{100 * final['top1']:.2f}% of {final['n']}"],
                 [f"test top-5{raw}", f"{100 * final['top5']:.2f}%"],
                 [f"test loss{raw}", f"{final['loss']:.4f}"], [f"ECE (15 bins){raw}", f"{100 * final['ece']:.2f}%"]]
    if final_ema:
        rows += [["test top-1 (EMA weights)", f"{100 * final_ema['top1']:.2f}% (eval and export use these)"],
                 ["test loss (EMA weights)", f"{final_ema['loss']:.4f}"]]
    rows.append(["checkpoint", result.get("checkpoint") or "-"])
    rows.append(["metrics", os.path.join(cfg.output, "metrics.jsonl")])
    if written:
        rows.append(["plots", ", ".join(os.path.basename(p) for p in written if p)])
    print(title, file=stream)
    print(summary_table(rows, ["", "value"]), file=stream)
    return final


def checkpoint_eval_data(state: dict, *, data: str | None = None, val_data: str | None = None,
                         classes: Sequence[int] | None = None, crop: int | None = None) -> tuple[Data, int]:
    """The data to evaluate a training checkpoint on, and the resolution: ``val_data`` (an
    ImageFolder evaluated as it is) when given, else the test split of ``data`` (default: the
    checkpoint's own training data, which it stores as a resolved path; ``classes`` picks
    digits). ``crop`` defaults to the checkpoint's resolution. Refuses data whose class names
    differ from the checkpoint's (a model scored against another task's labels), naming both."""
    from bitfast.data import ImageFolder, transforms

    saved = state.get("config") or {}
    crop = crop or int(state.get("resolution") or saved.get("crop") or 128)
    check_resolution(crop)
    if val_data is not None:
        if not os.path.isdir(val_data):
            raise FileNotFoundError(f"--val-data {val_data!r} is not a directory (an ImageFolder)")
        eval_set = ImageFolder(val_data, transform=transforms.eval_transform(crop))
        names, desc = list(eval_set.classes), f"ImageFolder {val_data} ({len(eval_set)} images, {len(eval_set.classes)} classes)"
    else:
        source = data or saved.get("data") or "digits"
        if not _is_digits(source) and not os.path.isdir(source):
            raise FileNotFoundError(
                f"the data {source!r} is not a directory here" + ("" if data else " (the checkpoint's training data, "
                                                                     "stored as given at training time)")
                + ": pass --data or --val-data")
        digits = classes if classes is not None else (saved.get("classes") if _is_digits(source) else None)
        cfg = TrainConfig(data=source, classes=digits, flip=False)
        d = build_data(cfg, crop, crop, min_classes=1)
        if d.eval is None:
            raise ValueError(f"--data {source!r} has no evaluation images: pass --val-data or a folder with val/")
        eval_set, names, desc = d.eval, d.class_names, d.description
    if len(names) != int(state.get("num_classes", len(names))):
        raise ValueError(f"the checkpoint has {state.get('num_classes')} classes, the evaluation data {len(names)}; "
                         "pass the data (and --classes) it was trained on")
    expected = state.get("classes")
    if expected is not None and list(expected) != list(names):
        raise ValueError(f"the checkpoint was trained on classes {list(expected)}, the evaluation data has {names}: "
                         "its scores would be against other labels; pass the data (and --classes) it was trained on")
    return Data(None, eval_set, names, desc), crop


def model_from_checkpoint(path: str, *, use_ema: bool = True, device: torch.device | str = "cpu",
                          trusted: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild the model a bitfast training checkpoint was written for and load its weights
    (the EMA weights when present and ``use_ema``); returns ``(model in eval mode, checkpoint)``.
    A checkpoint of the earlier format is read only with ``trusted=True`` (see
    ``bitfast.train.checkpoint.load_checkpoint``)."""
    state = load_checkpoint(path, trusted=trusted)
    config = dict(state.get("config") or {})
    num_classes = int(state.get("num_classes", 0))
    cfg = TrainConfig(model=config.get("model", TINY_MODEL), norm=config.get("norm", "gn"))
    model, _ = build_model(cfg, num_classes, zero_head=True)
    weights = state["ema"] if use_ema and state.get("ema") else state["model"]
    weights = merge_lora_weights(weights, config)  # a LoRA fine-tuning run: its merged weights
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit model {cfg.model!r} ({exc})") from exc
    state["used_ema"] = bool(use_ema and state.get("ema"))
    return model.to(device).eval(), state
