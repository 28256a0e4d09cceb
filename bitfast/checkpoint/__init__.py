"""Loading BiT checkpoints: the official ``.npz`` releases, timm-layout state dicts
(``.pth``, ``.bin``, ``.safetensors``) and the authors' PyTorch training checkpoints, with
download of the released weights into the torch hub cache, and of timm's published weights
(``resnetv2_50x1_bit.goog_in21k``, ``hf-hub:ORG/NAME``) from the Hugging Face Hub."""

from bitfast.checkpoint.hf import HubRef, parse_hub_name
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
from bitfast.checkpoint.loader import LoadReport, load_pretrained, load_state_dict_any, source_cfg
from bitfast.checkpoint.tags import PRETRAINED_TAGS, PretrainedCfg, list_pretrained, pretrained_cfg

__all__ = [
    "DEFAULT_BASE_URL",
    "ENV_URL",
    "PRETRAINED_TAGS",
    "RELEASES",
    "HubRef",
    "LoadReport",
    "PretrainedCfg",
    "cache_dir",
    "check_release_arch",
    "detect_layout",
    "download",
    "infer_arch",
    "list_pretrained",
    "load_pretrained",
    "load_state_dict_any",
    "parse_hub_name",
    "pretrained_cfg",
    "read_checkpoint",
    "release_arch",
    "resolve_source",
    "source_cfg",
    "to_timm_layout",
    "weights_url",
]
