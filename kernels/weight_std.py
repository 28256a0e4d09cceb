"""Triton weight standardization (BiT's StdConv2d), forward and backward.

One program per BLOCK_O output channels (several when K is short, one when it is long);
each loops over the channels' K = Cin/groups * kh * kw elements in blocks. Statistics
are float32 (eps 1e-8 and 1e-10 vanish in half precision).
The weights are small (at most a few MB per conv), so two passes over a channel cost
little; launch count, not bandwidth, is what matters here (one launch per conv and
direction).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._formats import channels_last, memory_format


@triton.jit
def _ws_fwd_kernel(
    W,  # raw weight, (O, K) dense rows (see _rows)
    OUT,  # standardized weight, (O, K), W's dtype
    MEAN,  # per-channel mean, (O,) float32
    RSTD,  # per-channel 1/sqrt(var + eps), (O,) float32
    NUM_O,  # output channels
    K,  # elements per output channel
    eps,  # added to the biased variance
    BLOCK_O: tl.constexpr,  # output channels per program
    BLOCK: tl.constexpr,  # elements per loop step
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_mask = rows < NUM_O
    base = (rows * K)[:, None]
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK_O, BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        idx = start + offs
        m = row_mask[:, None] & (idx < K)[None, :]
        acc += tl.load(W + base + idx[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=1) / K
    # Second pass on the centred values: no cancellation for filters with a large mean.
    acc = tl.zeros([BLOCK_O, BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        idx = start + offs
        m = row_mask[:, None] & (idx < K)[None, :]
        w = tl.load(W + base + idx[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, w - mean[:, None], 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / K + eps)
    for start in range(0, K, BLOCK):
        idx = start + offs
        m = row_mask[:, None] & (idx < K)[None, :]
        w = tl.load(W + base + idx[None, :], mask=m, other=0.0).to(tl.float32)
        # Masked lanes hold (0 - mean) * rstd, which can overflow a half-precision cast.
        w_hat = tl.where(m, (w - mean[:, None]) * rstd[:, None], 0.0)
        tl.store(OUT + base + idx[None, :], w_hat.to(OUT.dtype.element_ty), mask=m)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _ws_bwd_kernel(
    G,  # gradient w.r.t. the standardized weight, (O, K) dense rows
    W,  # raw weight, (O, K) dense rows (see _rows)
    MEAN,  # saved per-channel mean, (O,) float32
    RSTD,  # saved per-channel rstd, (O,) float32
    DW,  # gradient w.r.t. the raw weight, (O, K), W's dtype
    NUM_O,  # output channels
    K,  # elements per output channel
    BLOCK_O: tl.constexpr,  # output channels per program
    BLOCK: tl.constexpr,  # elements per loop step
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_mask = rows < NUM_O
    base = (rows * K)[:, None]
    offs = tl.arange(0, BLOCK)
    mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)[:, None]
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
    sum_g = tl.zeros([BLOCK_O, BLOCK], dtype=tl.float32)
    sum_gw = tl.zeros([BLOCK_O, BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        idx = start + offs
        m = row_mask[:, None] & (idx < K)[None, :]
        g = tl.load(G + base + idx[None, :], mask=m, other=0.0).to(tl.float32)
        w_hat = (tl.load(W + base + idx[None, :], mask=m, other=0.0).to(tl.float32) - mean) * rstd
        sum_g += g
        sum_gw += tl.where(m, g * w_hat, 0.0)
    mean_g = (tl.sum(sum_g, axis=1) / K)[:, None]
    mean_gw = (tl.sum(sum_gw, axis=1) / K)[:, None]
    for start in range(0, K, BLOCK):
        idx = start + offs
        m = row_mask[:, None] & (idx < K)[None, :]
        g = tl.load(G + base + idx[None, :], mask=m, other=0.0).to(tl.float32)
        w_hat = (tl.load(W + base + idx[None, :], mask=m, other=0.0).to(tl.float32) - mean) * rstd
        dw = tl.where(m, rstd * (g - mean_g - w_hat * mean_gw), 0.0)
        tl.store(DW + base + idx[None, :], dw.to(DW.dtype.element_ty), mask=m)


def _block(k: int) -> int:
    return min(max(triton.next_power_of_2(k), 16), 2048)


def _block_o(o: int, block: int, device: torch.device) -> int:
    # Several output channels per program when K is short (1x1 convs). The interpreter (CPU
    # tensors) pays per program, not per element, so it gets larger tiles.
    tile = 4096 if device.type == "cuda" else 16384
    return max(1, min(triton.next_power_of_2(o), tile // block))


def _rows(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """The (O, K) view of a dense weight-shaped tensor in memory order: each output
    channel's K elements are one run, in (Cin, kh, kw) order or, channels_last (cl), in
    (kh, kw, Cin) order."""
    if cl:
        t = t.permute(0, 2, 3, 1)
    return t.view(t.shape[0], -1)


def weight_standardize_fwd(w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardized weight (``w``'s dtype; channels_last when ``w`` is, else contiguous)
    plus per-channel float32 ``mean`` and ``rstd``."""
    cl = channels_last(w)
    wc = w.contiguous(memory_format=memory_format(cl))
    out = torch.empty_like(wc)
    w2, out2 = _rows(wc, cl), _rows(out, cl)
    o, k = w2.shape
    mean = torch.empty(o, device=w.device, dtype=torch.float32)
    rstd = torch.empty(o, device=w.device, dtype=torch.float32)
    block = _block(k)
    block_o = _block_o(o, block, w.device)
    _ws_fwd_kernel[(triton.cdiv(o, block_o),)](w2, out2, mean, rstd, o, k, eps, BLOCK_O=block_o, BLOCK=block)
    return out, mean, rstd


def weight_standardize_bwd(
    grad_out: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """Gradient w.r.t. the raw weight, given the saved ``mean`` and ``rstd``, in ``w``'s
    memory format."""
    cl = channels_last(w)
    fmt = memory_format(cl)
    wc, gc = w.contiguous(memory_format=fmt), grad_out.contiguous(memory_format=fmt)
    dw = torch.empty_like(wc)
    w2, g2, dw2 = _rows(wc, cl), _rows(gc, cl), _rows(dw, cl)
    o, k = w2.shape
    block = _block(k)
    block_o = _block_o(o, block, w.device)
    _ws_bwd_kernel[(triton.cdiv(o, block_o),)](g2, w2, mean, rstd, dw2, o, k, BLOCK_O=block_o, BLOCK=block)
    return dw
