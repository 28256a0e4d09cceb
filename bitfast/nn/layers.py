"""Thin modules over the bitfast ops: drop-ins for timm's ``StdConv2d``, ``GroupNormAct``
and ``BatchNormAct2d`` (ReLU) with identical parameter and buffer names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitfast import backends
from bitfast.ops import batch_norm_relu, checks, group_norm_relu, group_norm_relu_add, std_conv2d


def _check_backend(backend: str | None) -> str | None:
    if backend is not None:
        backends.requested_backend(backend)  # validates the name
    return backend


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardization (BiT), state-dict compatible with timm's StdConv2d.

    The weight is standardized per output channel on every forward, in float32, with
    ``eps`` inside the square root (bitfast default 1e-8, as timm's BiT models; the
    authors' release uses 1e-10). ``padding=None`` gives timm's symmetric default
    ``((stride - 1) + dilation * (kernel_size - 1)) // 2``. ``backend`` fixes the backend
    (default: auto on every call).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-8,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        k = checks.int_pair("StdConv2d", "kernel_size", kernel_size)
        s = checks.int_pair("StdConv2d", "stride", stride)
        d = checks.int_pair("StdConv2d", "dilation", dilation)
        if padding is None:
            padding = tuple(((si - 1) + di * (ki - 1)) // 2 for ki, si, di in zip(k, s, d))
        p = checks.int_pair("StdConv2d", "padding", padding)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"StdConv2d: eps must be a float >= 0; got {eps!r}")
        super().__init__(in_channels, out_channels, k, s, p, d, groups, bias, device=device, dtype=dtype)
        self.eps = float(eps)
        self.backend = _check_backend(backend)

    def forward(self, x: torch.Tensor, weight_hat: torch.Tensor | None = None) -> torch.Tensor:
        """Convolve ``x`` with the standardized weight.

        ``weight_hat``, when given, is that standardized weight computed by the caller
        (``weight_standardize(self.weight, self.eps)``, or this conv's entry of one
        ``weight_standardize_multi`` call over many convs, as ``ResNetV2`` does): the conv
        then only convolves.
        """
        if weight_hat is not None:
            return F.conv2d(x, weight_hat, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return std_conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, self.eps,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}" + (f", backend={self.backend!r}" if self.backend else "")


@torch.compiler.assume_constant_result
def _fused_add_serves(device_type: str, dtype: torch.dtype, backend: str | None) -> bool:
    # Whether group_norm_relu_add can run for a module with this backend: under auto it
    # always can (it falls back inside); an explicit backend must have the fused kernels.
    # Static facts only, so compiled graphs take the answer once, as backends.resolve does.
    want = backends.requested_backend(backend)
    return want == backends.AUTO or not backends.not_supported_reasons(want, "group_norm_relu_add", device_type, dtype)


class GroupNormReLU(nn.GroupNorm):
    """GroupNorm followed by ReLU in one op; timm's ``GroupNormAct`` argument order and
    parameter names (``weight``, ``bias``). ``relu=False`` gives plain GroupNorm."""

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        affine: bool = True,
        relu: bool = True,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        for name, v in (("num_channels", num_channels), ("num_groups", num_groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GroupNormReLU: {name} must be an int >= 1; got {v!r}")
        if num_channels % num_groups:
            raise ValueError(f"GroupNormReLU: num_channels={num_channels} is not divisible by num_groups={num_groups}")
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.relu = bool(relu)
        self.backend = _check_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(group_norm(x))``, keeping ``x``'s dtype and memory format."""
        return group_norm_relu(x, self.num_groups, self.weight, self.bias, self.eps, self.relu, backend=self.backend)

    def forward_add(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``s = a + b`` and ``self(s)`` in one fused op (``bitfast.ops.group_norm_relu_add``):
        returns ``(s, y)``. ``a`` and ``b`` must have the same shape, dtype and memory format.

        Where the requested backend has no fused kernel for these inputs, the add and this
        module run separately (same results). On the fused path this module's forward hooks
        do not run.
        """
        if not _fused_add_serves(a.device.type, a.dtype, self.backend):
            s = a + b
            return s, self(s)
        return group_norm_relu_add(
            a, b, self.num_groups, self.weight, self.bias, self.eps, self.relu, backend=self.backend
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", relu={self.relu}" + (f", backend={self.backend!r}" if self.backend else "")


class BatchNormReLU(nn.BatchNorm2d):
    """BatchNorm2d followed by ReLU in one op; the parameters and buffers of
    ``nn.BatchNorm2d`` (and timm's ``BatchNormAct2d``), its running-statistics semantics
    (``momentum=None`` is a cumulative average), ``relu=False`` gives plain BatchNorm."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        relu: bool = True,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"BatchNormReLU: num_features must be an int >= 1; got {num_features!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.relu = bool(relu)
        self.backend = _check_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(batch_norm(x))`` with nn.BatchNorm2d's training/eval behaviour."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return batch_norm_relu(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
            self.relu,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", relu={self.relu}" + (f", backend={self.backend!r}" if self.backend else "")
