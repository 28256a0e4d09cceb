"""bitfast layers: modules over the fused ops."""

from bitfast.nn.layers import BatchNormReLU, GroupNormReLU, StdConv2d

__all__ = ["BatchNormReLU", "GroupNormReLU", "StdConv2d"]
