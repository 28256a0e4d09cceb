"""Post-training compression of exported bitfast models: magnitude pruning and int8 weights.

Both work on a model from ``bitfast.export.for_inference``, whose conv weights are the
*standardized* weights. They refuse models that still standardize on the fly: zeroing (or
rounding) a raw weight does not survive standardization, since ``(w - mean) / std`` moves
every zero to ``-mean / std``.

* ``prune_magnitude``: unstructured (single weights) or structured (whole output channels)
  magnitude pruning, over all layers at once (``scope="global"``) or layer by layer, in place.
  Unstructured pruning zeroes exactly ``round(amount * n)`` weights. Structured pruning ranks
  output channels by their mean absolute weight: the L2 norm would not do, because every
  standardized channel has the same L2 norm (``sqrt(fan_in)``: zero mean, unit variance).
* ``quantize_int8``: symmetric per-output-channel int8 weights (``scale = max|w_c| / 127``)
  for every ``nn.Conv2d`` and ``nn.Linear``, dequantized on the fly in forward
  (``bitfast.plain_model.Int8Conv2d`` / ``Int8Linear``, plain torch, scriptable), in place.
"""

from __future__ import annotations

import fnmatch
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from bitfast import plain_model
from bitfast.nn.layers import StdConv2d

__all__ = ["PruneReport", "QuantReport", "prune_magnitude", "quantize_int8"]


