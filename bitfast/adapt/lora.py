"""Low-rank adaptation (LoRA; Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language
Models") of weight-standardized convolutions.

A wrapped conv computes ``std_conv2d(x, W + delta)`` with

``delta = (alpha / rank) * (A @ B^T).reshape(W.shape)``, ``A``: (out, rank), ``B``: (in/groups * kh * kw, rank).

The update is added to the raw weight *before* weight standardization, so the fused
weight-standardization op sees ``W + delta`` exactly as it would see a fine-tuned weight, and
merging the update into ``W`` gives an ordinary ``StdConv2d``. ``B`` starts at zero, so a freshly
wrapped model computes exactly what it computed before; ``A`` starts random so that ``B`` gets
a gradient from the first step.

State dicts: the wrapped conv keeps its ``weight`` (and ``bias``) key, so a base model's state
dict loads into a wrapped model with ``strict=False`` (only the LoRA keys are missing) and
``lora_state_dict`` / ``load_lora_state_dict`` save and restore the small adapter alone. Each
wrapped conv adds two keys: ``<conv name>.lora_A`` (out, rank) and ``<conv name>.lora_B``
(in/groups * kh * kw, rank).
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from bitfast.nn.layers import StdConv2d
from bitfast.ops import std_conv2d

__all__ = [
    "LoRAReport",
    "LoRAStdConv2d",
    "load_lora_state_dict",
    "lora",
    "lora_layers",
    "lora_parameters",
    "lora_report",
    "lora_state_dict",
    "merge",
    "unmerge",
    "unwrap",
]

Targets = Sequence[str] | Callable[[str, nn.Module], bool] | None


class LoRAStdConv2d(StdConv2d):
    """A ``StdConv2d`` with a trainable low-rank update of its raw weight.

    Build it from an existing conv with ``LoRAStdConv2d.from_conv`` (or let ``lora`` do it):
    the conv's ``weight`` and ``bias`` Parameters are shared, not copied.

    Attributes:
        lora_A: (out_channels, rank) Parameter, random at start.
        lora_B: (in_channels / groups * kh * kw, rank) Parameter, zero at start.
        rank, alpha, scaling (``alpha / rank``), lora_dropout (rank dropout probability).
        merged: whether the update is currently folded into ``weight``.

    ``lora_dropout`` drops whole rank-one components of the update (each of the ``rank``
    columns of ``A`` with probability ``p``, the rest scaled by ``1 / (1 - p)``) in training
    mode; input dropout, as in LoRA for linear layers, has no equivalent here because the
    update lives in weight space, before standardization.
    """

    @classmethod
    def from_conv(cls, conv: StdConv2d, rank: int, alpha: float | None = None, dropout: float = 0.0) -> LoRAStdConv2d:
        """Wrap ``conv`` (a bitfast ``StdConv2d``) with a rank-``rank`` update.

        Raises:
            TypeError: ``conv`` is not a ``StdConv2d`` (or is already a ``LoRAStdConv2d``).
            ValueError: ``rank`` outside [1, min(out, in/groups * kh * kw)], ``alpha <= 0``,
                ``dropout`` outside [0, 1).
        """
        if not isinstance(conv, StdConv2d) or isinstance(conv, LoRAStdConv2d):
            raise TypeError(
                f"LoRAStdConv2d.from_conv: expected a bitfast StdConv2d without LoRA; got {type(conv).__name__}"
            )
        out_ch, k = conv.weight.shape[0], conv.weight[0].numel()
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"lora: rank must be an int >= 1; got {rank!r}")
        if rank > min(out_ch, k):
            raise ValueError(
                f"lora: rank {rank} is larger than this conv allows: weight {tuple(conv.weight.shape)} has "
                f"{out_ch} output channels and {k} inputs per output channel (in/groups * kh * kw), so the "
                f"rank must be <= min({out_ch}, {k}) = {min(out_ch, k)}"
            )
        if alpha is None:
            alpha = rank
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"lora: alpha must be a finite number > 0 (or None for alpha = rank); got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora: dropout must be a number in [0, 1); got {dropout!r}")

        w = conv.weight
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, bias=conv.bias is not None, eps=conv.eps, backend=conv.backend, device="meta",
        )
        new.weight = w
        new.bias = conv.bias
        new.train(conv.training)
        new.rank = int(rank)
        new.alpha = float(alpha)
        new.scaling = float(alpha) / int(rank)
        new.lora_dropout = float(dropout)
        new.merged = False
        new.lora_A = nn.Parameter(torch.empty(out_ch, new.rank, device=w.device, dtype=w.dtype))
        new.lora_B = nn.Parameter(torch.zeros(k, new.rank, device=w.device, dtype=w.dtype))
        # A as nn.Linear(rank, out) initialises its weight: uniform(+-1/sqrt(rank)).
        nn.init.kaiming_uniform_(new.lora_A, a=math.sqrt(5))
        return new

    def delta_weight(self) -> torch.Tensor:
        """The update ``(alpha / rank) * A @ B^T`` reshaped to the kernel (rank dropout in training mode)."""
        a = self.lora_A
        if self.training and self.lora_dropout > 0:
            keep = torch.rand(self.rank, device=a.device) >= self.lora_dropout
            a = a * (keep.to(a.dtype) / (1.0 - self.lora_dropout))
        return (a @ self.lora_B.t()).mul(self.scaling).reshape(self.weight.shape)

    def effective_weight(self) -> torch.Tensor:
        """The raw (unstandardized) weight the conv uses in eval mode: ``weight`` when merged,
        else ``weight + delta`` (no dropout)."""
        if self.merged:
            return self.weight
        return self.weight + (self.lora_A @ self.lora_B.t()).mul(self.scaling).reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` with ``standardize(weight + delta)`` (``standardize(weight)`` when merged)."""
        w = self.weight if self.merged else self.weight + self.delta_weight()
        return std_conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups, self.eps,
                          backend=self.backend)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` (for inference: no extra work per forward).

        Raises:
            RuntimeError: already merged.
        """
        if self.merged:
            raise RuntimeError("LoRAStdConv2d.merge: the update is already merged into the weight; unmerge() first")
        self.weight.add_((self.lora_A @ self.lora_B.t()).mul(self.scaling).reshape(self.weight.shape))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from ``weight`` again (exact up to floating-point rounding).

        Raises:
            RuntimeError: not merged.
        """
        if not self.merged:
            raise RuntimeError("LoRAStdConv2d.unmerge: the update is not merged; nothing to undo")
        self.weight.sub_((self.lora_A @ self.lora_B.t()).mul(self.scaling).reshape(self.weight.shape))
        self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _default_target(name: str, module: nn.Module) -> bool:
    return not (name == "stem" or name.startswith("stem."))


def _select(model: nn.Module, targets: Targets) -> list[str]:
    convs = {n: m for n, m in model.named_modules() if isinstance(m, StdConv2d)}
    if targets is None:
        chosen = [n for n, m in convs.items() if _default_target(n, m)]
        if not chosen:
            raise ValueError(
                f"lora: found no bitfast StdConv2d outside the stem in {type(model).__name__} "
                f"({len(convs)} StdConv2d in all); pass targets=..., or bitfast.patch() a timm model first"
            )
        return chosen
    if callable(targets):
        chosen = [n for n, m in convs.items() if targets(n, m)]
        if not chosen:
            raise ValueError(f"lora: the targets predicate accepted none of the {len(convs)} StdConv2d layers")
        return chosen
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not all(isinstance(p, str) for p in targets):
        raise TypeError(
            f"lora: targets must be a list of name patterns (fnmatch, e.g. 'stages.3.*'), a predicate "
            f"(name, module) -> bool, or None; got {targets!r}"
        )
    all_names = [n for n, _ in model.named_modules()]
    chosen: list[str] = []
    for pat in targets:
        hits = [n for n in convs if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            others = [n for n in all_names if n and fnmatch.fnmatchcase(n, pat)]
            what = (
                f"it matches only {', '.join(f'{n} ({type(model.get_submodule(n)).__name__})' for n in others[:5])}"
                if others else "it matches no module"
            )
            raise ValueError(
                f"lora: target pattern {pat!r} selects no bitfast StdConv2d ({what}); LoRA wraps StdConv2d layers, "
                f"e.g. {', '.join(list(convs)[:3])}"
            )
        chosen.extend(n for n in hits if n not in chosen)
    return chosen


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    targets: Targets = None,
    dropout: float = 0.0,
    trainable: Sequence[str] = ("head.*",),
) -> nn.Module:
    """Wrap ``model``'s StdConv layers with LoRA updates, in place, and freeze the base model.

    Args:
        model: a model built from bitfast ``StdConv2d`` layers (a ``ResNetV2``, or a timm
            model after ``bitfast.patch``).
        rank: the rank ``r`` of every update; must be <= min(out, in/groups * kh * kw) of
            each targeted conv.
        alpha: the update is scaled by ``alpha / rank``; default None means ``alpha = rank``
            (scale 1).
        targets: which convs to wrap: None (default) wraps every ``StdConv2d`` except the
            stem's (names ``stem`` and ``stem.*``); a list of ``fnmatch`` patterns of module
            names (``["stages.2.*", "stages.3.*"]``), each of which must select at least one
            StdConv2d; or a predicate ``(name, module) -> bool`` called for every StdConv2d.
        dropout: rank-dropout probability in training mode (see ``LoRAStdConv2d``).
        trainable: ``fnmatch`` patterns of parameter names that stay trainable besides the
            LoRA factors (default ``("head.*",)``: a fresh classifier must train); every
            other parameter gets ``requires_grad=False``.

    Returns:
        ``model`` itself. Optimize ``[p for p in model.parameters() if p.requires_grad]``
        (or ``lora_parameters(model)`` plus the head).

    Raises:
        ValueError: bad rank (too large for a layer), alpha, dropout or targets; a model that
            already has LoRA layers; a model that is itself a single conv.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lora: model must be an nn.Module; got {type(model).__name__}")
    existing = [n for n, _ in lora_layers(model)]
    if existing:
        raise ValueError(f"lora: the model already has LoRA layers ({', '.join(existing[:3])}, ...); unwrap() it first")
    if isinstance(model, StdConv2d):
        raise ValueError("lora: model is a single StdConv2d; use LoRAStdConv2d.from_conv(conv, rank) for it")
    if isinstance(trainable, str) or not all(isinstance(p, str) for p in trainable):
        raise TypeError(f"lora: trainable must be a sequence of fnmatch patterns; got {trainable!r}")
    names = _select(model, targets)
    # Build every wrapper first (this validates the rank for every layer), then swap.
    wrapped = {n: LoRAStdConv2d.from_conv(model.get_submodule(n), rank, alpha, dropout) for n in names}
    for n, m in wrapped.items():
        _set_submodule(model, n, m)
    for n, p in model.named_parameters():
        is_lora = n.endswith(".lora_A") or n.endswith(".lora_B")
        p.requires_grad_(is_lora or any(fnmatch.fnmatchcase(n, pat) for pat in trainable))
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRAStdConv2d]]:
    """``(name, layer)`` for every ``LoRAStdConv2d`` in ``model``."""
    for n, m in model.named_modules():
        if isinstance(m, LoRAStdConv2d):
            yield n, m


def _require_layers(fn: str, model: nn.Module) -> list[tuple[str, LoRAStdConv2d]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{fn}: {type(model).__name__} has no LoRA layers; call bitfast.adapt.lora(model, rank=...) first")
    return layers


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The LoRA factors (``lora_A``, ``lora_B`` of every wrapped conv), e.g. for an optimizer."""
    for _, m in lora_layers(model):
        yield m.lora_A
        yield m.lora_B


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (in place; returns ``model``).

    Raises:
        ValueError: no LoRA layers. RuntimeError: some layer already merged (merge twice).
    """
    layers = _require_layers("merge", model)
    done = [n for n, m in layers if m.merged]
    if done:
        raise RuntimeError(f"merge: LoRA updates already merged ({', '.join(done[:3])}); unmerge() first")
    for _, m in layers:
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge`` (in place; returns ``model``); exact up to floating-point rounding.

    Raises:
        ValueError: no LoRA layers. RuntimeError: some layer not merged.
    """
    layers = _require_layers("unmerge", model)
    todo = [n for n, m in layers if not m.merged]
    if todo:
        raise RuntimeError(f"unmerge: LoRA updates not merged ({', '.join(todo[:3])}); nothing to undo")
    for _, m in layers:
        m.unmerge()
    return model


@torch.no_grad()
def unwrap(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by a plain ``StdConv2d`` holding the merged weight (in place;
    returns ``model``). The state dict then has the base model's keys only."""
    layers = _require_layers("unwrap", model)
    for n, m in layers:
        if not m.merged:
            m.merge()
        conv = StdConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                         bias=m.bias is not None, eps=m.eps, backend=m.backend, device="meta")
        conv.weight = m.weight
        conv.bias = m.bias
        conv.train(m.training)
        if n:
            _set_submodule(model, n, conv)
    return model


def _is_lora_key(key: str) -> bool:
    return key.endswith(".lora_A") or key.endswith(".lora_B") or key in ("lora_A", "lora_B")


def lora_state_dict(model: nn.Module, include_trainable: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors: every ``*.lora_A`` / ``*.lora_B``, plus every other trainable
    parameter (e.g. the head) when ``include_trainable``. Detached, sharing storage, as
    ``state_dict()``."""
    _require_layers("lora_state_dict", model)
    out = {}
    for n, p in model.named_parameters():
        if _is_lora_key(n) or (include_trainable and p.requires_grad):
            out[n] = p.detach()
    return out


def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a ``lora_state_dict`` into a model wrapped with the same targets and rank.

    Raises:
        KeyError: a key the model lacks, or LoRA factors of the model missing from ``state``.
        ValueError: a tensor of the wrong shape; the model's layers merged.
    """
    layers = _require_layers("load_lora_state_dict", model)
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise ValueError(f"load_lora_state_dict: layers are merged ({', '.join(merged[:3])}); unmerge() first")
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise KeyError(f"load_lora_state_dict: keys not in the model: {unknown[:5]}")
    missing = [k for k in params if _is_lora_key(k) and k not in state]
    if missing:
        raise KeyError(f"load_lora_state_dict: LoRA factors missing from the state dict: {missing[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(params[k].shape):
            raise ValueError(
                f"load_lora_state_dict: {k} has shape {tuple(v.shape)}; the model's is {tuple(params[k].shape)} "
                "(a different rank?)"
            )
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


@dataclass
class LoRAReport:
    """What LoRA trains and the memory it saves against full fine-tuning.

    Byte counts are for the optimizer state (``states_per_param`` tensors of each trained
    parameter's size: 1 for SGD with momentum, 2 for Adam) and for the gradients.
    """

    layers: int
    rank: list[int]
    total_params: int
    trainable_params: int
    lora_params: int
    states_per_param: int
    optimizer_bytes_full: int
    optimizer_bytes_lora: int
    grad_bytes_full: int
    grad_bytes_lora: int
    per_layer: list[tuple[str, int, int]] = field(default_factory=list)  # (name, base numel, lora numel)

    @property
    def trainable_fraction(self) -> float:
        """Trainable parameters over all parameters."""
        return self.trainable_params / max(self.total_params, 1)

    @property
    def optimizer_bytes_saved(self) -> int:
        """Optimizer-state bytes full fine-tuning needs and LoRA does not."""
        return self.optimizer_bytes_full - self.optimizer_bytes_lora

    def __str__(self) -> str:
        mib = 1024.0**2
        return (
            f"LoRA: {self.layers} convs wrapped (rank {sorted(set(self.rank))}); trainable "
            f"{self.trainable_params:,} of {self.total_params:,} parameters ({100 * self.trainable_fraction:.2f}%), "
            f"{self.lora_params:,} of them LoRA factors\n"
            f"optimizer state ({self.states_per_param} per parameter): full fine-tuning "
            f"{self.optimizer_bytes_full / mib:.2f} MiB, LoRA {self.optimizer_bytes_lora / mib:.2f} MiB "
            f"(saves {self.optimizer_bytes_saved / mib:.2f} MiB); gradients {self.grad_bytes_full / mib:.2f} -> "
            f"{self.grad_bytes_lora / mib:.2f} MiB"
        )


def lora_report(model: nn.Module, states_per_param: int = 1) -> LoRAReport:
    """Count trainable and LoRA parameters and the optimizer/gradient memory LoRA saves.

    "Full fine-tuning" trains every parameter of the model except the LoRA factors;
    "LoRA" trains the parameters with ``requires_grad`` (the factors and e.g. the head).

    Args:
        states_per_param: optimizer tensors per trained parameter (SGD momentum: 1, Adam: 2).
    """
    layers = _require_layers("lora_report", model)
    if isinstance(states_per_param, bool) or not isinstance(states_per_param, int) or states_per_param < 0:
        raise ValueError(f"lora_report: states_per_param must be an int >= 0; got {states_per_param!r}")
    total = trainable = n_lora = full_bytes = lora_bytes = 0
    for n, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if _is_lora_key(n):
            n_lora += p.numel()
        else:
            full_bytes += size
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            lora_bytes += size
    return LoRAReport(
        layers=len(layers),
        rank=[m.rank for _, m in layers],
        total_params=total,
        trainable_params=trainable,
        lora_params=n_lora,
        states_per_param=states_per_param,
        optimizer_bytes_full=full_bytes * states_per_param,
        optimizer_bytes_lora=lora_bytes * states_per_param,
        grad_bytes_full=full_bytes,
        grad_bytes_lora=lora_bytes,
        per_layer=[(n, m.weight.numel(), m.lora_A.numel() + m.lora_B.numel()) for n, m in layers],
    )
