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
def _ws_fwd_rows(
    W,  # the raw weight's first element
    OUT,  # the standardized weight's first element (its element type is the output's)
    base,  # (BLOCK_O, 1) offset of each row's first element from W and OUT
    row_mask,  # (BLOCK_O,) which rows exist
    K,  # elements per row
    eps,
    BLOCK_O: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Standardize BLOCK_O rows of K elements from W into OUT; returns their mean and rstd."""
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
    return mean, rstd


@triton.jit
def _ws_bwd_rows(
    G,  # the gradient of the standardized weight's first element
    W,  # the raw weight's first element
    DW,  # the weight gradient's first element (its element type is the result's)
    base,  # (BLOCK_O, 1) offset of each row's first element from G, W and DW
    row_mask,  # (BLOCK_O,) which rows exist
    mean,  # (BLOCK_O, 1) the rows' saved means
    rstd,  # (BLOCK_O, 1) the rows' saved rstd
    K,  # elements per row
    BLOCK_O: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The gradients of BLOCK_O rows of K elements with respect to the raw weight, into DW."""
    offs = tl.arange(0, BLOCK)
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
    mean, rstd = _ws_fwd_rows(W, OUT, (rows * K)[:, None], row_mask, K, eps, BLOCK_O, BLOCK)
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
    mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)[:, None]
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
    _ws_bwd_rows(G, W, DW, (rows * K)[:, None], row_mask, mean, rstd, K, BLOCK_O, BLOCK)


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


# --- a list of weights in one launch ----------------------------------------------------
#
# Every program standardizes BLOCK_O output channels of one weight. A table of int64 rows,
# one per program, says which: the address of that weight, where its elements start in the
# flat buffers (outputs; in the backward gradients and weight gradients too), its K, the
# program's first channel in the weight and how many channels it has, and where the weight's
# channels start in the statistics (which hold every weight's channels one after the other,
# as the per-weight op's would concatenated). Every weight's channels are dense (O, K) rows
# in its memory order (see _rows), so an address and K place them; the outputs are views of
# one flat buffer, each with its weight's shape and memory format, and the backward reads the
# gradients from one flat buffer too (one concatenation). The table then holds only the
# weights' addresses and fixed offsets: for a model's parameters it is the same on every
# step, made and copied to the device once, and a CUDA graph capture needs no copy at all.
# The row arithmetic is the per-weight kernels' own; the tiles are one size for the whole
# list (see _multi_tiles), so a weight's statistics may round differently from the
# per-weight op's (whose tiles fit its own K): equal within the parity rule.

@triton.jit
def _ws_multi_fwd_kernel(
    TABLE,  # (programs, 6) int64, see above
    TY,  # any tensor of the weights' dtype (gives the element type of the addresses)
    OUT,  # the standardized weights, one after the other in memory order, flat
    MEAN,  # per-channel means of every weight, (sum O,) float32
    RSTD,  # per-channel rstd of every weight, (sum O,) float32
    eps,
    BLOCK_O: tl.constexpr,
    BLOCK: tl.constexpr,
):
    entry = TABLE + tl.program_id(0).to(tl.int64) * 6
    W = tl.load(entry).to(tl.pointer_type(TY.dtype.element_ty))
    K = tl.load(entry + 2)
    local = tl.arange(0, BLOCK_O).to(tl.int64)
    row_mask = local < tl.load(entry + 4)
    rows = tl.load(entry + 3) + local
    stats = tl.load(entry + 5) + rows
    mean, rstd = _ws_fwd_rows(W, OUT + tl.load(entry + 1), (rows * K)[:, None], row_mask, K, eps, BLOCK_O, BLOCK)
    tl.store(MEAN + stats, mean, mask=row_mask)
    tl.store(RSTD + stats, rstd, mask=row_mask)


@triton.jit
def _ws_multi_bwd_kernel(
    TABLE,  # (programs, 6) int64, see above
    TY,  # any tensor of the weights' dtype
    G,  # the gradients of the standardized weights, flat as OUT was
    DW,  # the gradients of the weights, flat likewise, the weights' dtype
    MEAN,  # saved per-channel means, (sum O,) float32
    RSTD,  # saved per-channel rstd, (sum O,) float32
    BLOCK_O: tl.constexpr,
    BLOCK: tl.constexpr,
):
    entry = TABLE + tl.program_id(0).to(tl.int64) * 6
    W = tl.load(entry).to(tl.pointer_type(TY.dtype.element_ty))
    offset = tl.load(entry + 1)
    K = tl.load(entry + 2)
    local = tl.arange(0, BLOCK_O).to(tl.int64)
    row_mask = local < tl.load(entry + 4)
    rows = tl.load(entry + 3) + local
    stats = tl.load(entry + 5) + rows
    mean = tl.load(MEAN + stats, mask=row_mask, other=0.0)[:, None]
    rstd = tl.load(RSTD + stats, mask=row_mask, other=0.0)[:, None]
    _ws_bwd_rows(G + offset, W, DW + offset, (rows * K)[:, None], row_mask, mean, rstd, K, BLOCK_O, BLOCK)


