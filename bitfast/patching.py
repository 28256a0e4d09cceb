"""``bitfast.patch(model)``: swap an existing model's BiT layers for bitfast's fused ones, in place.

What is swapped (each swap keeps the same Parameter and buffer objects, so state-dict keys,
values, ``requires_grad`` flags and any optimizer holding the parameters stay valid):

* timm-style weight-standardized convs: a ``nn.Conv2d`` subclass named ``StdConv2d`` with an
  ``eps`` attribute (and ``StdConv2dSame`` when its padding is static) becomes
  ``bitfast.nn.StdConv2d``;
* timm-style norm + activation modules: ``GroupNormAct`` / ``BatchNormAct2d`` (subclasses of
  ``nn.GroupNorm`` / ``nn.BatchNorm2d`` with an ``act`` that is ``nn.ReLU`` or ``nn.Identity``
  and a ``drop`` that is ``nn.Identity``) become ``GroupNormReLU`` / ``BatchNormReLU``;
* a plain ``nn.GroupNorm`` or ``nn.BatchNorm2d`` immediately followed by ``nn.ReLU`` inside an
  ``nn.Sequential``: the norm becomes the fused module under the same key (so its
  ``weight``/``bias``/running statistics keep their state-dict names) and the ReLU, which has
  no state, becomes ``nn.Identity``.

Every candidate is checked numerically before it is swapped: a float64 copy of the old
module and of its replacement (reference backend) run on the same random input, in training
and eval mode for norms (running statistics compared too), and must agree to 1e-9 relative.
That check is what catches math that looks right by name but is not, e.g. eps added to the
standard deviation instead of inside the square root.

What is refused (``PatchError`` with ``strict=True``, the default; left in place with the
reason in the report with ``strict=False``): a norm-act module with another activation or a
dropout, ``ScaledStdConv2d`` (its learned per-channel gain has no place in ``StdConv2d``),
``StdConv2dSame`` with dynamic ("SAME", input-size dependent, possibly asymmetric) padding,
non-zero padding modes, modules with hooks or parametrizations, and any candidate whose
numerical check fails. A model with no candidate at all raises, saying what it found.

``bitfast.patch`` is :func:`patch`; this module (``bitfast.patching``) also holds
:class:`PatchReport`, :class:`PatchError` and :func:`fused_optimizer`, which turns a
``torch.optim.SGD`` into a ``FusedSGD``.
"""

from __future__ import annotations

import collections
import copy
import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from bitfast import backends
from bitfast.nn.layers import BatchNormReLU, GroupNormReLU, StdConv2d
from bitfast.optim import FusedSGD

__all__ = ["PatchError", "PatchReport", "fused_optimizer", "patch"]

_STD_CONVS = ("StdConv2d", "StdConv2dSame")
_SCALED_STD_CONVS = ("ScaledStdConv2d", "ScaledStdConv2dSame")
_NORM_ACTS = {"GroupNormAct": nn.GroupNorm, "BatchNormAct2d": nn.BatchNorm2d}
_BITFAST = (StdConv2d, GroupNormReLU, BatchNormReLU)
_RTOL = 1e-9


class PatchError(ValueError):
    """A model ``bitfast.patch`` cannot patch exactly (the message lists every reason)."""


@dataclass
class Replaced:
    """One swap: the module's name, its old and new class names, and a note (e.g. ``eps``)."""

    name: str
    old: str
    new: str
    note: str = ""


@dataclass
class Left:
    """A module left as it was and why; ``refused`` marks the ones ``strict=True`` raises on."""

    name: str
    kind: str
    reason: str
    refused: bool


@dataclass
class PatchReport:
    """What ``patch`` did: ``replaced`` swaps, ``left`` candidates not swapped (with reasons),
    ``already`` names of modules that were bitfast layers before."""

    replaced: list[Replaced] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)
    already: list[str] = field(default_factory=list)

    @property
    def refused(self) -> list[Left]:
        """The left modules whose math bitfast cannot reproduce exactly."""
        return [x for x in self.left if x.refused]

    def __str__(self) -> str:
        counts = collections.Counter(f"{r.old} -> {r.new}" for r in self.replaced)
        lines = [f"bitfast.patch: replaced {len(self.replaced)} modules"
                 + (f" ({', '.join(f'{n} x {k}' for k, n in counts.items())})" if counts else "")]
        if self.already:
            lines.append(f"already bitfast: {len(self.already)} modules")
        for x in self.left:
            lines.append(f"left {x.name} ({x.kind}){' [refused]' if x.refused else ''}: {x.reason}")
        return "\n".join(lines)


