"""The BiT ResNet-v2 family (Kolesnikov et al., 2020, "Big Transfer (BiT): General Visual
Representation Learning"), built from injected layers.

A pre-activation ResNet (He et al., 2016, "Identity Mappings in Deep Residual Networks")
whose convolutions are weight-standardized and whose norms are GroupNorm (or BatchNorm)
fused with the ReLU that follows them. Module and parameter names give state dicts that
are key-for-key those of timm's ``resnetv2_*_bit`` models (see ``bitfast.checkpoint`` for
the official ``.npz`` and the authors' PyTorch layouts).

The conv and norm layers are factories passed in (``conv_layer``, ``norm_layer``), so the
same definition serves every backend and model-level parity tests compare the same code.
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bitfast import backends
from bitfast.nn.layers import BatchNormReLU, GroupNormReLU, StdConv2d
from bitfast.ops import checks
from bitfast.ops.reference import memory_format

__all__ = ["ClassifierHead", "DownsampleConv", "PreActBottleneck", "ResNetStage", "ResNetV2", "NORMS"]

NORMS: tuple[str, ...] = ("gn", "bn")


def check_norm(cls: str, norm) -> str:
    """Validate a norm name (``"gn"`` or ``"bn"``, any case); return it lower-cased."""
    if not isinstance(norm, str):
        raise TypeError(f"{cls}: norm must be a str, one of {NORMS}; got {norm!r} ({type(norm).__name__})")
    if norm.lower() not in NORMS:
        raise ValueError(f"{cls}: norm must be one of {NORMS} (GroupNorm or BatchNorm); got {norm!r}")
    return norm.lower()


def default_conv_layer(ws_eps: float = 1e-8, backend: str | None = None) -> Callable[..., nn.Module]:
    """The BiT conv factory: ``StdConv2d`` without bias, with ``ws_eps`` and ``backend`` fixed."""
    return functools.partial(StdConv2d, bias=False, eps=ws_eps, backend=backend)


def default_norm_layer(norm: str = "gn", backend: str | None = None) -> Callable[[int], nn.Module]:
    """The BiT norm factory: ``GroupNormReLU`` (32 groups, eps 1e-5) for ``"gn"``,
    ``BatchNormReLU`` (eps 1e-5, momentum 0.1) for ``"bn"``."""
    norm = check_norm("default_norm_layer", norm)
    if norm == "gn":
        return functools.partial(GroupNormReLU, num_groups=32, eps=1e-5, backend=backend)
    return functools.partial(BatchNormReLU, eps=1e-5, momentum=0.1, backend=backend)


# A unit's output before its final add: (conv3 output, shortcut). Units hand it on unsummed
# so that the next norm can compute the sum itself, fused (GroupNormReLU.forward_add).
Unsummed = tuple[torch.Tensor, torch.Tensor]


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def add_then_norm(norm: nn.Module, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = a + b`` and ``norm(s)``: returns ``(s, norm(s))``, in one fused op when ``norm``
    offers ``forward_add`` (``GroupNormReLU``), has no forward hooks, and ``a`` and ``b``
    match in shape, dtype and memory format; otherwise as ``a + b`` then ``norm``."""
    if (
        hasattr(norm, "forward_add")
        and not _has_hooks(norm)
        and a.shape == b.shape
        and a.dtype == b.dtype
        and memory_format(a) == memory_format(b)
    ):
        return norm.forward_add(a, b)
    s = a + b
    return s, norm(s)


class DownsampleConv(nn.Module):
    """The projection shortcut of the first unit of a stage: a 1x1 (standardized) conv
    with the unit's stride and no norm after it. It reads the shared pre-activation."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, conv_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.conv = conv_layer(in_chs, out_chs, 1, stride=stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` to the unit's output width and resolution."""
        return self.conv(x)


