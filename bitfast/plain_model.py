"""Plain-PyTorch inference modules for exported bitfast models: this file imports only torch.

``bitfast.export.for_inference`` builds its models from these classes and ``torch.nn``
built-ins, so an exported state dict loads where bitfast is not installed: copy this file
next to your code (``bitfast.export.write_plain_module(path)`` writes it), then

    import json, torch
    from bitfast_plain_model import PlainResNetV2
    model = PlainResNetV2(**json.loads(config_json))          # exported.config_json
    model.load_state_dict(torch.load("model.pt", weights_only=True))

Every module here runs under ``torch.jit.script`` and ``torch.compile(fullgraph=True)``.

Layout (pre-activation BiT ResNet-v2, weight standardization already folded into the conv
weights): ``stem.conv`` -> pad -> max-pool -> stages of ``PlainPreActBottleneck`` -> ``norm``
-> average pool -> ``head.fc`` (1x1 conv). State-dict keys are bitfast's (= timm's) for the
GroupNorm variant. For the BatchNorm variant (``norm="bn"``), eval-mode BatchNorm is an
affine map per channel: ``norm2`` and ``norm3``, which directly follow ``conv1`` and
``conv2``, are folded into those convs (which gain a ``bias``) and reduce to a ReLU; ``norm1``
and the final ``norm`` read a residual sum, not a conv output, so they stay as a
``ScaleShiftReLU`` (buffers ``scale`` and ``shift``).
"""

import json
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Int8Conv2d",
    "Int8Linear",
    "PlainGroupNormReLU",
    "PlainPreActBottleneck",
    "PlainResNetV2",
    "ScaleShiftReLU",
    "load_int8_state_dict",
]


class PlainGroupNormReLU(nn.GroupNorm):
    """``relu(group_norm(x))`` (``relu=False``: plain GroupNorm); ``weight``/``bias`` keys."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True,
                 relu: bool = True) -> None:
        super().__init__(num_groups, num_channels, eps, affine)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """GroupNorm, then ReLU when ``relu``."""
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if self.relu:
            y = F.relu(y)
        return y


class ScaleShiftReLU(nn.Module):
    """``relu(x * scale + shift)`` per channel: an eval-mode BatchNorm (+ ReLU) with its
    statistics and affine parameters folded into two (C,) buffers."""

    def __init__(self, num_channels: int, relu: bool = True) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(num_channels))
        self.register_buffer("shift", torch.zeros(num_channels))
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale and shift each channel, then ReLU when ``relu``."""
        y = x * self.scale.view(1, -1, 1, 1).to(x.dtype) + self.shift.view(1, -1, 1, 1).to(x.dtype)
        if self.relu:
            y = F.relu(y)
        return y


