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
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from bitfast import backends
from bitfast.nn.layers import BatchNormReLU, GroupNormReLU, StdConv2d
from bitfast.ops import checks, weight_standardize_multi
from bitfast.ops.reference import memory_format
from bitfast.ops.weight_std import MULTI_FAMILY

__all__ = ["ClassifierHead", "DownsampleConv", "PreActBottleneck", "ResNetStage", "ResNetV2", "NORMS",
           "WS_GROUPINGS"]

NORMS: tuple[str, ...] = ("gn", "bn")

# How ResNetV2 standardizes its conv weights on each forward (see ResNetV2's ws_grouping).
WS_GROUPINGS: tuple[str, ...] = ("auto", "model", "stage", "conv")

# The standardized weights of a forward, handed to the convs in the order they run.
Weights = Iterator[torch.Tensor]


def check_ws_grouping(cls: str, grouping) -> str:
    """Validate a ``ws_grouping`` (one of ``WS_GROUPINGS``); return it."""
    if not isinstance(grouping, str) or grouping not in WS_GROUPINGS:
        raise ValueError(f"{cls}: ws_grouping must be one of {WS_GROUPINGS}; got {grouping!r}")
    return grouping


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


def _conv(conv: nn.Module, x: torch.Tensor, weights: Weights | None) -> torch.Tensor:
    # ``conv(x)``, or with the conv's entry of the forward's standardized weights if it has one
    w = None if weights is None else next(weights)
    return conv(x) if w is None else conv(x, w)