# Launch tables by (device, content). A model's weights stay where they are, so its table is
# made and copied to the device on the first call and found again on every later one; a few
# are kept. One used inside a CUDA graph capture is kept for good (the graph reads it on
# every replay); one first made inside a capture is copied from pinned host memory that is
# kept too (a warm-up call before the capture, as CUDA graph capture requires anyway, avoids
# that).
_TABLES: dict = {}
_TABLES_KEPT = 16
_CAPTURED: list = []


def _table(device: torch.device, columns: list[tuple[int, ...]]) -> torch.Tensor:
    key = (device, tuple(columns))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    table = _TABLES.get(key)
    host = None
    if table is None:
        host = torch.tensor(columns, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        table = host.to(device, non_blocking=True)
        if not capturing:
            if len(_TABLES) >= _TABLES_KEPT:
                _TABLES.pop(next(iter(_TABLES)))
            _TABLES[key] = table
    if capturing:
        _CAPTURED.append((host, table))  # replays read them: never freed
    return table


def _multi_tiles(ks: list[int], os: list[int], device: torch.device) -> tuple[int, int]:
    # (channels per program, elements per loop step) of one launch for rows of many lengths:
    # steps fit the shortest row (at most 128 wide) and long rows loop, rather than steps
    # fitting the longest row, which left the 1x1 convs' short rows mostly masked (R50x1
    # under the interpreter: 5.5 s each way against 23 s with steps of 2048).
    block = min(max(triton.next_power_of_2(min(ks)), 16), 128)
    return _block_o(max(os), block, device), block


def _in_memory_order(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """``t`` (weight-shaped, dense in its format) as the flat run of its elements in memory
    order (a view)."""
    return (t.permute(0, 2, 3, 1) if cl else t).reshape(-1)


def _views(flat: torch.Tensor, like: list[torch.Tensor], cls: list[bool]) -> list[torch.Tensor]:
    """Views of ``flat`` with the shapes and memory formats of ``like``, one after the other."""
    views, at = [], 0
    for w, cl in zip(like, cls):
        n = w.numel()
        chunk = flat[at:at + n]
        if cl:
            o, c, h, k = w.shape
            views.append(chunk.view(o, h, k, c).permute(0, 3, 1, 2))
        else:
            views.append(chunk.view(w.shape))
        at += n
    return views


def _launch(ws: list[torch.Tensor]):
    """The dense weights, their layouts, the launch table and the tiles of a list."""
    cls = [channels_last(w) for w in ws]
    wc = _dense(ws, cls)
    os_ = [w.shape[0] for w in wc]
    ks = [w.numel() // w.shape[0] for w in wc]
    device = wc[0].device
    block_o, block = _multi_tiles(ks, os_, device)
    columns, at, stat0 = [], 0, 0
    for w, o, k in zip(wc, os_, ks):
        for first in range(0, o, block_o):
            columns.append((w.data_ptr(), at, k, first, min(block_o, o - first), stat0))
        at += w.numel()
        stat0 += o
    return wc, cls, _table(device, columns), len(columns), block_o, block


def _dense(ts, cls) -> list[torch.Tensor]:
    return [t.contiguous(memory_format=memory_format(cl)) for t, cl in zip(ts, cls)]


def weight_standardize_multi_fwd(ws: list[torch.Tensor], eps: float, out_dtype: torch.dtype | None = None):
    """Every weight of ``ws`` standardized in one launch: the standardized weights (each with
    its weight's shape and memory format, in ``out_dtype`` or else the weights' dtype; views
    of one buffer) and the float32 ``mean`` and ``rstd`` of every weight's channels, one
    weight after the other."""
    wc, cls, table, programs, block_o, block = _launch(ws)
    device = wc[0].device
    flat = torch.empty(sum(w.numel() for w in wc), device=device, dtype=out_dtype or wc[0].dtype)
    rows = sum(w.shape[0] for w in wc)
    mean = torch.empty(rows, device=device, dtype=torch.float32)
    rstd = torch.empty(rows, device=device, dtype=torch.float32)
    _ws_multi_fwd_kernel[(programs,)](table, wc[0], flat, mean, rstd, eps, BLOCK_O=block_o, BLOCK=block)
    return _views(flat, wc, cls), mean, rstd


def weight_standardize_multi_bwd(grad_outs: list[torch.Tensor], ws: list[torch.Tensor], mean: torch.Tensor,
                                 rstd: torch.Tensor) -> list[torch.Tensor]:
    """The gradients with respect to every raw weight of ``ws`` in one launch, given the
    gradients of the standardized weights (in any floating dtype; they are gathered into one
    buffer of the first one's dtype) and the saved statistics; each in its weight's dtype and
    memory format (views of one buffer)."""
    wc, cls, table, programs, block_o, block = _launch(ws)
    gdtype = grad_outs[0].dtype
    g = torch.cat([_in_memory_order(t.to(gdtype).contiguous(memory_format=memory_format(cl)), cl)
                   for t, cl in zip(grad_outs, cls)])
    dw = torch.empty(g.numel(), device=g.device, dtype=wc[0].dtype)
    _ws_multi_bwd_kernel[(programs,)](table, wc[0], g, dw, mean, rstd, BLOCK_O=block_o, BLOCK=block)
    return _views(dw, wc, cls)
