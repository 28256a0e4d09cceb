"""Triton weight standardization (BiT's StdConv2d), forward and backward.

One program per output channel; each loops over the channel's K = Cin/groups * kh * kw
elements in blocks. Statistics are float32 (eps 1e-8 and 1e-10 vanish in half precision).
The weights are small (at most a few MB per conv), so two passes over a channel cost
little; launch count, not bandwidth, is what matters here (one launch per conv and
direction).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ws_fwd_kernel(
    W,  # raw weight, (O, K) contiguous
    OUT,  # standardized weight, (O, K), W's dtype
    MEAN,  # per-channel mean, (O,) float32
    RSTD,  # per-channel 1/sqrt(var + eps), (O,) float32
    K,  # elements per output channel
    eps,  # added to the biased variance
    BLOCK: tl.constexpr,  # elements per loop step
):
    row = tl.program_id(0).to(tl.int64)
    base = row * K
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        idx = start + offs
        acc += tl.load(W + base + idx, mask=idx < K, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / K
    # Second pass on the centred values: no cancellation for filters with a large mean.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        idx = start + offs
        w = tl.load(W + base + idx, mask=idx < K, other=0.0).to(tl.float32)
        d = tl.where(idx < K, w - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / K + eps)
    for start in range(0, K, BLOCK):
        idx = start + offs
        m = idx < K
        w = tl.load(W + base + idx, mask=m, other=0.0).to(tl.float32)
        # Masked lanes hold (0 - mean) * rstd, which can overflow a half-precision cast.
        w_hat = tl.where(m, (w - mean) * rstd, 0.0)
        tl.store(OUT + base + idx, w_hat.to(OUT.dtype.element_ty), mask=m)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _ws_bwd_kernel(
    G,  # gradient w.r.t. the standardized weight, (O, K) contiguous
    W,  # raw weight, (O, K) contiguous
    MEAN,  # saved per-channel mean, (O,) float32
    RSTD,  # saved per-channel rstd, (O,) float32
    DW,  # gradient w.r.t. the raw weight, (O, K), W's dtype
    K,  # elements per output channel
    BLOCK: tl.constexpr,  # elements per loop step
):
    row = tl.program_id(0).to(tl.int64)
    base = row * K
    offs = tl.arange(0, BLOCK)
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    sum_g = tl.zeros([BLOCK], dtype=tl.float32)
    sum_gw = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        idx = start + offs
        m = idx < K
        g = tl.load(G + base + idx, mask=m, other=0.0).to(tl.float32)
        w_hat = (tl.load(W + base + idx, mask=m, other=0.0).to(tl.float32) - mean) * rstd
        sum_g += g
        sum_gw += tl.where(m, g * w_hat, 0.0)
    mean_g = tl.sum(sum_g, axis=0) / K
    mean_gw = tl.sum(sum_gw, axis=0) / K
    for start in range(0, K, BLOCK):
        idx = start + offs
        m = idx < K
        g = tl.load(G + base + idx, mask=m, other=0.0).to(tl.float32)
        w_hat = (tl.load(W + base + idx, mask=m, other=0.0).to(tl.float32) - mean) * rstd
        dw = tl.where(m, rstd * (g - mean_g - w_hat * mean_gw), 0.0)
        tl.store(DW + base + idx, dw.to(DW.dtype.element_ty), mask=m)


def _block(k: int) -> int:
    return min(max(triton.next_power_of_2(k), 16), 2048)


def weight_standardize_fwd(w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardized weight (``w``'s dtype) plus per-channel float32 ``mean`` and ``rstd``."""
    w2 = w.contiguous().reshape(w.shape[0], -1)
    o, k = w2.shape
    out = torch.empty_like(w2)
    mean = torch.empty(o, device=w.device, dtype=torch.float32)
    rstd = torch.empty(o, device=w.device, dtype=torch.float32)
    _ws_fwd_kernel[(o,)](w2, out, mean, rstd, k, eps, BLOCK=_block(k))
    return out.reshape(w.shape), mean, rstd


def weight_standardize_bwd(
    grad_out: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """Gradient w.r.t. the raw weight, given the saved ``mean`` and ``rstd``."""
    g2 = grad_out.contiguous().reshape(w.shape[0], -1)
    w2 = w.contiguous().reshape(w.shape[0], -1)
    o, k = w2.shape
    dw = torch.empty_like(w2)
    _ws_bwd_kernel[(o,)](g2, w2, mean, rstd, dw, k, BLOCK=_block(k))
    return dw.reshape(w.shape)
