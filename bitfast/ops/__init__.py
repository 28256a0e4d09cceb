"""bitfast's public functional ops.

Each op is defined once, in its own module, through ``bitfast.ops._register.define_op``:
its ``torch.library`` schemas in the ``bitfast`` namespace, a fake implementation for
tracing, autograd where it is differentiable (one formula for the registered op and the
eager fast path), and the backend family ``bitfast.backends`` resolves. The
pure-PyTorch specification of every op is ``bitfast.ops.reference``.
"""

from bitfast import _native
from bitfast.ops import reference
from bitfast.ops.batch_norm_relu import batch_norm_relu
from bitfast.ops.group_norm_relu import group_norm_relu, group_norm_relu_add
from bitfast.ops.sgd_momentum import sgd_momentum_
from bitfast.ops.weight_std import std_conv2d, weight_standardize

# Every op module has defined its schemas (define_op): now the native builds may attach their
# kernels to them.
_native.load_all()

__all__ = [
    "batch_norm_relu",
    "group_norm_relu",
    "group_norm_relu_add",
    "reference",
    "sgd_momentum_",
    "std_conv2d",
    "weight_standardize",
]
