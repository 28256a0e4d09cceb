"""Named BiT architectures and ``create_model``.

Canonical names are timm's: ``resnetv2_{50x1,50x3,101x1,101x3,152x2,152x4}_bit``. Aliases:
``bit_r50x1`` ... (the architecture), ``bit_s_r50x1`` / ``bit_m_r50x1`` ... (the
architecture, with ``pretrained=True`` meaning the BiT-S / BiT-M release).

timm's pretrained names are accepted too: ``<architecture>.<tag>`` (``resnetv2_50x1_bit.goog_in21k``,
``.goog_in21k_ft_in1k``, ``.goog_distilled_in1k``, ``.goog_teacher_in21k_ft_in1k``, ...; see
``list_models(include_pretrained=True)``): the architecture, with the tag's class count as the
default ``num_classes``, its configuration as ``model.pretrained_cfg`` and, with
``pretrained=True``, its weights from the Hugging Face Hub.

One more name, ``bit_tiny``, is not a BiT architecture and has no released weights: a
2M-parameter BiT-style ResNet-v2 for CPUs (units 1-1-1-1, stem width 32, the same
weight-standardized convs and GroupNorm), for quick experiments and the tests.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from bitfast.models.resnetv2 import ResNetV2

__all__ = [
    "MODELS",
    "MODEL_SPECS",
    "ModelSpec",
    "create_model",
    "default_release",
    "list_models",
    "resolve_name",
    "split_pretrained_name",
]

_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

# The BiT architectures (those with released weights): canonical name -> (depth, width factor).
# Every registered model, bit_tiny included, is in MODEL_SPECS below.
MODELS: dict[str, tuple[int, int]] = {
    f"resnetv2_{d}x{w}_bit": (d, w) for d, w in ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4))
}

TINY_MODEL = "bit_tiny"


class ModelSpec(NamedTuple):
    """What a model name builds: ``ResNetV2(units, width_factor, base_width=base_width)``.

    ``release_arch`` is the architecture of its released checkpoints (``"R50x1"``), or None
    for a model without released weights; ``description`` says what the model is.
    """

    units: tuple[int, int, int, int]
    width_factor: int
    base_width: int
    release_arch: str | None
    description: str


# Every registered model, in the order of ``list_models()``: canonical name -> ModelSpec.
MODEL_SPECS: dict[str, ModelSpec] = {
    name: ModelSpec(_DEPTHS[d], w, 64, f"R{d}x{w}", f"BiT ResNet-v2 R{d}x{w} (Kolesnikov et al., 2020)")
    for name, (d, w) in MODELS.items()
}
MODEL_SPECS[TINY_MODEL] = ModelSpec(
    (1, 1, 1, 1),
    1,
    32,
    None,
    "a 2M-parameter BiT-style ResNet-v2 for CPUs (units 1-1-1-1, stem width 32), not a released BiT architecture",
)

# alias -> (canonical name, release that pretrained=True means)
_ALIASES: dict[str, tuple[str, str]] = {}
for _name, (_d, _w) in MODELS.items():
    _arch = f"R{_d}x{_w}"
    _ALIASES[f"bit_r{_d}x{_w}"] = (_name, f"BiT-M-{_arch}-ILSVRC2012")
    _ALIASES[f"bit_m_r{_d}x{_w}"] = (_name, f"BiT-M-{_arch}")
    if (_d, _w) != (152, 2):  # BiT-S R152x2 was not released
        _ALIASES[f"bit_s_r{_d}x{_w}"] = (_name, f"BiT-S-{_arch}")


def list_models(include_aliases: bool = False, include_pretrained: bool = False) -> list[str]:
    """The canonical model names: the six BiT architectures, then ``bit_tiny`` (a 2M-parameter
    BiT-style net for CPUs, without released weights); with ``include_aliases``, the aliases
    too; with ``include_pretrained``, timm's pretrained names (``resnetv2_50x1_bit.goog_in21k``
    ...) too."""
    from bitfast.checkpoint.tags import list_pretrained

    names = list(MODEL_SPECS)
    if include_aliases:
        names += sorted(_ALIASES)
    if include_pretrained:
        names += list_pretrained()
    return names


def split_pretrained_name(name: str):
    """``(architecture, PretrainedCfg)`` for a pretrained name (``"resnetv2_50x1_bit.goog_in21k"``),
    ``(name, None)`` for a name without a tag; ValueError for an unknown tag."""
    from bitfast.checkpoint.tags import list_pretrained, pretrained_cfg, split_tag

    arch, tag = split_tag(name.strip().lower())
    if tag is None:
        return name, None
    cfg = pretrained_cfg(name)
    if cfg is None:
        known = list_pretrained(arch) if arch in MODEL_SPECS else list_pretrained()
        raise ValueError(f"create_model: unknown pretrained name {name!r}; expected one of {known}")
    return cfg.architecture, cfg


def resolve_name(name: str) -> str:
    """The canonical name of ``name`` (a canonical name, an alias or a pretrained name such as
    ``resnetv2_50x1_bit.goog_in21k``); ValueError if unknown."""
    if not isinstance(name, str):
        raise TypeError(f"create_model: name must be a str, one of {list_models()}; got {type(name).__name__}")
    key = split_pretrained_name(name)[0].strip().lower()
    if key in MODEL_SPECS:
        return key
    if key in _ALIASES:
        return _ALIASES[key][0]
    raise ValueError(
        f"create_model: unknown model {name!r}; expected one of {list_models()} "
        f"(or an alias: {sorted(_ALIASES)}, or a pretrained name: see list_models(include_pretrained=True))"
    )


def default_release(name: str) -> str:
    """The released checkpoint ``pretrained=True`` loads for model ``name``: BiT-S / BiT-M for
    the ``bit_s_``/``bit_m_`` aliases, else the 21k -> 1k fine-tuned ``BiT-M-*-ILSVRC2012``
    (the default of timm's ``resnetv2_*_bit`` names). ValueError for a model without released
    weights (``bit_tiny``)."""
    canonical = resolve_name(name)
    key = name.strip().lower()
    if split_pretrained_name(name)[1] is not None:
        raise ValueError(f"default_release: {name!r} is a pretrained name; its weights are on the Hugging Face Hub")
    if key in _ALIASES:
        return _ALIASES[key][1]
    arch = MODEL_SPECS[canonical].release_arch
    if arch is None:
        raise ValueError(_no_release_message("default_release", canonical))
    return f"BiT-M-{arch}-ILSVRC2012"


def _no_release_message(fn: str, canonical: str) -> str:
    return (
        f"{fn}: there are no released weights for {canonical} ({MODEL_SPECS[canonical].description}); "
        f"pass pretrained=<path or URL of a weights file or a training checkpoint> instead"
    )


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    norm: str = "gn",
    ws_eps: float = 1e-8,
    backend: str | None = None,
    pretrained: bool | str | os.PathLike | None = None,
    zero_head: bool = False,
    strict: bool = True,
    **kwargs,
) -> ResNetV2:
    """Build the BiT model ``name`` (see ``list_models()``).

    Args:
        name: ``resnetv2_{50x1,50x3,101x1,101x3,152x2,152x4}_bit`` or an alias
            (``bit_r50x1``, ``bit_s_r50x1``, ``bit_m_r50x1`` ...), a pretrained name
            ``<architecture>.<tag>`` (``resnetv2_50x1_bit.goog_in21k``; see
            ``list_models(include_pretrained=True)``), or ``bit_tiny``: not a BiT
            architecture but a 2M-parameter BiT-style net for CPUs, the same module as
            ``ResNetV2((1, 1, 1, 1), base_width=32, ...)``, without released weights.
        num_classes: classes of the head (0: no head, the model returns pooled features).
            Default: the class count of the pretrained name or of the Hub weights named by
            ``pretrained`` (21843 for ``goog_in21k``), else 1000.
        norm: ``"gn"`` (GroupNorm, the BiT models) or ``"bn"`` (BatchNorm variant).
        ws_eps: weight-standardization eps (1e-8; the authors' release used 1e-10).
        backend: backend fixed for every layer (``reference``, ``cpp``, ``cuda``,
            ``triton``, ``auto``); default: auto on every call.
        pretrained: a released checkpoint name (``"BiT-M-R50x1"``, downloaded into the
            torch hub cache), a Hugging Face Hub name (``"hf-hub:ORG/NAME"``,
            ``"timm/NAME"`` or a pretrained name; downloaded into the Hugging Face cache,
            needs ``huggingface_hub``), a local path or ``file://`` / ``http(s)://`` URL of a
            checkpoint (``.npz``, timm or authors' state dict), or ``True``: for a pretrained
            name its weights from the Hub, else the model's default release (see
            ``default_release``; ValueError for ``bit_tiny``, which has none). The head is
            loaded only when its class count equals ``num_classes``;
            ``model.pretrained_report`` tells.
        zero_head: zero-initialise the classifier (BiT fine-tuning).
        strict: passed to ``load_pretrained``: fail on missing/unexpected keys.
        **kwargs: further ``ResNetV2`` arguments (``in_chans``, ``drop_rate``,
            ``conv_layer``, ``norm_layer``, ``device`` ...).

    The model's ``pretrained_cfg`` is the weights' configuration (a frozen
    ``bitfast.checkpoint.PretrainedCfg``: input size, crop fraction, interpolation,
    mean/std, class count, label names where published) when the name is a pretrained name
    or the weights come from the Hub or an official release with a published equivalent;
    else None. It describes the weights, whatever ``num_classes`` the model was given.
    """
    fn = "create_model"
    canonical = resolve_name(name)
    _, name_cfg = split_pretrained_name(name)
    # num_classes, norm, ws_eps and backend are ResNetV2's to check (it is built before any
    # download below, but for a Hub repository's config.json when it alone knows the class count).
    if "layers" in kwargs or "width_factor" in kwargs:
        raise TypeError(f"{fn}: layers/width_factor are fixed by the model name {name!r}; build ResNetV2 directly")

    spec = MODEL_SPECS[canonical]
    source = None
    if pretrained is True:
        if name_cfg is not None:
            source = f"hf-hub:{name_cfg.hf_hub_id}"
        elif spec.release_arch is None:
            raise ValueError(_no_release_message(fn, canonical))
        else:
            source = default_release(name)
    elif pretrained is not None and pretrained is not False:
        if not isinstance(pretrained, (str, os.PathLike)):
            raise TypeError(
                f"{fn}: pretrained must be None, a bool, a release name, a Hub name or a path; "
                f"got {type(pretrained).__name__}"
            )
        source = pretrained
    cfg = name_cfg
    if source is not None:
        from bitfast.checkpoint import check_release_arch, hf, loader

        ref = hf.parse_hub_name(source)
        source_cfg = loader.source_cfg(source)
        if ref is not None:
            _check_hub_arch(source_cfg, spec, canonical, ref)  # before any download
            if source_cfg is None and num_classes is None:
                source_cfg = hf.hub_config(ref)  # its config.json alone knows the class count
                _check_hub_arch(source_cfg, spec, canonical, ref)
            if source_cfg is not None:
                cfg = source_cfg
                if num_classes is None:
                    num_classes = source_cfg.num_classes
        elif spec.release_arch is not None:
            check_release_arch(source, spec.release_arch, fn)  # before any download
            cfg = source_cfg or cfg
        else:
            try:
                check_release_arch(source, canonical, fn)  # refuses any release name or URL
            except ValueError as exc:
                raise ValueError(f"{_no_release_message(fn, canonical)} ({exc})") from None
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "meta":
            raise ValueError(f"{fn}: pretrained weights cannot be loaded into a model on the meta device")
    if num_classes is None:
        num_classes = name_cfg.num_classes if name_cfg is not None else 1000

    model = ResNetV2(
        spec.units,
        spec.width_factor,
        base_width=kwargs.pop("base_width", spec.base_width),
        num_classes=num_classes,
        norm=norm,
        ws_eps=ws_eps,
        backend=backend,
        zero_head=zero_head,
        **kwargs,
    )
    model.model_name = canonical
    model.pretrained_cfg = cfg
    model.pretrained_report = None
    if source is not None:
        from bitfast.checkpoint import load_pretrained

        model.pretrained_report = load_pretrained(model, source, strict=strict)
        if model.pretrained_report.pretrained_cfg is not None:
            model.pretrained_cfg = model.pretrained_report.pretrained_cfg
    return model


def _check_hub_arch(cfg, spec: ModelSpec, canonical: str, ref) -> None:
    """ValueError when Hub weights are known to be for another architecture than the model's."""
    if cfg is None or cfg.architecture is None:
        return
    if spec.release_arch is not None:
        from bitfast.checkpoint import loader

        loader.check_cfg_arch(cfg, spec.release_arch, ref, "create_model")
    elif cfg.architecture != canonical:
        raise ValueError(
            f"create_model: {ref} holds weights for {cfg.architecture} but the model is {canonical} "
            f"({MODEL_SPECS[canonical].description})"
        )
