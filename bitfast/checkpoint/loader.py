"""``load_pretrained``: load any BiT checkpoint into a bitfast (or timm-named) model.

Everything is validated before the first tensor is copied, so a failed load leaves the
model exactly as it was.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
from torch import nn

from bitfast.checkpoint import hf, hub, io, layouts, tags

__all__ = ["HEAD_KEYS", "LoadReport", "check_cfg_arch", "load_pretrained", "load_state_dict_any", "source_cfg"]

HEAD_KEYS: tuple[str, ...] = ("head.fc.weight", "head.fc.bias")

_MAX_LISTED = 12


@dataclasses.dataclass
class LoadReport:
    """What ``load_pretrained`` did.

    Attributes:
        path: the checkpoint file read.
        format: key layout: ``"npz"`` (official release), ``"timm"`` (bitfast/timm state
            dict) or ``"authors"`` (the BiT authors' PyTorch model).
        container: ``"npz"``, ``"torch"`` or ``"safetensors"``.
        training_checkpoint: the weights came out of a training checkpoint
            (``{"step", "model", "optim"}`` or ``{"state_dict": ...}``).
        loaded: model keys that received checkpoint values.
        skipped_head: checkpoint head keys not loaded (class count differs from the model's,
            or the model has no classifier).
        missing: model keys the checkpoint does not provide (the head excepted: see
            ``head_loaded``).
        unexpected: checkpoint keys that name nothing in the model.
        head_loaded: whether the classifier was loaded.
        head_note: why the classifier was or was not loaded.
        checkpoint_arch: the checkpoint's architecture as far as it can be told (``"R50x1"``).
        pretrained_cfg: the weights' ``PretrainedCfg`` (input size, crop, interpolation,
            mean/std, class count, label names) when the source has one: a Hub repository
            or published name, or an official release with a published equivalent; else None.
    """

    path: str
    format: str
    container: str
    training_checkpoint: bool = False
    loaded: list[str] = dataclasses.field(default_factory=list)
    skipped_head: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    head_loaded: bool = False
    head_note: str = ""
    checkpoint_arch: str | None = None
    pretrained_cfg: tags.PretrainedCfg | None = None

    def __str__(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} tensors from {self.path} ({self.format} layout, {self.container} file"
            + (", training checkpoint" if self.training_checkpoint else "") + ")",
            f"head: {self.head_note}",
        ]
        for what in ("missing", "unexpected"):
            keys = getattr(self, what)
            if keys:
                lines.append(f"{what} ({len(keys)}): {_listing(keys)}")
        return "\n".join(lines)


def _listing(keys) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _unwrap_model(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_pretrained: model must be a torch.nn.Module; got {type(model).__name__}")
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _shape(v) -> tuple[int, ...]:
    return tuple(v.shape)


def _as_tensor(v) -> torch.Tensor:
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    return v


def _fit(value, target: torch.Tensor, layout: str):
    """``value`` reshaped to ``target``'s shape where the layouts merely differ in
    singleton dims (a (1, 1, 1, C) scale in an ``.npz``), else None."""
    shape = _shape(value)
    if shape == tuple(target.shape):
        return value
    if layout == "npz" and target.dim() == 1 and int(np.prod(shape)) == target.numel() and max(shape) == target.numel():
        return value.reshape(target.shape)
    return None


def load_state_dict_any(
    model: nn.Module,
    tensors: dict,
    layout: str,
    *,
    strict: bool = True,
    path: str = "<state dict>",
    container: str = "torch",
    training_checkpoint: bool = False,
) -> LoadReport:
    """Load ``tensors`` (named in ``layout``: ``"timm"``, ``"npz"`` or ``"authors"``) into
    ``model``; see ``load_pretrained``."""
    model = _unwrap_model(model)
    state, untranslated = layouts.to_timm_layout(tensors, layout)
    own = model.state_dict()
    report = LoadReport(
        path=path,
        format=layout,
        container=container,
        training_checkpoint=training_checkpoint,
        checkpoint_arch=layouts.infer_arch(state),
    )
    arch_note = f" (the checkpoint looks like {report.checkpoint_arch})" if report.checkpoint_arch else ""
    if any(t.is_meta for t in own.values()):
        raise ValueError(f"load_pretrained: the model has parameters on the meta device; cannot load {path} into it")

    # The head: loaded only when the class counts agree.
    ckpt_head = [k for k in HEAD_KEYS if k in state]
    model_k = own["head.fc.weight"].shape[0] if "head.fc.weight" in own else 0
    ckpt_k = _shape(state[ckpt_head[0]])[0] if ckpt_head else 0
    load_head = bool(ckpt_head) and model_k > 0 and ckpt_k == model_k
    if load_head:
        report.head_note = f"loaded ({ckpt_k} classes)"
    elif not ckpt_head:
        report.head_note = "the checkpoint has no classifier; the model's head keeps its initialisation"
    elif model_k == 0:
        report.skipped_head = ckpt_head
        report.head_note = f"the model has no classifier; the checkpoint's {ckpt_k}-class head was skipped"
    else:
        report.skipped_head = ckpt_head
        report.head_note = (
            f"the checkpoint's head has {ckpt_k} classes, the model {model_k}; "
            "the model's head keeps its initialisation"
        )

    to_copy: dict[str, object] = {}
    mismatched: list[str] = []
    for key, value in state.items():
        if key in HEAD_KEYS and not load_head:
            continue
        if key not in own:
            report.unexpected.append(key)
            continue
        fitted = _fit(value, own[key], layout)
        if fitted is None:
            mismatched.append(f"{key}: checkpoint {list(_shape(value))} vs model {list(own[key].shape)}")
            continue
        to_copy[key] = fitted
    report.unexpected.extend(untranslated)
    report.missing = [k for k in own if k not in to_copy and k not in HEAD_KEYS]
    report.head_loaded = load_head
    if load_head:
        report.missing += [k for k in HEAD_KEYS if k in own and k not in to_copy]

    if mismatched:
        raise ValueError(
            f"load_pretrained: {path} does not fit the model: {len(mismatched)} shape mismatches{arch_note}: "
            + _listing(mismatched)
        )
    if not to_copy:
        raise ValueError(
            f"load_pretrained: {path} shares no tensor with the model{arch_note}; "
            f"checkpoint keys: {_listing(list(tensors))}"
        )
    if strict and (report.missing or report.unexpected):
        parts = []
        if report.missing:
            parts.append(f"missing keys ({len(report.missing)}): {_listing(report.missing)}")
        if report.unexpected:
            parts.append(f"unexpected keys ({len(report.unexpected)}): {_listing(report.unexpected)}")
        raise ValueError(
            f"load_pretrained: {path} ({layout} layout) does not match the model{arch_note}: "
            + "; ".join(parts)
            + " (strict=False loads the rest and lists these in the report)"
        )

    with torch.no_grad():
        for key, value in to_copy.items():
            own[key].copy_(_as_tensor(value))
    report.loaded = list(to_copy)
    return report


def check_cfg_arch(cfg: tags.PretrainedCfg | None, arch, source, fn: str = "load_pretrained") -> None:
    """ValueError when ``cfg`` says its weights are for another BiT architecture than ``arch``
    (``"R50x1"``; a model of another shape, such as ``bit_tiny``, is left to the shape checks)."""
    if cfg is None or not isinstance(arch, str) or arch.startswith("R?"):
        return
    want = tags.arch_of(cfg.architecture)
    if want is not None and want != arch:
        raise ValueError(
            f"{fn}: {source} holds weights for {cfg.architecture} ({want}) but the model is {arch}; "
            f"published weights for {arch}: {[n for n, c in tags.PRETRAINED_TAGS.items() if tags.arch_of(c.architecture) == arch]}"
        )


def source_cfg(source) -> tags.PretrainedCfg | None:
    """The ``PretrainedCfg`` known for ``source`` without any download: a published name
    (``resnetv2_50x1_bit.goog_in21k``, ``timm/<name>``, ``hf-hub:timm/<name>``) or an
    official release with a published equivalent (``BiT-M-R50x1``); else None."""
    ref = hf.parse_hub_name(source)
    if ref is not None:
        org, _, name = ref.repo_id.partition("/")
        return tags.pretrained_cfg(name) if org == "timm" else None
    if isinstance(source, str) and not os.path.exists(source):
        release = hub.release_name(source)
        return tags.release_cfg(release) if release else None
    return None


def load_pretrained(model: nn.Module, path_or_name: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Load a BiT checkpoint into ``model`` and report what was loaded.

    Args:
        model: a bitfast ``ResNetV2`` (or any module with the same parameter names;
            ``torch.compile`` and DDP wrappers are looked through).
        path_or_name: a released name (``"BiT-M-R50x1"``, downloaded into the torch hub
            cache), a Hugging Face Hub name (``"hf-hub:ORG/NAME"``, ``"timm/NAME"``, or a
            published name such as ``"resnetv2_50x1_bit.goog_in21k"``: downloaded into the
            Hugging Face cache, needs ``huggingface_hub``), a local path, or a ``file://`` /
            ``http(s)://`` URL. Formats, detected from the content: the official ``.npz``
            (HWIO kernels, transposed), timm-layout state dicts (``.pth``/``.bin`` read with
            ``weights_only=True``, ``.safetensors``), the authors' training checkpoints
            (``bit.pth.tar``) and state dicts.
        strict: raise on body keys missing from the checkpoint or checkpoint keys unknown
            to the model; with ``strict=False`` these are listed in the report instead.

    The classifier is loaded only when the checkpoint's class count equals the model's;
    otherwise it keeps its initialisation and the report says so. Tensors are cast to the
    dtype and device of the model's parameters. The weights' configuration, when the source
    has one, is ``report.pretrained_cfg`` (the model is not changed beyond its weights).

    Returns:
        A ``LoadReport``.

    Raises:
        FileNotFoundError: no such file (or a 404 for a download; no such Hub repository,
            revision or weights file, or, offline, none in the Hugging Face cache).
        ValueError: an empty, truncated, corrupt or foreign file; a checkpoint of another
            architecture (the shape mismatches are named); with ``strict``, missing or
            unexpected keys; a malformed ``hf-hub:`` name. Nothing is copied into the model
            when it raises.
        ImportError: a ``.safetensors`` file without the safetensors package; a Hub name
            without the huggingface_hub package.
    """
    target = _unwrap_model(model)
    arch = getattr(target, "arch", None)
    ref = hf.parse_hub_name(path_or_name)
    cfg = source_cfg(path_or_name)
    if ref is not None:
        check_cfg_arch(cfg, arch, ref)  # before any download
        cfg = hf.hub_config(ref)
        check_cfg_arch(cfg, arch, ref)  # before the weights' download
        path = hf.hub_weights(ref)
    else:
        if isinstance(arch, str) and not arch.startswith("R?"):
            hub.check_release_arch(path_or_name, arch)
        path = hub.resolve_source(path_or_name)
    tensors, container, training = io.read_checkpoint(path)
    layout = layouts.detect_layout(tensors)
    if layout is None:
        raise ValueError(
            f"load_pretrained: {path} is not a BiT checkpoint: none of its keys is in the official .npz "
            f"(resnet/...), timm (stem.conv.weight, stages...) or authors' (root.conv.weight, body.block...) "
            f"layout; keys: {_listing(list(tensors))}"
        )
    report = load_state_dict_any(
        target, tensors, layout, strict=strict, path=path, container=container, training_checkpoint=training
    )
    report.pretrained_cfg = cfg
    return report
