"""The pure-PyTorch specification of every bitfast op.

This module is the spec: tests compare every backend against it, benchmarks use it as
the timm-style eager baseline, and the ``reference`` backend runs it. The math follows
timm's BiT layers (``StdConv2d`` standardizes weights through ``F.batch_norm`` over each
output channel with biased variance and eps inside the square root; ``GroupNormAct`` is
``F.group_norm`` followed by ReLU) and ``torch.optim.SGD``.

Two kinds of function live here:

* differentiable composites (``weight_standardize``, ``group_norm_relu``,
  ``group_norm_relu_add``, ``batch_norm_relu``, ``std_conv2d``): plain PyTorch,
  differentiated by autograd, what a user of timm runs today;
* explicit forward/backward pairs (``*_forward`` returning the saved statistics,
  ``*_backward`` the hand-derived gradients): the contract every kernel implements, and the
  kernels of the registered ops under ``backend="reference"``.

Statistics are always computed in float32 (float64 inputs stay float64).

One module per op family (``<op module>_ref.py``, e.g. ``group_norm_relu_ref.py`` for
``bitfast.ops.group_norm_relu``) and ``common.py``; this package exports every module's public
functions, found by scanning the folder, so adding an op's reference is adding its own file.
"""

from bitfast import _exports
from bitfast.ops.reference.common import channel_view, memory_format, stat_dtype

__all__ = ["channel_view", "memory_format", "stat_dtype",
           *_exports.export_submodules(globals(), lambda name: name.endswith("_ref"))]
