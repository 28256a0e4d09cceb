"""The BiT ResNet-v2 models (timm-compatible state dicts) and ``create_model``."""

from bitfast.models.registry import MODEL_SPECS, MODELS, ModelSpec, create_model, default_release, list_models
from bitfast.models.resnetv2 import ClassifierHead, DownsampleConv, PreActBottleneck, ResNetStage, ResNetV2

__all__ = [
    "MODELS",
    "MODEL_SPECS",
    "ClassifierHead",
    "DownsampleConv",
    "ModelSpec",
    "PreActBottleneck",
    "ResNetStage",
    "ResNetV2",
    "create_model",
    "default_release",
    "list_models",
]