@dataclass
class _Plan:
    name: str
    parent: nn.Module
    key: str
    old: nn.Module
    new: nn.Module
    note: str
    relu_key: str | None = None  # for a Sequential norm + ReLU pair: the ReLU's key


def _has_hooks(m: nn.Module) -> bool:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(m, n, None) for n in names)


def _own_names(m: nn.Module) -> tuple[set[str], set[str], set[str]]:
    return set(m._parameters), set(m._buffers), {k for k, v in m._modules.items() if v is not None}


def _common_refusal(m: nn.Module) -> str | None:
    if _has_hooks(m):
        return "has hooks registered (they would be lost with the module); remove them, patch, then re-register"
    if torch.nn.utils.parametrize.is_parametrized(m):
        return "has parametrizations (torch.nn.utils.parametrize); bitfast reads the raw parameters"
    return None


def _conv_padding(m: nn.Conv2d) -> tuple[tuple[int, int] | None, str]:
    p = m.padding
    if isinstance(p, str):
        if p == "valid":
            return (0, 0), ""
        total = [d * (k - 1) for k, d in zip(m.kernel_size, m.dilation)]
        if any(t % 2 for t in total):
            return None, "padding='same' is asymmetric for this kernel/dilation; bitfast's StdConv2d pads symmetrically"
        return tuple(t // 2 for t in total), ""
    return tuple(p), ""


def _plan_conv(name: str, m: nn.Conv2d, backend: str | None) -> tuple[nn.Module | None, str]:
    """(replacement, note) or (None, refusal reason)."""
    cls = type(m).__name__
    if cls in _SCALED_STD_CONVS:
        return None, (
            f"{cls} multiplies the standardized weight by a learned per-channel gain (gain * gamma / sqrt(fan_in)) "
            "that bitfast's StdConv2d does not have"
        )
    reason = _common_refusal(m)
    if reason:
        return None, reason
    if getattr(m, "same_pad", False):
        return None, (
            f"{cls} pads dynamically ('SAME' padding computed from the input size, possibly asymmetric); "
            "bitfast's StdConv2d pads statically and symmetrically"
        )
    eps = getattr(m, "eps", None)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or eps < 0:
        return None, f"{cls} has no numeric eps >= 0 (eps={eps!r}); cannot tell its weight-standardization math"
    if m.padding_mode != "zeros":
        return None, f"padding_mode={m.padding_mode!r}; bitfast's StdConv2d pads with zeros only"
    params, buffers, children = _own_names(m)
    if params - {"weight", "bias"} or buffers or children:
        extra = sorted((params - {"weight", "bias"}) | buffers | children)
        return None, f"{cls} has extra state {extra} that bitfast's StdConv2d would not keep"
    padding, why = _conv_padding(m)
    if padding is None:
        return None, why
    new = StdConv2d(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, padding, m.dilation, m.groups,
        bias=m.bias is not None, eps=float(eps), backend=backend, device="meta",
    )
    new.weight = m.weight
    new.bias = m.bias
    return new, f"eps={float(eps):g}"


def _act_relu(m: nn.Module) -> tuple[bool | None, str]:
    """Whether the norm-act module's activation is ReLU (True) or none (False); None + reason
    when neither, or when its dropout is not an identity."""
    cls = type(m).__name__
    act = getattr(m, "act", None)
    drop = getattr(m, "drop", None)
    if drop is not None and type(drop) is not nn.Identity:
        return None, f"{cls}.drop is {type(drop).__name__}; bitfast fuses norm + ReLU with no dropout in between"
    if act is None or type(act) is nn.Identity:
        return False, ""
    if type(act) is nn.ReLU:
        return True, ""
    return None, (
        f"{cls}.act is {type(act).__name__}; bitfast's fused norm modules apply ReLU (or nothing), "
        "so a different activation cannot be reproduced"
    )


def _plan_norm_act(name: str, m: nn.Module, backend: str | None) -> tuple[nn.Module | None, str]:
    cls = type(m).__name__
    reason = _common_refusal(m)
    if reason:
        return None, reason
    relu, why = _act_relu(m)
    if relu is None:
        return None, why
    params, buffers, children = _own_names(m)
    expected_buffers = {"running_mean", "running_var", "num_batches_tracked"} if isinstance(m, nn.BatchNorm2d) else set()
    extra = sorted((params - {"weight", "bias"}) | (buffers - expected_buffers) | (children - {"act", "drop"}))
    if extra:
        return None, f"{cls} has extra state or submodules {extra} that the fused module would not keep"
    return _fused_norm(m, relu, backend), f"relu={relu}"


def _fused_norm(m: nn.Module, relu: bool, backend: str | None) -> nn.Module:
    if isinstance(m, nn.GroupNorm):
        new = GroupNormReLU(m.num_channels, m.num_groups, m.eps, m.affine, relu=relu, backend=backend, device="meta")
        new.weight = m.weight
        new.bias = m.bias
        return new
    new = BatchNormReLU(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, relu=relu,
                        backend=backend, device="meta")
    new.weight = m.weight
    new.bias = m.bias
    for b in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, b, getattr(m, b))
    return new