class Int8Conv2d(nn.Module):
    """A Conv2d whose weight is stored as int8 with one float32 scale per output channel
    (symmetric: ``w = weight_int8 * weight_scale``), dequantized on every forward."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int], stride: list[int],
                 padding: list[int], dilation: list[int], groups: int, bias: bool) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride: list[int] = list(stride)
        self.padding: list[int] = list(padding)
        self.dilation: list[int] = list(dilation)
        self.groups = groups
        shape = (out_channels, in_channels // groups, kernel_size[0], kernel_size[1])
        self.register_buffer("weight_int8", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.bias: torch.Tensor | None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight ``weight_int8 * weight_scale``."""
        return self.weight_int8.to(torch.float32) * self.weight_scale.view(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` with the dequantized weight (in ``x``'s dtype)."""
        w = self.dequantized_weight().to(x.dtype)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Int8Linear(nn.Module):
    """A Linear layer with an int8 weight and one float32 scale per output feature."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias: torch.Tensor | None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
        else:
            self.register_parameter("bias", None)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight ``weight_int8 * weight_scale``."""
        return self.weight_int8.to(torch.float32) * self.weight_scale.view(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w^T + bias`` with the dequantized weight."""
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


def _norm(norm: str, channels: int, num_groups: int, eps: float, folded: bool) -> nn.Module:
    if norm == "gn":
        return PlainGroupNormReLU(channels, num_groups, eps)
    return nn.ReLU() if folded else ScaleShiftReLU(channels)


class PlainDownsample(nn.Module):
    """The projection shortcut: a 1x1 conv with the unit's stride (key ``downsample.conv``)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x``."""
        return self.conv(x)


class PlainPreActBottleneck(nn.Module):
    """BiT's pre-activation bottleneck with plain convs (weights already standardized)."""

    def __init__(self, in_chs: int, out_chs: int, mid_chs: int, stride: int, project: bool, norm: str = "gn",
                 num_groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        bn = norm == "bn"
        self.downsample = PlainDownsample(in_chs, out_chs, stride) if project else None
        self.norm1 = _norm(norm, in_chs, num_groups, eps, folded=False)
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=bn)
        self.norm2 = _norm(norm, mid_chs, num_groups, eps, folded=True)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, bias=bn)
        self.norm3 = _norm(norm, mid_chs, num_groups, eps, folded=True)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv3(norm3(conv2(norm2(conv1(p))))) + shortcut`` with ``p = norm1(x)``."""
        p = self.norm1(x)
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(p)
        y = self.conv2(self.norm2(self.conv1(p)))
        y = self.conv3(self.norm3(y))
        return y + shortcut


class PlainStage(nn.Module):
    """``depth`` bottleneck units under ``blocks``; the first strides and projects."""

    def __init__(self, in_chs: int, out_chs: int, mid_chs: int, stride: int, depth: int, norm: str,
                 num_groups: int, eps: float) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[
            PlainPreActBottleneck(in_chs if i == 0 else out_chs, out_chs, mid_chs, stride if i == 0 else 1, i == 0,
                                  norm, num_groups, eps)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the units in order."""
        return self.blocks(x)


class PlainHead(nn.Module):
    """Global average pool, 1x1 conv classifier ``fc`` (absent when ``num_classes`` is 0), flatten."""

    def __init__(self, in_chs: int, num_classes: int) -> None:
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(in_chs, num_classes, 1, bias=True) if num_classes > 0 else nn.Identity()
        self.flatten = nn.Flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool and classify: (N, C, H, W) -> (N, num_classes)."""
        return self.flatten(self.fc(self.global_pool(x)))


class PlainResNetV2(nn.Module):
    """An exported BiT ResNet-v2 for inference, from torch.nn modules only.

    Args mirror ``bitfast.ResNetV2``: ``layers`` (units per stage), ``width_factor``,
    ``num_classes``, ``in_chans``, ``base_width``; ``norm`` is ``"gn"`` or ``"bn"`` (BatchNorm
    folded as the module docs say); ``num_groups`` and ``eps`` are the GroupNorm's.
    ``config_json`` holds these arguments as JSON: ``PlainResNetV2(**json.loads(m.config_json))``
    rebuilds the structure.
    """

    def __init__(self, layers: list[int], width_factor: int = 1, num_classes: int = 1000, in_chans: int = 3,
                 base_width: int = 64, norm: str = "gn", num_groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        if norm not in ("gn", "bn"):
            raise ValueError(f"PlainResNetV2: norm must be 'gn' or 'bn'; got {norm!r}")
        if len(layers) != 4:
            raise ValueError(f"PlainResNetV2: layers must have 4 entries; got {layers!r}")
        self.config_json = json.dumps(dict(layers=list(layers), width_factor=width_factor, num_classes=num_classes,
                                           in_chans=in_chans, base_width=base_width, norm=norm,
                                           num_groups=num_groups, eps=eps))
        wf = width_factor
        stem_chs = base_width * wf
        self.num_features = 32 * base_width * wf
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False),
            pad=nn.ConstantPad2d(1, 0.0),
            pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=0),
        ))
        stages = []
        in_chs = stem_chs
        for i, depth in enumerate(layers):
            out_chs, mid_chs = 4 * base_width * 2**i * wf, base_width * 2**i * wf
            stages.append(PlainStage(in_chs, out_chs, mid_chs, 1 if i == 0 else 2, depth, norm, num_groups, eps))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.norm = _norm(norm, self.num_features, num_groups, eps, folded=False)
        self.head = PlainHead(self.num_features, num_classes)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes), or pooled features when ``num_classes`` is 0."""
        return self.head(self.norm(self.stages(self.stem(x))))


def load_int8_state_dict(model: nn.Module, state_dict: dict) -> nn.Module:
    """Load the state dict of an int8-quantized export (``bitfast.compress.quantize_int8``)
    into a float model of the same structure (e.g. ``PlainResNetV2(**config)``), in place:
    every ``nn.Conv2d`` / ``nn.Linear`` whose ``<name>.weight_int8`` is in ``state_dict``
    becomes an ``Int8Conv2d`` / ``Int8Linear`` first. Returns ``model``."""
    for name, m in list(model.named_modules()):
        if name + ".weight_int8" not in state_dict:
            continue
        has_bias = name + ".bias" in state_dict
        if isinstance(m, nn.Conv2d):
            if isinstance(m.padding, str):
                raise ValueError(f"load_int8_state_dict: {name} has string padding {m.padding!r}; Int8Conv2d needs numbers")
            new = Int8Conv2d(m.in_channels, m.out_channels, list(m.kernel_size), list(m.stride), list(m.padding),
                             list(m.dilation), m.groups, has_bias)
        elif isinstance(m, nn.Linear):
            new = Int8Linear(m.in_features, m.out_features, has_bias)
        else:
            raise ValueError(f"load_int8_state_dict: {name} is a {type(m).__name__}; int8 weights fit nn.Conv2d or nn.Linear")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    model.load_state_dict(state_dict)
    return model
