"""bitfast: fast Big Transfer (BiT) training and fine-tuning for PyTorch.

Fused kernels for weight standardization, norm + ReLU pre-activation and the SGD-momentum
step, registered as torch ops with autograd, assembled into the BiT ResNet-v2 family
(state dicts identical to timm's ``resnetv2_*_bit``) with loaders for the released
checkpoints.
"""

__version__ = "0.1.0"

from bitfast import ops  # noqa: E402  (registers the ops and loads the native builds)
from bitfast.backends import BackendError, available_backends, use_backend  # noqa: E402

__all__ = [
    "BackendError",
    "__version__",
    "available_backends",
    "ops",
    "use_backend",
]
