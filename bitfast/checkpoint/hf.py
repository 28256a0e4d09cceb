"""Weights on the Hugging Face Hub: ``hf-hub:ORG/NAME[@REVISION]``, ``timm/NAME`` and timm's
published names (``resnetv2_50x1_bit.goog_in21k`` is ``timm/resnetv2_50x1_bit.goog_in21k``).

Downloads go through ``huggingface_hub`` (an optional dependency: ``pip install
huggingface_hub``), so its cache (``$HF_HOME``, ``$HF_HUB_CACHE``), offline mode
(``HF_HUB_OFFLINE=1``: only what the cache holds), tokens (``hf auth login``, ``$HF_TOKEN``)
and mirrors (``$HF_ENDPOINT``) all apply. A repository's weights are its
``model.safetensors``, else its ``pytorch_model.bin`` (read with
``torch.load(weights_only=True)``, like every other torch file bitfast reads); its
``config.json``, when present, gives the weights' ``PretrainedCfg``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re

from bitfast.checkpoint.tags import PretrainedCfg, cfg_from_hub_config, pretrained_cfg

__all__ = ["HUB_PREFIX", "WEIGHT_FILES", "HubRef", "hub_config", "hub_weights", "import_hub", "parse_hub_name"]

HUB_PREFIX = "hf-hub:"
# In order of preference.
WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


@dataclasses.dataclass(frozen=True)
class HubRef:
    """A Hub repository (``"timm/resnetv2_50x1_bit.goog_in21k"``) at a revision (None: the
    default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return HUB_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


def _parse_repo(text: str, source: str) -> HubRef:
    repo, at, revision = text.partition("@")
    if not _REPO_ID.fullmatch(repo) or ".." in repo or (at and not revision):
        raise ValueError(
            f"bitfast.checkpoint: {source!r} is not a Hub name; expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION "
            "(e.g. hf-hub:timm/resnetv2_50x1_bit.goog_in21k)"
        )
    return HubRef(repo, revision or None)


def parse_hub_name(source) -> HubRef | None:
    """The Hub repository ``source`` names, or None when it names none.

    Hub names: ``hf-hub:ORG/NAME[@REVISION]``; ``timm/NAME[@REVISION]`` unless a local file
    or folder of that path exists; a published name such as ``resnetv2_50x1_bit.goog_in21k``
    (``timm/<name>``). ValueError for a malformed ``hf-hub:`` name.
    """
    if not isinstance(source, str):
        return None
    if source.startswith(HUB_PREFIX):
        return _parse_repo(source[len(HUB_PREFIX):], source)
    if source.startswith("timm/") and not os.path.exists(source):
        return _parse_repo(source, source)
    cfg = pretrained_cfg(source)
    if cfg is not None and not os.path.exists(source):
        return HubRef(cfg.hf_hub_id)
    return None


def import_hub():
    """The ``huggingface_hub`` module; ImportError saying how to install it when it is missing."""
    try:
        return importlib.import_module("huggingface_hub")
    except ImportError as err:
        raise ImportError(
            "bitfast.checkpoint: weights from the Hugging Face Hub (hf-hub:ORG/NAME, timm/NAME, "
            "resnetv2_*_bit.<tag>) need the huggingface_hub package: pip install huggingface_hub "
            "(or pip install 'bitfast[hub]'); or pass a local weights file"
        ) from err


def _error_classes(hub) -> dict[str, tuple[type, ...]]:
    try:
        errors = importlib.import_module("huggingface_hub.errors")
    except ImportError:  # older releases keep them in huggingface_hub.utils
        errors = getattr(hub, "utils", None)

    def get(*names):
        return tuple(c for c in (getattr(errors, n, None) for n in names) if isinstance(c, type))

    return {
        "repo": get("RepositoryNotFoundError"),
        "revision": get("RevisionNotFoundError"),
        "entry": get("EntryNotFoundError", "LocalEntryNotFoundError", "OfflineModeIsEnabled"),
    }


def _offline() -> bool:
    try:
        constants = importlib.import_module("huggingface_hub.constants")
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _fetch(hub, ref: HubRef, filename: str) -> tuple[str | None, BaseException | None]:
    """``(local path, None)``, or ``(None, why)`` when the repository has no such file (or,
    offline or unreachable, the cache has none)."""
    classes = _error_classes(hub)
    try:
        return hub.hf_hub_download(ref.repo_id, filename, revision=ref.revision), None
    except classes["revision"] as err:
        raise FileNotFoundError(
            f"bitfast.checkpoint: the Hub repository {ref.repo_id} has no revision {ref.revision!r}"
        ) from err
    except classes["repo"] as err:
        raise FileNotFoundError(
            f"bitfast.checkpoint: no Hub repository {ref.repo_id} (or it is private or gated: log in with "
            "`hf auth login` or set $HF_TOKEN)"
        ) from err
    except classes["entry"] as err:
        return None, err


def _not_found(ref: HubRef, what: str, err: BaseException | None) -> FileNotFoundError:
    if _offline():
        where = "the Hugging Face cache holds none (HF_HUB_OFFLINE is set: download it once online, or unset it)"
    else:
        where = "the repository has none and the Hugging Face cache holds none"
    cause = f" ({type(err).__name__}: {err})" if err is not None else ""
    return FileNotFoundError(f"bitfast.checkpoint: {ref}: {what}: {where}{cause}")


def hub_config(ref: HubRef) -> PretrainedCfg | None:
    """The ``PretrainedCfg`` of ``ref``'s weights: its ``config.json`` over the published
    name's configuration (for ``timm/<name>``), or the latter alone when the repository has no
    ``config.json``; None when neither exists."""
    hub = import_hub()
    org, _, name = ref.repo_id.partition("/")
    known = pretrained_cfg(name) if org == "timm" else None
    path, _ = _fetch(hub, ref, CONFIG_FILE)
    if path is None:
        return known
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"bitfast.checkpoint: the config.json of {ref} is not readable JSON: {err}") from err
    return cfg_from_hub_config(config, ref.repo_id)


def hub_weights(ref: HubRef) -> str:
    """The local path of ``ref``'s weights file (downloaded into the Hugging Face cache when
    needed): ``model.safetensors``, else ``pytorch_model.bin``.

    Raises:
        ImportError: without huggingface_hub.
        FileNotFoundError: no such repository or revision, or neither file (offline: not in
            the cache).
    """
    hub = import_hub()
    last = None
    for filename in WEIGHT_FILES:
        path, last = _fetch(hub, ref, filename)
        if path is not None:
            return path
    raise _not_found(ref, f"no weights file ({' or '.join(WEIGHT_FILES)})", last)