def _refuse_standardizing(fn: str, model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module; got {type(model).__name__}")
    std = [n or type(model).__name__ for n, m in model.named_modules() if isinstance(m, StdConv2d)]
    if std:
        raise ValueError(
            f"{fn}: the model standardizes conv weights on every forward ({', '.join(std[:3])}"
            f"{', ...' if len(std) > 3 else ''}); a change to a raw weight does not survive standardization. "
            f"Export first: {fn}(bitfast.export.for_inference(model), ...)"
        )


@dataclass
class PruneReport:
    """Sparsity after ``prune_magnitude``: per layer ``(name, weights, zeros, channels zeroed)``,
    and the metric before and after when an ``eval_fn`` was given."""

    amount: float
    structured: bool
    scope: str
    layers: list[tuple[str, int, int, int]] = field(default_factory=list)
    metric_before: float | None = None
    metric_after: float | None = None

    @property
    def total(self) -> int:
        """Weights in the pruned layers."""
        return sum(n for _, n, _, _ in self.layers)

    @property
    def zeros(self) -> int:
        """Zero weights in the pruned layers."""
        return sum(z for _, _, z, _ in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over the pruned layers."""
        return self.zeros / max(self.total, 1)

    def __str__(self) -> str:
        kind = "structured (output channels)" if self.structured else "unstructured"
        lines = [f"pruned {kind}, {self.scope}, amount {self.amount:g}: sparsity {100 * self.sparsity:.2f}% "
                 f"({self.zeros:,} of {self.total:,} weights in {len(self.layers)} layers)"]
        if self.metric_before is not None:
            lines.append(f"metric before {self.metric_before:.4f}, after {self.metric_after:.4f}")
        lines += [f"  {n}: {100 * z / max(t, 1):.1f}% of {t:,}" + (f", {c} channels" if self.structured else "")
                  for n, t, z, c in self.layers]
        return "\n".join(lines)


def _prunable(model: nn.Module, exclude: Sequence[str]) -> list[tuple[str, nn.Conv2d]]:
    return [
        (n, m) for n, m in model.named_modules()
        if type(m) is nn.Conv2d and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]


@torch.no_grad()
def prune_magnitude(
    model: nn.Module,
    amount: float,
    structured: bool = False,
    scope: str = "global",
    exclude: Sequence[str] = ("head.*",),
    eval_fn: Callable[[nn.Module], float] | None = None,
) -> PruneReport:
    """Zero the smallest-magnitude standardized conv weights of an exported model, in place.

    Args:
        model: a model from ``bitfast.export.for_inference`` (its ``nn.Conv2d`` weights are
            the standardized ones).
        amount: fraction to prune, in [0, 1]: of the weights (unstructured) or of the output
            channels (structured), counted over all pruned layers (``scope="global"``) or in
            each layer (``scope="layer"``), rounded to the nearest whole count.
        structured: zero whole output channels (their weights; a conv bias, e.g. a folded
            BatchNorm's, is kept) ranked by mean absolute weight, instead of single weights.
        scope: ``"global"`` (one threshold over all layers) or ``"layer"``.
        exclude: ``fnmatch`` patterns of module names left alone (default: the classifier).
        eval_fn: optional ``eval_fn(model) -> float`` (e.g. accuracy on an eval set), run
            before and after; the values go into the report.

    Returns:
        A ``PruneReport`` (per-layer and total sparsity; the metric before and after).

    Raises:
        ValueError: ``amount`` outside [0, 1], an unknown ``scope``, no prunable conv, or a
            model that still standardizes its weights (export it first).
    """
    _refuse_standardizing("prune_magnitude", model)
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not 0.0 <= float(amount) <= 1.0:
        raise ValueError(f"prune_magnitude: amount must be a fraction in [0, 1]; got {amount!r}")
    if scope not in ("global", "layer"):
        raise ValueError(f"prune_magnitude: scope must be 'global' or 'layer'; got {scope!r}")
    layers = _prunable(model, exclude)
    if not layers:
        raise ValueError(
            f"prune_magnitude: {type(model).__name__} has no nn.Conv2d outside {list(exclude)} to prune"
        )
    report = PruneReport(float(amount), bool(structured), scope)
    if eval_fn is not None:
        report.metric_before = float(eval_fn(model))

    # Scores: one per weight (unstructured) or per output channel (structured).
    scores = []
    for _, m in layers:
        w = m.weight.detach().float()
        scores.append(w.abs().reshape(w.shape[0], -1).mean(dim=1) if structured else w.abs().reshape(-1))
    masks = []  # True = prune
    if scope == "layer":
        for s in scores:
            k = int(round(float(amount) * s.numel()))
            mask = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
            if k:
                mask[torch.topk(s, k, largest=False).indices] = True
            masks.append(mask)
    else:
        flat = torch.cat([s.to("cpu") for s in scores])
        k = int(round(float(amount) * flat.numel()))
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        if k:
            mask[torch.topk(flat, k, largest=False).indices] = True
        off = 0
        for s in scores:
            masks.append(mask[off:off + s.numel()].to(s.device))
            off += s.numel()

    for (name, m), mask in zip(layers, masks):
        w = m.weight
        # The masks index weights in logical (row-major) order, whatever the memory layout.
        w.masked_fill_(mask.view(-1, *([1] * (w.dim() - 1))) if structured else mask.view(w.shape), 0)
        channels = int(mask.sum()) if structured else 0
        report.layers.append((name, w.numel(), int((w == 0).sum()), channels))
    if eval_fn is not None:
        report.metric_after = float(eval_fn(model))
    return report


@dataclass
class QuantReport:
    """Sizes after ``quantize_int8``: per layer ``(name, kind, weight bytes before, after,
    max abs weight error)``, and the whole model's parameter + buffer bytes before and after."""

    layers: list[tuple[str, str, int, int, float]] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0

    @property
    def weight_bytes_before(self) -> int:
        """Bytes of the quantized layers' float weights."""
        return sum(b for _, _, b, _, _ in self.layers)

    @property
    def weight_bytes_after(self) -> int:
        """Bytes of their int8 weights and float32 scales."""
        return sum(a for _, _, _, a, _ in self.layers)

    @property
    def compression(self) -> float:
        """Model bytes before over after."""
        return self.model_bytes_before / max(self.model_bytes_after, 1)

    def __str__(self) -> str:
        mib = 1024.0**2
        return (
            f"int8 weights in {len(self.layers)} layers: weights {self.weight_bytes_before / mib:.2f} -> "
            f"{self.weight_bytes_after / mib:.2f} MiB; model {self.model_bytes_before / mib:.2f} -> "
            f"{self.model_bytes_after / mib:.2f} MiB ({self.compression:.2f}x smaller); max weight error "
            f"{max((e for *_, e in self.layers), default=0.0):.3g}"
        )


def _model_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weight, float32 scale (O,))."""
    wf = w.detach().float().reshape(w.shape[0], -1)
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


@torch.no_grad()
def quantize_int8(model: nn.Module, exclude: Sequence[str] = ()) -> QuantReport:
    """Quantize the weights of every ``nn.Conv2d`` and ``nn.Linear`` of an exported model to
    int8 with one symmetric float32 scale per output channel, in place.

    Each such layer becomes ``bitfast.plain_model.Int8Conv2d`` / ``Int8Linear`` (buffers
    ``weight_int8``, ``weight_scale``; the bias stays in float), which dequantizes in forward;
    activations stay in floating point (weight-only quantization: 4x smaller weights, the
    same compute).

    Args:
        model: a model from ``bitfast.export.for_inference``.
        exclude: ``fnmatch`` patterns of module names to keep in float. Convs with string
            padding (``"same"``) or a non-zero padding mode are kept in float too.

    Returns:
        A ``QuantReport`` with the size savings and each layer's largest weight error.

    Raises:
        ValueError: a model that still standardizes its weights (export it first), or one
            with nothing to quantize.
    """
    _refuse_standardizing("quantize_int8", model)
    report = QuantReport(model_bytes_before=_model_bytes(model))
    targets = [
        (n, m) for n, m in model.named_modules()
        if n and type(m) in (nn.Conv2d, nn.Linear) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]
    if not targets:
        raise ValueError(f"quantize_int8: {type(model).__name__} has no nn.Conv2d or nn.Linear (outside exclude) to quantize")
    for name, m in targets:
        if isinstance(m, nn.Conv2d) and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
            continue  # the int8 conv pads with explicit zeros only
        q, scale = _quantize(m.weight)
        if isinstance(m, nn.Conv2d):
            new = plain_model.Int8Conv2d(m.in_channels, m.out_channels, list(m.kernel_size), list(m.stride),
                                         list(m.padding), list(m.dilation), m.groups, m.bias is not None)
            kind = "conv"
        else:
            new = plain_model.Int8Linear(m.in_features, m.out_features, m.bias is not None)
            kind = "linear"
        new.to(m.weight.device)
        new.weight_int8.copy_(q)
        new.weight_scale.copy_(scale)
        if m.bias is not None:
            new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        new.train(m.training)
        err = (new.dequantized_weight() - m.weight.float()).abs().max().item()
        before = m.weight.numel() * m.weight.element_size()
        after = q.numel() + scale.numel() * scale.element_size()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        report.layers.append((name, kind, before, after, err))
    report.model_bytes_after = _model_bytes(model)
    return report