@torch.compiler.assume_constant_result
def _data_parallel() -> bool:
    """Whether this process is one of several of a torch.distributed process group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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

    def forward(self, x: torch.Tensor, weight_hat: torch.Tensor | None = None) -> torch.Tensor:
        """Project ``x`` to the unit's output width and resolution (with the conv's
        standardized weight ``weight_hat`` when the caller computed it)."""
        return self.conv(x) if weight_hat is None else self.conv(x, weight_hat)


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

    def convs(self) -> list[nn.Module]:
        """The unit's convs in the order its forward runs them: the projection's (if any),
        conv1, conv2, conv3."""
        head = [self.downsample.conv] if self.downsample is not None else []
        return [*head, self.conv1, self.conv2, self.conv3]

    def forward_unsummed(self, x: torch.Tensor | Unsummed, weights: Weights | None = None) -> Unsummed:
        """The unit without its final add: ``(conv3 output, shortcut)``, whose sum is
        ``forward(x)``. ``x`` may itself be the previous unit's unsummed output ``(a, b)``:
        its sum is then computed together with ``norm1`` (``add_then_norm``). ``weights``,
        when given, yields the standardized weights of ``convs()`` in order (``ResNetV2``
        computes them all at once); else each conv standardizes its own."""
        if isinstance(x, tuple):
            x, p = add_then_norm(self.norm1, *x)
        else:
            p = self.norm1(x)
        shortcut = _conv(self.downsample, p, weights) if self.downsample is not None else x
        y = _conv(self.conv1, p, weights)
        y = _conv(self.conv2, self.norm2(y), weights)
        y = _conv(self.conv3, self.norm3(y), weights)
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

    def forward_unsummed(self, x: torch.Tensor | Unsummed, weights: Weights | None = None) -> Unsummed:
        """The stage with its last unit's final add left out (see
        ``PreActBottleneck.forward_unsummed``, which also says what ``weights`` is); each
        unit's add is fused with the next unit's ``norm1`` where that norm supports it."""
        for block in self.blocks:
            x = block.forward_unsummed(x, weights)
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
        ws_grouping: how the forward standardizes the conv weights (attribute of the same
            name, may be changed at any time). ``"model"``: every weight in one
            ``weight_standardize_multi`` call (one launch forward, one backward: the backward
            runs once every conv's weight gradient is known, at the end of the backward
            pass); ``"stage"``: one call per stage (the stem with stage 1), so under
            DistributedDataParallel the late stages' weight gradients are ready, and their
            all-reduce starts, while the early stages still run their backward; ``"conv"``:
            each conv on its own (two launches per conv and step); ``"auto"`` (default):
            ``"stage"`` in a process group of several processes, else ``"model"``. Grouping
            covers the convs where it changes nothing else: plain ``StdConv2d`` modules
            without hooks, on a backend with a list kernel (C++ and Triton; none on the
            reference backend), grouped by eps, dtype, device and backend. The others
            standardize their own weight as before: LoRA-wrapped convs (their weight is
            ``W + delta``, formed in their forward), subclasses, convs observed by hooks
            (a hook sees the call it expects). Frozen and trainable weights go to separate
            calls (no gradient work for frozen ones). Under autocast the call writes the
            low-precision weights the convs take (no cast per conv). The numbers equal the per-conv op's
            bit for bit on the C++ backend and within the parity rule on Triton; a model
            that is not a ``ResNetV2`` (a timm model after ``bitfast.patch``) runs its own
            forward, which calls each conv, so its convs keep per-conv standardization.
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
        ws_grouping: str = "auto",
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
        ws_grouping = check_ws_grouping(cls, ws_grouping)
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
        self.ws_grouping = ws_grouping
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
        if _has_hooks(self.stages) or any(
            _has_hooks(m) for stage in self.stages for m in (stage, stage.blocks, *stage.blocks)
        ):
            # Hooks observe the modules' outputs: call every module, unfused.
            return self.norm(self.stages(self.stem(x)))
        weights = self._standardized_weights()
        w_stem = None if weights is None else next(weights)
        if w_stem is None:
            x = self.stem(x)
        else:
            x = self.stem.pool(self.stem.pad(self.stem.conv(x, w_stem)))
        # Each unit's residual add is computed with the next unit's norm1 and the last one
        # with the final norm, in one pass over memory where the norm supports it.
        for stage in self.stages:
            x = stage.forward_unsummed(x, weights)
        return add_then_norm(self.norm, *x)[1]

    def std_convs(self) -> list[nn.Module | None]:
        """The convs of the stem and the stages, in the order the forward runs them (None
        for a stem without a ``conv``)."""
        convs = [getattr(self.stem, "conv", None)]
        for stage in self.stages:
            for block in stage.blocks:
                convs.extend(block.convs())
        return convs

    def ws_groups(self) -> list[list[int]] | None:
        """The groups of ``std_convs()`` (by index) whose weights the next forward
        standardizes with one ``weight_standardize_multi`` call each; the convs in no group
        standardize their own (see ``ws_grouping`` for which). None when no conv is grouped."""
        grouping = self.ws_grouping
        if grouping == "conv":
            return None
        if grouping == "auto":
            grouping = "stage" if _data_parallel() else "model"
        stem = self.stem
        plain_stem = (isinstance(stem, nn.Sequential) and list(stem._modules) == ["conv", "pad", "pool"]
                      and not any(_has_hooks(m) for m in (stem, *stem)))
        # Per conv: its stage (the stem counts with stage 1) and whether a caller may hand it
        # its standardized weight (a plain StdConv2d without hooks, called without hooks).
        entries = [(0, plain_stem)]
        for i, stage in enumerate(self.stages):
            for block in stage.blocks:
                down = block.downsample
                if down is not None:
                    entries.append((i, type(down) is DownsampleConv and not _has_hooks(down)))
                entries.extend((i, True) for _ in range(3))
        convs = self.std_convs()
        groups: dict = {}
        usable: dict = {}
        for i, (c, (stage, callable_with_weight)) in enumerate(zip(convs, entries)):
            if not callable_with_weight or type(c) is not StdConv2d or _has_hooks(c):
                continue
            w = c.weight
            where = (w.device, w.dtype, c.backend)
            if where not in usable:
                try:
                    usable[where] = backends.resolve(MULTI_FAMILY, w.device.type, w.dtype, c.backend) != "reference"
                except backends.BackendError:
                    usable[where] = False  # the convs' fixed backend has no list kernel
            if usable[where]:
                key = (stage if grouping == "stage" else 0, where, c.eps, w.requires_grad)
                groups.setdefault(key, []).append(i)
        return list(groups.values()) or None

    def _standardized_weights(self) -> Weights | None:
        # the standardized weights of std_convs() in order (None for a conv in no group),
        # from one call per group
        groups = self.ws_groups()
        if groups is None:
            return None
        convs = self.std_convs()
        out: list = [None] * len(convs)
        for group in groups:
            c = convs[group[0]]
            w0 = c.weight
            # Under autocast the convs would cast each float32 weight to the autocast dtype:
            # the list op writes that copy directly.
            out_dtype = None
            if w0.dtype == torch.float32 and torch.is_autocast_enabled(w0.device.type):
                out_dtype = torch.get_autocast_dtype(w0.device.type)
            for i, w in zip(group, weight_standardize_multi([convs[i].weight for i in group], c.eps,
                                                             out_dtype=out_dtype, backend=c.backend)):
                out[i] = w
        return iter(out)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the features to (N, C); then the classifier unless ``pre_logits``."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes), or pooled features (N, 2048*wf) when num_classes is 0."""
        return self.forward_head(self.forward_features(x))