def _probe(old: nn.Module, new: nn.Module, relu_after: bool) -> str | None:
    """Run float64 copies of ``old`` (followed by ReLU if ``relu_after``) and ``new`` on one
    random input (train and eval mode for norms); None when they agree, else why not."""
    try:
        a = copy.deepcopy(old).to(device="cpu", dtype=torch.float64)
        b = copy.deepcopy(new).to(device="cpu", dtype=torch.float64)
    except Exception as e:  # e.g. parameters on the meta device
        return f"could not be checked numerically ({type(e).__name__}: {e})"
    b.backend = "reference"
    gen = torch.Generator().manual_seed(0)
    if isinstance(old, nn.Conv2d):
        hw = [(k - 1) * d + 1 + 2 * s + 1 for k, d, s in zip(old.kernel_size, old.dilation, old.stride)]
        shape, modes = (2, old.in_channels, *hw), (False,)
    else:
        c = old.num_channels if isinstance(old, nn.GroupNorm) else old.num_features
        shape, modes = (3, c, 3, 2), (True, False)
    for training in modes:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        a.train(training)
        b.train(training)
        try:
            with torch.no_grad():
                ya = a(x.clone())
                if relu_after:
                    ya = torch.relu(ya)
                yb = b(x.clone())
        except Exception as e:
            return f"could not be checked numerically ({type(e).__name__}: {e})"
        pairs = [("output", ya, yb)]
        if isinstance(old, nn.BatchNorm2d):
            pairs += [(k, getattr(a, k), getattr(b, k)) for k in ("running_mean", "running_var", "num_batches_tracked")]
        for what, u, v in pairs:
            if (u is None) != (v is None):
                return f"{what} differs (None on one side) in {'training' if training else 'eval'} mode"
            if u is None:
                continue
            if u.shape != v.shape:
                return f"{what} shape {tuple(u.shape)} differs from bitfast's {tuple(v.shape)}"
            err = (u.double() - v.double()).abs().max().item()
            scale = max(u.double().abs().max().item(), 1e-30)
            if not err <= _RTOL * scale:
                return (
                    f"its {what} differs from bitfast's by {err / scale:.2e} (relative, float64, "
                    f"{'training' if training else 'eval'} mode): its math is not bitfast's (e.g. eps outside "
                    "the square root)"
                )
    return None


def _is_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _describe(model: nn.Module) -> str:
    counts = collections.Counter(type(m).__name__ for m in model.modules())
    return ", ".join(f"{n} {k}" for k, n in counts.most_common(8))


