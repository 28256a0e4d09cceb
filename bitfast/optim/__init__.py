"""bitfast optimizers: drop-in replacements for ``torch.optim`` ones that run fused kernels.

``FusedSGD`` replaces ``torch.optim.SGD`` (same arguments, update and ``state_dict``
format) and steps all parameters of a device and dtype with one ``bitfast.ops.sgd_momentum_``
call; it can also keep a moving average of the parameters in the same pass
(``ema_decay=...``) and take the learning rate as a device tensor. ``ModelEMA`` keeps the
moving average of a model's weights (and buffers) for any other optimizer.
"""

from bitfast.optim.ema import ModelEMA
from bitfast.optim.fused_sgd import FusedSGD

__all__ = ["FusedSGD", "ModelEMA"]
