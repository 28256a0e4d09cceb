"""bitfast: fast Big Transfer (BiT) training and fine-tuning for PyTorch.

Fused kernels for weight standardization, norm + ReLU pre-activation and the SGD-momentum
step, registered as torch ops with autograd, assembled into the BiT ResNet-v2 family
(state dicts identical to timm's ``resnetv2_*_bit``) with loaders for the released
checkpoints.
"""

__version__ = "0.1.0"

# bitfast.ops first: it defines the op schemas and loads the native builds.
from bitfast import ops  # noqa: E402, I001
from bitfast import nn, optim  # noqa: E402
from bitfast.backends import BackendError, available_backends, use_backend  # noqa: E402
from bitfast.checkpoint import load_pretrained  # noqa: E402
from bitfast.models import ResNetV2, create_model, list_models  # noqa: E402
from bitfast.patching import patch  # noqa: E402
# Adaptation and deployment (LoRA, inference export, pruning, int8): cheap to import.
from bitfast import adapt, compress, export  # noqa: E402

__all__ = [
    "BackendError",
    "ResNetV2",
    "__version__",
    "adapt",
    "available_backends",
    "compress",
    "create_model",
    "export",
    "list_models",
    "load_pretrained",
    "nn",
    "ops",
    "optim",
    "patch",
    "use_backend",
]