def patch(model: nn.Module, backend: str | None = None, *, strict: bool = True, verify: bool = True) -> PatchReport:
    """Swap ``model``'s BiT layers for bitfast's fused ones, in place (see the module docs).

    Args:
        model: any ``nn.Module`` (a timm BiT/ResNet-v2, or your own model using timm-style or
            plain torch layers). It is modified in place.
        backend: the backend fixed in every new bitfast module (default None: automatic).
        strict: raise ``PatchError`` (before changing anything) if a candidate cannot be
            reproduced exactly, or if the model has no candidate at all; with False, such
            modules are left unchanged and listed, with reasons, in the report.
        verify: check each candidate numerically in float64 before swapping it (default;
            costs one small forward per candidate). Turn off only for models whose layers
            are known to be timm's.

    Returns:
        A ``PatchReport``: what was replaced, what was left and why, and what was already
        bitfast. ``print(report)`` gives a summary.

    Raises:
        PatchError: (strict) refused candidates, listing each with its reason; or nothing
            bitfast can replace, listing the module types found.
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bitfast.patch: model must be an nn.Module; got {type(model).__name__}")
    if backend is not None:
        backends.requested_backend(backend)  # raises on an unknown name
    report = PatchReport()
    plans: list[_Plan] = []
    seen: dict[int, _Plan] = {}
    occurrences = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))

    def leave(name: str, m: nn.Module, reason: str, refused: bool = True) -> None:
        report.left.append(Left(name, type(m).__name__, reason, refused))

    def check(name: str, m: nn.Module, new: nn.Module, relu_after: bool = False) -> bool:
        reason = _probe(m, new, relu_after) if verify else None
        if reason:
            leave(name, m, reason)
            return False
        return True

    for parent_name, parent in model.named_modules():
        keys = [k for k, v in parent._modules.items() if v is not None]
        for i, key in enumerate(keys):
            m = parent._modules[key]
            name = f"{parent_name}.{key}" if parent_name else key
            if isinstance(m, _BITFAST):
                report.already.append(name)
                continue
            if id(m) in seen:  # a module shared under several names: same replacement everywhere
                p = seen[id(m)]
                if p.relu_key is None:
                    plans.append(_Plan(name, parent, key, m, p.new, p.note))
                continue
            cls = type(m).__name__
            if isinstance(m, nn.Conv2d) and cls in _STD_CONVS + _SCALED_STD_CONVS:
                new, note = _plan_conv(name, m, backend)
                if new is None:
                    leave(name, m, note)
                elif check(name, m, new):
                    seen[id(m)] = p = _Plan(name, parent, key, m, new, note)
                    plans.append(p)
            elif cls in _NORM_ACTS and isinstance(m, _NORM_ACTS[cls]):
                new, note = _plan_norm_act(name, m, backend)
                if new is None:
                    leave(name, m, note)
                elif check(name, m, new):
                    seen[id(m)] = p = _Plan(name, parent, key, m, new, note)
                    plans.append(p)
            elif "NormAct" in cls:
                leave(name, m, f"{cls} is not a norm-act module bitfast fuses (GroupNormAct, BatchNormAct2d)")
            elif type(m) in (nn.GroupNorm, nn.BatchNorm2d):
                nxt = parent._modules[keys[i + 1]] if i + 1 < len(keys) else None
                if not (_is_sequential(parent) and type(nxt) is nn.ReLU):
                    leave(name, m, "not followed by nn.ReLU in an nn.Sequential: nothing to fuse", refused=False)
                    continue
                reason = _common_refusal(m) or _common_refusal(nxt)
                if reason is None and (occurrences[id(m)] > 1 or occurrences[id(nxt)] > 1):
                    reason = "the norm or its ReLU is shared with another part of the model; fusing here would change it there"
                if reason:
                    leave(name, m, reason)
                    continue
                new = _fused_norm(m, True, backend)
                if check(name, m, new, relu_after=True):
                    seen[id(m)] = p = _Plan(name, parent, key, m, new, f"fused with the ReLU at {keys[i + 1]}",
                                            relu_key=keys[i + 1])
                    plans.append(p)

    if strict and report.refused:
        raise PatchError(
            f"bitfast.patch: {len(report.refused)} module(s) of {type(model).__name__} cannot be replaced exactly:\n"
            + "\n".join(f"  {x.name} ({x.kind}): {x.reason}" for x in report.refused)
            + "\npass strict=False to patch the rest and leave these as they are"
        )
    if strict and not plans and not report.already:
        raise PatchError(
            f"bitfast.patch: found nothing to replace in {type(model).__name__} (modules: {_describe(model)}); "
            "bitfast replaces timm-style StdConv2d/StdConv2dSame, GroupNormAct/BatchNormAct2d with ReLU, and "
            "nn.GroupNorm/nn.BatchNorm2d followed by nn.ReLU in an nn.Sequential"
        )
    for p in plans:
        p.new.train(p.old.training)
        p.parent._modules[p.key] = p.new
        if p.relu_key is not None:
            p.parent._modules[p.relu_key] = nn.Identity()
        report.replaced.append(Replaced(p.name, type(p.old).__name__, type(p.new).__name__, p.note))
    return report


def fused_optimizer(opt: torch.optim.Optimizer, *, backend: str | None = None) -> FusedSGD:
    """A ``FusedSGD`` equivalent to the ``torch.optim.SGD`` ``opt``: the same parameter
    tensors and groups, the same hyper-parameters, and a copy of its momentum buffers, so
    stepping it continues exactly where ``opt`` would have (same as ``FusedSGD.from_optimizer``).

    Raises:
        TypeError: ``opt`` is not a ``torch.optim.SGD`` (or ``FusedSGD``).
    """
    if not isinstance(opt, (torch.optim.SGD, FusedSGD)):
        raise TypeError(
            f"bitfast.patching.fused_optimizer: expected a torch.optim.SGD; got {type(opt).__name__} "
            "(only SGD with momentum has a fused bitfast equivalent)"
        )
    return FusedSGD.from_optimizer(opt, backend=backend)
