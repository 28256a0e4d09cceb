"""bitfast's public functional ops.

Each op is registered through ``torch.library`` in the ``bitfast`` namespace (schemas in
``bitfast.ops._library``), has a fake implementation for tracing, autograd where it is
differentiable, and is computed by the backend ``bitfast.backends`` picks. The
pure-PyTorch specification of every op is ``bitfast.ops.reference``.
"""

from bitfast import _native
from bitfast.ops import _library  # noqa: F401  (defines the schemas first)

_native.load_all()

from bitfast.ops import reference  # noqa: E402
from bitfast.ops.batch_norm_relu import batch_norm_relu  # noqa: E402
from bitfast.ops.group_norm_relu import group_norm_relu, group_norm_relu_add  # noqa: E402
from bitfast.ops.sgd_momentum import sgd_momentum_  # noqa: E402
from bitfast.ops.weight_std import std_conv2d, weight_standardize  # noqa: E402

__all__ = [
    "batch_norm_relu",
    "group_norm_relu",
    "group_norm_relu_add",
    "reference",
    "sgd_momentum_",
    "std_conv2d",
    "weight_standardize",
]