class PreActBottleneck(nn.Module):
    """The pre-activation bottleneck unit of ResNet-v2 / BiT (stride on the 3x3 conv).

    ::

        p   = relu(norm1(x))                    # shared pre-activation
        sc  = downsample(p) if projecting else x
        y   = conv1(p)                          # 1x1, in_chs -> mid_chs
        y   = conv2(relu(norm2(y)))             # 3x3, stride, pad 1
        y   = conv3(relu(norm3(y)))             # 1x1, mid_chs -> out_chs
        out = y + sc                            # no activation after the add

    ``norm_layer(c)`` must return a module computing norm + ReLU; ``conv_layer(cin, cout,
    kernel_size, stride=, padding=)`` a bias-free (standardized) conv.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        mid_chs: int,
        stride: int = 1,
        *,
        conv_layer: Callable[..., nn.Module],
        norm_layer: Callable[[int], nn.Module],
        project: bool | None = None,
    ) -> None:
        super().__init__()
        if project is None:
            project = stride != 1 or in_chs != out_chs
        self.downsample = DownsampleConv(in_chs, out_chs, stride, conv_layer) if project else None
        self.norm1 = norm_layer(in_chs)
        self.conv1 = conv_layer(in_chs, mid_chs, 1, stride=1, padding=0)
        self.norm2 = norm_layer(mid_chs)
        self.conv2 = conv_layer(mid_chs, mid_chs, 3, stride=stride, padding=1)
        self.norm3 = norm_layer(mid_chs)
        self.conv3 = conv_layer(mid_chs, out_chs, 1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the unit on ``x`` (N, in_chs, H, W) -> (N, out_chs, H / stride, W / stride)."""
        y, shortcut = self.forward_unsummed(x)
        return y + shortcut

    def forward_unsummed(self, x: torch.Tensor | Unsummed) -> Unsummed:
        """The unit without its final add: ``(conv3 output, shortcut)``, whose sum is
        ``forward(x)``. ``x`` may itself be the previous unit's unsummed output ``(a, b)``:
        its sum is then computed together with ``norm1`` (``add_then_norm``)."""
        if isinstance(x, tuple):
            x, p = add_then_norm(self.norm1, *x)
        else:
            p = self.norm1(x)
        shortcut = self.downsample(p) if self.downsample is not None else x
        y = self.conv1(p)
        y = self.conv2(self.norm2(y))
        y = self.conv3(self.norm3(y))
        return y, shortcut


class ResNetStage(nn.Module):
    """``depth`` bottleneck units; the first one strides and projects."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        mid_chs: int,
        stride: int,
        depth: int,
        *,
        conv_layer: Callable[..., nn.Module],
        norm_layer: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(
                PreActBottleneck(
                    in_chs if i == 0 else out_chs,
                    out_chs,
                    mid_chs,
                    stride if i == 0 else 1,
                    conv_layer=conv_layer,
                    norm_layer=norm_layer,
                    project=i == 0,
                )
                for i in range(depth)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stage's units in order."""
        if any(_has_hooks(b) for b in self.blocks) or _has_hooks(self.blocks):
            return self.blocks(x)
        y, shortcut = self.forward_unsummed(x)
        return y + shortcut

    def forward_unsummed(self, x: torch.Tensor | Unsummed) -> Unsummed:
        """The stage with its last unit's final add left out (see
        ``PreActBottleneck.forward_unsummed``); each unit's add is fused with the next
        unit's ``norm1`` where that norm supports it."""
        for block in self.blocks:
            x = block.forward_unsummed(x)
        return x


