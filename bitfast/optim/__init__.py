"""bitfast optimizers: drop-in replacements for ``torch.optim`` ones that run fused kernels.

``FusedSGD`` replaces ``torch.optim.SGD`` (same arguments, update and ``state_dict``
format) and steps all parameters of a device and dtype with one ``bitfast.ops.sgd_momentum_``
call.
"""

from bitfast.optim.fused_sgd import FusedSGD

__all__ = ["FusedSGD"]
