"""Loading BiT checkpoints: the official ``.npz`` releases, timm-layout state dicts
(``.pth``, ``.bin``, ``.safetensors``) and the authors' PyTorch training checkpoints, with
download of the released weights into the torch hub cache."""

from bitfast.checkpoint.hub import (
    DEFAULT_BASE_URL,
    ENV_URL,
    RELEASES,
    cache_dir,
    check_release_arch,
    download,
    release_arch,
    resolve_source,
    weights_url,
)
from bitfast.checkpoint.io import read_checkpoint
from bitfast.checkpoint.layouts import detect_layout, infer_arch, to_timm_layout
from bitfast.checkpoint.loader import LoadReport, load_pretrained, load_state_dict_any

__all__ = [
    "DEFAULT_BASE_URL",
    "ENV_URL",
    "RELEASES",
    "LoadReport",
    "cache_dir",
    "check_release_arch",
    "detect_layout",
    "download",
    "infer_arch",
    "load_pretrained",
    "load_state_dict_any",
    "read_checkpoint",
    "release_arch",
    "resolve_source",
    "to_timm_layout",
    "weights_url",
]