class ClassifierHead(nn.Module):
    """Global average pool, optional dropout, 1x1 conv classifier (``fc``), flatten.

    With ``num_classes=0`` the classifier is an identity and the head returns the pooled
    features (N, C).
    """

    def __init__(self, in_chs: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.in_chs = in_chs
        self.num_classes = num_classes
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Conv2d(in_chs, num_classes, 1, bias=True) if num_classes > 0 else nn.Identity()
        self.flatten = nn.Flatten(1)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (N, C, H, W) to (N, C); then classify to (N, num_classes) unless ``pre_logits``."""
        x = self.global_pool(x)
        if pre_logits:
            return self.flatten(x)
        x = self.drop(x)
        return self.flatten(self.fc(x))


def _is_bitfast_layer(layer, base: type | tuple[type, ...]) -> bool:
    return isinstance(layer, type) and issubclass(layer, base)


class ResNetV2(nn.Module):
    """BiT ResNet-v2: stem -> 4 stages of pre-activation bottlenecks -> norm (+ReLU) -> head.

    Args:
        layers: units per stage, e.g. ``(3, 4, 6, 3)`` for R50.
        width_factor: channel multiplier (the ``x1``/``x3`` of R50x3): stem ``64*wf``,
            stage ``i`` ``cmid = 64 * 2^i * wf``, ``cout = 256 * 2^i * wf``.
        num_classes: classes of the head; 0 builds no classifier (the model returns the
            pooled (N, 2048*wf) features).
        base_width: the stem width of the x1 model (64 in every BiT model); smaller values
            build narrow BiT-style networks for quick experiments: stem ``base_width*wf``,
            ``cmid = base_width * 2^i * wf``, ``cout = 4 * cmid``. With the default GroupNorm
            (32 groups) it must be a multiple of 32.
        in_chans: input channels.
        conv_layer: factory ``conv_layer(cin, cout, kernel_size, stride=, padding=)``.
            Default ``StdConv2d``. When it is ``StdConv2d`` or a subclass, ``ws_eps`` and
            ``backend`` are bound to it; any other factory is used as given.
        norm_layer: factory ``norm_layer(channels)`` returning a norm + ReLU module.
            Default from ``norm``. ``GroupNormReLU``/``BatchNormReLU`` (or subclasses) get
            ``backend`` bound; any other factory is used as given.
        norm: ``"gn"`` (GroupNorm, 32 groups, the BiT models) or ``"bn"`` (BatchNorm, eps
            1e-5, momentum 0.1) when ``norm_layer`` is not given.
        ws_eps: weight-standardization eps (bitfast and timm: 1e-8; the authors: 1e-10).
        backend: backend fixed for every bitfast layer (default: auto on every call).
        zero_head: zero-initialise the classifier (BiT fine-tuning); else normal(0, 0.01)
            weight and zero bias.
        drop_rate: dropout before the classifier.
        device: build the parameters on this device (``"meta"`` builds a model without
            memory, e.g. to count the parameters of R152x4).
    """

    def __init__(
        self,
        layers: Sequence[int],
        width_factor: int = 1,
        num_classes: int = 1000,
        in_chans: int = 3,
        conv_layer: Callable[..., nn.Module] | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
        *,
        norm: str = "gn",
        ws_eps: float = 1e-8,
        backend: str | None = None,
        zero_head: bool = False,
        drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        cls = "ResNetV2"
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) != 4:
            raise TypeError(f"{cls}: layers must be a sequence of 4 ints (units per stage); got {layers!r}")
        layers = tuple(checks.int_at_least(cls, f"layers[{i}]", v, 1) for i, v in enumerate(layers))
        width_factor = checks.int_at_least(cls, "width_factor", width_factor, 1)
        base_width = checks.int_at_least(cls, "base_width", base_width, 1)
        num_classes = checks.int_at_least(cls, "num_classes", num_classes, 0)
        in_chans = checks.int_at_least(cls, "in_chans", in_chans, 1)
        ws_eps = checks.non_negative(cls, "ws_eps", ws_eps)
        drop_rate = checks.non_negative(cls, "drop_rate", drop_rate)
        norm = check_norm(cls, norm)
        if backend is not None:
            backends.requested_backend(backend)  # raises on an unknown name
        if conv_layer is None or _is_bitfast_layer(conv_layer, StdConv2d):
            conv_layer = functools.partial(conv_layer or StdConv2d, bias=False, eps=ws_eps, backend=backend)
        if norm_layer is None:
            norm_layer = default_norm_layer(norm, backend)
        elif _is_bitfast_layer(norm_layer, (GroupNormReLU, BatchNormReLU)):
            norm_layer = functools.partial(norm_layer, backend=backend)

        self.layers = layers
        self.width_factor = width_factor
        self.base_width = base_width
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.norm_kind = norm
        self.ws_eps = ws_eps
        self.backend = backend
        self.zero_head = bool(zero_head)
        self.drop_rate = drop_rate
        wf = width_factor
        stem_chs = base_width * wf
        self.num_features = 32 * base_width * wf

        ctx = torch.device(device) if device is not None else contextlib.nullcontext()
        with ctx:
            # No norm and no ReLU in the stem: its output can be negative, so the pad before
            # the max-pool is a zero pad (not MaxPool2d(padding=1), which pads with -inf).
            self.stem = nn.Sequential(
                OrderedDict(
                    conv=conv_layer(in_chans, stem_chs, 7, stride=2, padding=3),
                    pad=nn.ConstantPad2d(1, 0.0),
                    pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=0),
                )
            )
            stages = []
            in_chs = stem_chs
            for i, depth in enumerate(layers):
                out_chs, mid_chs = 4 * base_width * 2**i * wf, base_width * 2**i * wf
                stages.append(
                    ResNetStage(
                        in_chs, out_chs, mid_chs, 1 if i == 0 else 2, depth,
                        conv_layer=conv_layer, norm_layer=norm_layer,
                    )
                )
                in_chs = out_chs
            self.stages = nn.Sequential(*stages)
            self.norm = norm_layer(self.num_features)
            self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        self._init_weights()

    @property
    def arch(self) -> str:
        """The architecture name, e.g. ``"R50x1"`` (``"R?x1"`` for a non-standard depth,
        ``"R?x1-w32"`` for a non-standard ``base_width``)."""
        depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}.get(self.layers, "?")
        suffix = "" if self.base_width == 64 else f"-w{self.base_width}"
        return f"R{depth}x{self.width_factor}{suffix}"

    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if name.startswith("head"):
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._init_head(self.head.fc, self.zero_head)

    @staticmethod
    def _init_head(fc: nn.Module, zero: bool) -> None:
        if not isinstance(fc, nn.Conv2d):
            return
        if zero:
            nn.init.zeros_(fc.weight)
        else:
            nn.init.normal_(fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(fc.bias)

    def get_classifier(self) -> nn.Module:
        """The classifier module (``head.fc``; an ``nn.Identity`` when num_classes is 0)."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, zero_head: bool | None = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0: no classifier).

        The new head is zero-initialised when ``zero_head`` (default: the model's
        ``zero_head``), else normal(0, 0.01); it is placed on the device and dtype of the
        final norm's parameters.
        """
        num_classes = checks.int_at_least("ResNetV2.reset_classifier", "num_classes", num_classes, 0)
        ref = next(self.norm.parameters(), None)
        head = ClassifierHead(self.num_features, num_classes, self.drop_rate)
        if ref is not None:
            head = head.to(device=ref.device, dtype=ref.dtype)
        self._init_head(head.fc, self.zero_head if zero_head is None else bool(zero_head))
        head.train(self.training)
        self.head = head
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stages and the final norm + ReLU: (N, in_chans, H, W) -> (N, 2048*wf, H/32, W/32)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"ResNetV2: input has shape {tuple(x.shape)}; expected (N, {self.in_chans}, H, W)"
            )
        x = self.stem(x)
        if _has_hooks(self.stages) or any(
            _has_hooks(m) for stage in self.stages for m in (stage, stage.blocks, *stage.blocks)
        ):
            # Hooks observe the modules' outputs: call every module, unfused.
            return self.norm(self.stages(x))
        # Each unit's residual add is computed with the next unit's norm1 and the last one
        # with the final norm, in one pass over memory where the norm supports it.
        for stage in self.stages:
            x = stage.forward_unsummed(x)
        return add_then_norm(self.norm, *x)[1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the features to (N, C); then the classifier unless ``pre_logits``."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes), or pooled features (N, 2048*wf) when num_classes is 0."""
        return self.forward_head(self.forward_features(x))
