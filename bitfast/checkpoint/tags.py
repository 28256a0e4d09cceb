"""The pretrained weights published under timm's names, and their configurations.

timm publishes the BiT weights on the Hugging Face Hub under ``<architecture>.<tag>`` names,
each in the Hub repository ``timm/<architecture>.<tag>``:

* ``goog_in21k``: the BiT-M upstream weights (ImageNet-21k, 21843 classes): the same weights
  as the ``BiT-M-R*`` releases;
* ``goog_in21k_ft_in1k``: BiT-M fine-tuned on ImageNet-1k (1000 classes, evaluated at 448
  pixels, 480 for R152x4): the ``BiT-M-R*-ILSVRC2012`` releases;
* ``goog_distilled_in1k`` (R50x1) and ``goog_teacher_in21k_ft_in1k`` /
  ``goog_teacher_in21k_ft_in1k_384`` (R152x2): the student and the teachers of "Knowledge
  distillation: A good teacher is patient and consistent" (Beyer et al., 2022).

Each name has a :class:`PretrainedCfg`: how the weights expect their input (size, crop
fraction, interpolation, mean and std) and their class count. ``create_model`` attaches it to
the model as ``model.pretrained_cfg``; the evaluation and fine-tuning transforms follow it
unless told otherwise. The values are timm 1.0's for these names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

__all__ = [
    "PRETRAINED_TAGS",
    "PretrainedCfg",
    "arch_of",
    "cfg_from_hub_config",
    "list_pretrained",
    "pretrained_cfg",
    "release_cfg",
    "split_tag",
]

BIT_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
BIT_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "nearest")


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
    """How a set of pretrained weights expects its input, and what it predicts.

    Attributes:
        name: the weights' name: ``"resnetv2_50x1_bit.goog_in21k"``, or the Hub repository
            (``"me/my-bit"``) for weights that are not one of timm's names.
        architecture: the bitfast model name the weights fit (``"resnetv2_50x1_bit"``), or
            None when the Hub configuration does not say.
        num_classes: the class count of the weights' classifier (0: none).
        input_size: ``(channels, height, width)`` of the evaluation input.
        crop_pct: the evaluation crop's fraction of the resized image (1.0: no crop; 0.875:
            resize the shorter side to ``height / 0.875``, then take the centre).
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
        mean, std: per-channel normalisation, ``(x - mean) / std`` of [0, 1] pixels
            (BiT's ``(0.5, 0.5, 0.5)`` both: ``x * 2 - 1``).
        hf_hub_id: the Hub repository holding the weights (``"timm/resnetv2_50x1_bit.goog_in21k"``).
        release: the official ``.npz`` release with the same weights (``"BiT-M-R50x1"``), if any.
        label_names: the classes' names, when the Hub configuration publishes them.
        license: the weights' license.
    """

    name: str
    architecture: str | None
    num_classes: int
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = BIT_MEAN
    std: tuple[float, ...] = BIT_STD
    hf_hub_id: str | None = None
    release: str | None = None
    label_names: tuple[str, ...] | None = None
    license: str | None = "apache-2.0"

    @property
    def tag(self) -> str | None:
        """The part after the architecture: ``"goog_in21k"``; None for a name without one."""
        return split_tag(self.name)[1]

    @property
    def image_size(self) -> int:
        """The evaluation input's side (``input_size[-1]``)."""
        return self.input_size[-1]

    def replace(self, **changes) -> PretrainedCfg:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as a plain dict (tuples kept)."""
        return dataclasses.asdict(self)


_ARCHS: dict[str, str] = {
    f"resnetv2_{d}x{w}_bit": f"R{d}x{w}" for d, w in ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4))
}


def _tag(arch: str, tag: str, num_classes: int = 1000, release: str | None = None, **kw) -> PretrainedCfg:
    name = f"{arch}.{tag}"
    return PretrainedCfg(name=name, architecture=arch, num_classes=num_classes, hf_hub_id=f"timm/{name}",
                         release=release, **kw)


def _build_table() -> dict[str, PretrainedCfg]:
    table: dict[str, PretrainedCfg] = {}

    def add(cfg: PretrainedCfg) -> None:
        table[cfg.name] = cfg

    add(_tag("resnetv2_50x1_bit", "goog_distilled_in1k", interpolation="bicubic"))
    add(_tag("resnetv2_152x2_bit", "goog_teacher_in21k_ft_in1k", interpolation="bicubic"))
    add(_tag("resnetv2_152x2_bit", "goog_teacher_in21k_ft_in1k_384", input_size=(3, 384, 384), crop_pct=1.0,
             interpolation="bicubic"))
    for arch, short in _ARCHS.items():
        side = 480 if short == "R152x4" else 448
        add(_tag(arch, "goog_in21k_ft_in1k", release=f"BiT-M-{short}-ILSVRC2012", input_size=(3, side, side),
                 crop_pct=1.0))
    for arch, short in _ARCHS.items():
        add(_tag(arch, "goog_in21k", num_classes=21843, release=f"BiT-M-{short}"))
    return table


# Every published name -> its configuration, in timm's order.
PRETRAINED_TAGS: dict[str, PretrainedCfg] = _build_table()
_BY_LOWER = {k.lower(): k for k in PRETRAINED_TAGS}
_BY_RELEASE = {cfg.release.lower(): cfg for cfg in PRETRAINED_TAGS.values() if cfg.release}


def split_tag(name: str) -> tuple[str, str | None]:
    """``"resnetv2_50x1_bit.goog_in21k"`` -> ``("resnetv2_50x1_bit", "goog_in21k")``; a name
    without a dot -> ``(name, None)``."""
    arch, dot, tag = name.partition(".")
    return arch, (tag if dot else None)


def arch_of(architecture: str | None) -> str | None:
    """The release-style architecture (``"R50x1"``) of a bitfast/timm BiT model name, else None."""
    return _ARCHS.get(architecture.strip().lower()) if isinstance(architecture, str) else None


def list_pretrained(architecture: str | None = None) -> list[str]:
    """The published ``<architecture>.<tag>`` names (of one architecture, if given)."""
    return [k for k, cfg in PRETRAINED_TAGS.items() if architecture is None or cfg.architecture == architecture]


def pretrained_cfg(name: str) -> PretrainedCfg | None:
    """The configuration of a published name (case-insensitive), or None when ``name`` is
    not one. See ``list_pretrained``."""
    key = _BY_LOWER.get(name.strip().lower()) if isinstance(name, str) else None
    return PRETRAINED_TAGS[key] if key is not None else None


def release_cfg(release: str) -> PretrainedCfg | None:
    """The configuration of the published name holding the same weights as an official
    release (``"BiT-M-R50x1"`` -> ``resnetv2_50x1_bit.goog_in21k``'s), or None (BiT-S)."""
    return _BY_RELEASE.get(release.removesuffix(".npz").lower()) if isinstance(release, str) else None


def _ints(value, n: int) -> tuple[int, ...] | None:
    if isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def _floats(value) -> tuple[float, ...] | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return tuple(float(v) for v in value)
    return None


def _labels(value) -> tuple[str, ...] | None:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if isinstance(value, Mapping):  # {index: name}, possibly with string keys
        try:
            items = sorted((int(k), v) for k, v in value.items())
        except (TypeError, ValueError):
            return None
        if [i for i, _ in items] == list(range(len(items))) and all(isinstance(v, str) for _, v in items):
            return tuple(v for _, v in items)
    return None


def cfg_from_hub_config(config: Mapping, repo_id: str) -> PretrainedCfg:
    """The ``PretrainedCfg`` of a Hub repository from its ``config.json`` (timm's format:
    ``architecture``, ``num_classes``, ``label_names`` and a ``pretrained_cfg`` section, or
    the older single-level form). Fields the file leaves out come from the published name
    (``timm/<name>``) when the repository is one, else from BiT's defaults. Values of the
    wrong type are ignored, never trusted."""
    if not isinstance(config, Mapping):
        raise ValueError(f"bitfast.checkpoint: the config.json of {repo_id} is not a JSON object")
    section = config.get("pretrained_cfg")
    inner = section if isinstance(section, Mapping) else config
    org, _, repo_name = repo_id.partition("/")
    known = pretrained_cfg(repo_name) if org == "timm" else None
    architecture = config.get("architecture")
    architecture = architecture.strip().lower() if isinstance(architecture, str) else None
    if known is None:
        tag = inner.get("tag")
        base = PretrainedCfg(name=repo_id, architecture=architecture, num_classes=1000, hf_hub_id=repo_id)
        if architecture and isinstance(tag, str) and pretrained_cfg(f"{architecture}.{tag}") is not None:
            base = pretrained_cfg(f"{architecture}.{tag}").replace(name=repo_id, hf_hub_id=repo_id, release=None)
    else:
        base = known
    changes: dict = {}
    if architecture and base.architecture is None:
        changes["architecture"] = architecture
    num_classes = config.get("num_classes", inner.get("num_classes"))
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 0:
        changes["num_classes"] = num_classes
    size = _ints(inner.get("input_size"), 3)
    if size is not None and all(s > 0 for s in size):
        changes["input_size"] = size
    crop = inner.get("crop_pct")
    if isinstance(crop, (int, float)) and not isinstance(crop, bool) and 0 < crop <= 1:
        changes["crop_pct"] = float(crop)
    interp = inner.get("interpolation")
    if isinstance(interp, str) and interp.lower() in INTERPOLATIONS:
        changes["interpolation"] = interp.lower()
    for key in ("mean", "std"):
        values = _floats(inner.get(key))
        if values is not None:
            changes[key] = values
    labels = _labels(config.get("label_names", inner.get("label_names", inner.get("labels"))))
    if labels is not None:
        changes["label_names"] = labels
    lic = inner.get("license")
    if isinstance(lic, str):
        changes["license"] = lic
    return base.replace(**changes)

