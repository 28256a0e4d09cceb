"""Triton BatchNorm (Ioffe & Szegedy, 2015) fused with ReLU, forward and backward, and the
running-statistics update.

The contract is ``bitfast.ops.reference.batch_norm_relu_forward`` / ``_backward`` and
``batch_norm_update_stats_``.

x is seen as R = N*H*W rows of C channels, read in place in its own layout (NCHW: a
channel is N runs of H*W elements; channels_last: a row is C contiguous channels). Work is
tiled in (rows, channels) blocks; the grid is (channel blocks, row chunks), so a channel's
reduction is split over many programs when N*H*W is large. Reductions are deterministic,
without atomics: each program writes its per-channel partial results to a (row chunks, C)
float32 buffer, and a fixed-order pass merges them.

* Forward, training: per program, per channel mean and centred sum of squares of its rows
  (tiles merged with Chan et al.'s pairwise update); ``_bn_stats_merge_kernel`` merges the
  chunks the same way into the batch mean and biased variance; a second read of x
  normalizes, scales, shifts and applies the ReLU. Eval: the running statistics (float32
  copies) and a single read.
* Backward: the normalized value and ReLU mask are recomputed from x; per-chunk sums of dy
  and dy * xhat (summed over chunks by torch: grad_bias and grad_weight), then dx, which in
  training also subtracts the two per-channel means.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._formats import channels_last, memory_format

_TILE = 4096  # elements per (rows x channels) tile


@triton.jit
def _bn_stats_partial_kernel(
    X,  # input, (N, C, H, W) in NCHW or NHWC memory
    PART_MEAN,  # per-(row chunk, channel) mean, (num_chunks, C) float32
    PART_M2,  # per-(row chunk, channel) centred sum of squares, (num_chunks, C) float32
    C,  # channels
    HW,  # H * W
    R,  # rows, N * H * W
    ROWS_PER_CHUNK,  # rows per program, a multiple of BLOCK_R
    CHANNELS_LAST: tl.constexpr,  # memory layout of X
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_C: tl.constexpr,  # channels per tile (and per program)
):
    cb = tl.program_id(0)
    chunk = tl.program_id(1)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = ch < C
    row_first = chunk.to(tl.int64) * ROWS_PER_CHUNK
    row_end = tl.minimum(row_first + ROWS_PER_CHUNK, R)
    offs_r = tl.arange(0, BLOCK_R)
    # Offsets of a (BLOCK_R, BLOCK_C) tile: row part + channel part.
    if CHANNELS_LAST:
        ch_off = ch
    else:
        ch_off = ch * HW
    count = 0.0
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(row_first, row_end, BLOCK_R):
        rows = r0 + offs_r
        mask = (rows < row_end)[:, None] & c_mask[None, :]
        if CHANNELS_LAST:
            row_off = rows * C
        else:
            # n * C * HW + s with n = row // HW, s = row % HW
            row_off = (rows // HW) * (C - 1) * HW + rows
        offs = row_off[:, None] + ch_off[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        n_b = tl.minimum(row_end - r0, BLOCK_R).to(tl.float32)
        mean_b = tl.sum(x, axis=0) / n_b
        d = tl.where(mask, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        # Chan et al.: merge (count, mean, m2) with the tile's (n_b, mean_b, m2_b).
        total = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta * delta * (count * n_b / total)
        count = total
    out = chunk.to(tl.int64) * C + ch
    tl.store(PART_MEAN + out, mean, mask=c_mask)
    tl.store(PART_M2 + out, m2, mask=c_mask)


@triton.jit
def _bn_stats_merge_kernel(
    PART_MEAN,  # per-(row chunk, channel) mean, (num_chunks, C) float32
    PART_M2,  # per-(row chunk, channel) centred sum of squares, (num_chunks, C) float32
    MEAN,  # batch mean, (C,) float32
    VAR,  # biased batch variance, (C,) float32
    C,  # channels
    R,  # rows, N * H * W
    ROWS_PER_CHUNK,  # rows per chunk of the partial kernel
    NUM_CHUNKS,  # row chunks
    BLOCK_C: tl.constexpr,  # channels per program
):
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = ch < C
    count = 0.0
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    # In chunk order, so the result does not depend on scheduling.
    for k in range(0, NUM_CHUNKS):
        n_b = tl.minimum(R - k * ROWS_PER_CHUNK, ROWS_PER_CHUNK).to(tl.float32)
        mean_b = tl.load(PART_MEAN + k * C + ch, mask=c_mask, other=0.0)
        m2_b = tl.load(PART_M2 + k * C + ch, mask=c_mask, other=0.0)
        total = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta * delta * (count * n_b / total)
        count = total
    tl.store(MEAN + ch, mean, mask=c_mask)
    tl.store(VAR + ch, m2 / count, mask=c_mask)


@triton.jit
def _bn_relu_apply_kernel(
    X,  # input, (N, C, H, W) in NCHW or NHWC memory
    Y,  # output, like X
    MEAN,  # mean used, (C,) float32
    VAR,  # biased variance used, (C,) float32
    W,  # gamma, (C,) any float dtype; ignored unless HAS_WEIGHT
    B,  # beta, (C,) any float dtype; ignored unless HAS_BIAS
    C,  # channels
    HW,  # H * W
    R,  # rows, N * H * W
    ROWS_PER_CHUNK,  # rows per program, a multiple of BLOCK_R
    eps,  # added to the variance
    HAS_WEIGHT: tl.constexpr,  # gamma given (else 1)
    HAS_BIAS: tl.constexpr,  # beta given (else 0)
    RELU: tl.constexpr,  # apply the ReLU
    CHANNELS_LAST: tl.constexpr,  # memory layout of X and Y
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_C: tl.constexpr,  # channels per tile (and per program)
):
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = ch < C
    row_first = tl.program_id(1).to(tl.int64) * ROWS_PER_CHUNK
    row_end = tl.minimum(row_first + ROWS_PER_CHUNK, R)
    mean = tl.load(MEAN + ch, mask=c_mask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(VAR + ch, mask=c_mask, other=1.0) + eps)
    if HAS_WEIGHT:
        scale = rstd * tl.load(W + ch, mask=c_mask, other=0.0).to(tl.float32)
    else:
        scale = rstd
    if HAS_BIAS:
        b = tl.load(B + ch, mask=c_mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_C], tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    # Offsets of a (BLOCK_R, BLOCK_C) tile: row part + channel part.
    if CHANNELS_LAST:
        ch_off = ch
    else:
        ch_off = ch * HW
    for r0 in range(row_first, row_end, BLOCK_R):
        rows = r0 + offs_r
        mask = (rows < row_end)[:, None] & c_mask[None, :]
        if CHANNELS_LAST:
            row_off = rows * C
        else:
            # n * C * HW + s with n = row // HW, s = row % HW
            row_off = (rows // HW) * (C - 1) * HW + rows
        offs = row_off[:, None] + ch_off[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * scale[None, :] + b[None, :]
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, as torch.relu does
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bn_relu_bwd_reduce_kernel(
    DY,  # gradient w.r.t. the output, (N, C, H, W) in X's memory layout
    X,  # forward input, (N, C, H, W) in NCHW or NHWC memory
    MEAN,  # mean used by the forward, (C,) float32
    VAR,  # biased variance used by the forward, (C,) float32
    W,  # gamma, (C,) any float dtype; ignored unless HAS_WEIGHT
    B,  # beta, (C,) any float dtype; ignored unless HAS_BIAS
    PART_DB,  # per-(row chunk, channel) sum(dy), (num_chunks, C) float32
    PART_DW,  # per-(row chunk, channel) sum(dy * xhat), (num_chunks, C) float32
    C,  # channels
    HW,  # H * W
    R,  # rows, N * H * W
    ROWS_PER_CHUNK,  # rows per program, a multiple of BLOCK_R
    eps,  # added to the variance
    HAS_WEIGHT: tl.constexpr,  # gamma given (else 1)
    HAS_BIAS: tl.constexpr,  # beta given (else 0)
    RELU: tl.constexpr,  # the forward applied the ReLU
    CHANNELS_LAST: tl.constexpr,  # memory layout of DY and X
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_C: tl.constexpr,  # channels per tile (and per program)
):
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = ch < C
    chunk = tl.program_id(1)
    row_first = chunk.to(tl.int64) * ROWS_PER_CHUNK
    row_end = tl.minimum(row_first + ROWS_PER_CHUNK, R)
    mean = tl.load(MEAN + ch, mask=c_mask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(VAR + ch, mask=c_mask, other=1.0) + eps)
    if HAS_WEIGHT:
        scale = rstd * tl.load(W + ch, mask=c_mask, other=0.0).to(tl.float32)
    else:
        scale = rstd
    if HAS_BIAS:
        b = tl.load(B + ch, mask=c_mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_C], tl.float32)
    acc_db = tl.zeros([BLOCK_C], tl.float32)
    acc_dw = tl.zeros([BLOCK_C], tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    # Offsets of a (BLOCK_R, BLOCK_C) tile: row part + channel part.
    if CHANNELS_LAST:
        ch_off = ch
    else:
        ch_off = ch * HW
    for r0 in range(row_first, row_end, BLOCK_R):
        rows = r0 + offs_r
        mask = (rows < row_end)[:, None] & c_mask[None, :]
        if CHANNELS_LAST:
            row_off = rows * C
        else:
            # n * C * HW + s with n = row // HW, s = row % HW
            row_off = (rows // HW) * (C - 1) * HW + rows
        offs = row_off[:, None] + ch_off[None, :]
        xc = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            # The forward's own expression, so the mask matches the stored output.
            dy = tl.where(xc * scale[None, :] + b[None, :] > 0.0, dy, 0.0)
        acc_db += tl.sum(dy, axis=0)
        acc_dw += tl.sum(dy * (xc * rstd[None, :]), axis=0)
    out = chunk.to(tl.int64) * C + ch
    tl.store(PART_DB + out, acc_db, mask=c_mask)
    tl.store(PART_DW + out, acc_dw, mask=c_mask)


@triton.jit
def _bn_relu_bwd_dx_kernel(
    DY,  # gradient w.r.t. the output, (N, C, H, W) in X's memory layout
    X,  # forward input, (N, C, H, W) in NCHW or NHWC memory
    MEAN,  # mean used by the forward, (C,) float32
    VAR,  # biased variance used by the forward, (C,) float32
    W,  # gamma, (C,) any float dtype; ignored unless HAS_WEIGHT
    B,  # beta, (C,) any float dtype; ignored unless HAS_BIAS
    SUM_DY,  # per-channel sum(dy * mask), (C,) float32; read only when TRAINING
    SUM_DY_XHAT,  # per-channel sum(dy * mask * xhat), (C,) float32; read only when TRAINING
    DX,  # gradient w.r.t. X, like X
    C,  # channels
    HW,  # H * W
    R,  # rows, N * H * W
    ROWS_PER_CHUNK,  # rows per program, a multiple of BLOCK_R
    eps,  # added to the variance
    HAS_WEIGHT: tl.constexpr,  # gamma given (else 1)
    HAS_BIAS: tl.constexpr,  # beta given (else 0)
    RELU: tl.constexpr,  # the forward applied the ReLU
    TRAINING: tl.constexpr,  # statistics came from this batch (and so depend on X)
    CHANNELS_LAST: tl.constexpr,  # memory layout of DY, X and DX
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_C: tl.constexpr,  # channels per tile (and per program)
):
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = ch < C
    row_first = tl.program_id(1).to(tl.int64) * ROWS_PER_CHUNK
    row_end = tl.minimum(row_first + ROWS_PER_CHUNK, R)
    mean = tl.load(MEAN + ch, mask=c_mask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(VAR + ch, mask=c_mask, other=1.0) + eps)
    if HAS_WEIGHT:
        w = tl.load(W + ch, mask=c_mask, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_BIAS:
        b = tl.load(B + ch, mask=c_mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_C], tl.float32)
    scale = rstd * w
    if TRAINING:
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * mask * gamma.
        inv_r = 1.0 / R.to(tl.float32)
        mean_g = w * tl.load(SUM_DY + ch, mask=c_mask, other=0.0) * inv_r
        mean_gx = w * tl.load(SUM_DY_XHAT + ch, mask=c_mask, other=0.0) * inv_r
    offs_r = tl.arange(0, BLOCK_R)
    # Offsets of a (BLOCK_R, BLOCK_C) tile: row part + channel part.
    if CHANNELS_LAST:
        ch_off = ch
    else:
        ch_off = ch * HW
    for r0 in range(row_first, row_end, BLOCK_R):
        rows = r0 + offs_r
        mask = (rows < row_end)[:, None] & c_mask[None, :]
        if CHANNELS_LAST:
            row_off = rows * C
        else:
            # n * C * HW + s with n = row // HW, s = row % HW
            row_off = (rows // HW) * (C - 1) * HW + rows
        offs = row_off[:, None] + ch_off[None, :]
        xc = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            dy = tl.where(xc * scale[None, :] + b[None, :] > 0.0, dy, 0.0)
        if TRAINING:
            xhat = xc * rstd[None, :]
            dx = rstd[None, :] * (dy * w[None, :] - mean_g[None, :] - xhat * mean_gx[None, :])
        else:
            dx = dy * scale[None, :]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bn_update_stats_kernel(
    RUNNING_MEAN,  # running mean, (C,) float dtype, updated in place
    RUNNING_VAR,  # running (unbiased) variance, (C,) float dtype, updated in place
    MEAN,  # batch mean, (C,) float32
    VAR,  # biased batch variance, (C,) float32
    C,  # channels
    momentum,  # weight of the batch statistics
    unbias,  # count / (count - 1) (1 when count == 1)
    BLOCK: tl.constexpr,  # channels per program
):
    ch = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = ch < C
    rm = tl.load(RUNNING_MEAN + ch, mask=mask, other=0.0).to(tl.float32)
    rv = tl.load(RUNNING_VAR + ch, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(MEAN + ch, mask=mask, other=0.0)
    v = tl.load(VAR + ch, mask=mask, other=0.0) * unbias
    rm = (1.0 - momentum) * rm + momentum * m
    rv = (1.0 - momentum) * rv + momentum * v
    tl.store(RUNNING_MEAN + ch, rm.to(RUNNING_MEAN.dtype.element_ty), mask=mask)
    tl.store(RUNNING_VAR + ch, rv.to(RUNNING_VAR.dtype.element_ty), mask=mask)


def _plan(x: torch.Tensor, cl: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_R, BLOCK_C, rows per chunk, channel blocks, row chunks) for x's shape."""
    n, c, h, w = x.shape
    r = n * h * w
    # Channels are the contiguous dim in NHWC, rows (within a sample) in NCHW; a tile
    # takes more of the other dim when the contiguous one is short.
    if cl:
        block_c = min(triton.next_power_of_2(c), 64)
        block_r = min(triton.next_power_of_2(r), _TILE // block_c)
    else:
        block_r = min(triton.next_power_of_2(r), _TILE // 8)
        block_c = min(triton.next_power_of_2(c), _TILE // block_r)
    c_blocks = triton.cdiv(c, block_c)
    # Enough programs to fill a GPU; the interpreter (CPU tensors) pays per program, so few.
    target = 1024 if x.is_cuda else 16
    chunks = max(1, min(triton.cdiv(r, block_r), target // c_blocks))
    rows_per_chunk = triton.cdiv(triton.cdiv(r, chunks), block_r) * block_r
    return block_r, block_c, rows_per_chunk, c_blocks, triton.cdiv(r, rows_per_chunk)


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    cl = channels_last(x)
    if not cl and not x.is_contiguous():
        x = x.contiguous()  # the op layer never passes this; kept for direct callers
    return x, cl


def batch_norm_relu_fwd(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm(+ReLU) of ``x`` plus the float32 (C,) mean and biased variance it used.
    The running statistics are read (eval), never written."""
    x, cl = _layout(x)
    n, c, h, w = x.shape
    hw, r = h * w, n * h * w
    block_r, block_c, rows_per_chunk, c_blocks, chunks = _plan(x, cl)
    if training:
        part_mean = torch.empty((chunks, c), device=x.device, dtype=torch.float32)
        part_m2 = torch.empty((chunks, c), device=x.device, dtype=torch.float32)
        _bn_stats_partial_kernel[(c_blocks, chunks)](
            x, part_mean, part_m2, c, hw, r, rows_per_chunk,
            CHANNELS_LAST=cl, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8,
        )
        mean = torch.empty(c, device=x.device, dtype=torch.float32)
        var = torch.empty(c, device=x.device, dtype=torch.float32)
        _bn_stats_merge_kernel[(triton.cdiv(c, 128),)](
            part_mean, part_m2, mean, var, c, r, rows_per_chunk, chunks, BLOCK_C=128,
        )
    else:
        mean = running_mean.to(torch.float32).clone()
        var = running_var.to(torch.float32).clone()
    y = torch.empty_like(x, memory_format=memory_format(cl))
    _bn_relu_apply_kernel[(c_blocks, chunks)](
        x, y, mean, var,
        weight if weight is not None else x,
        bias if bias is not None else x,
        c, hw, r, rows_per_chunk, eps,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        RELU=relu,
        CHANNELS_LAST=cl,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=8,
    )
    return y, mean, var


def batch_norm_relu_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. ``x`` (x's dtype and memory format), ``weight`` and ``bias``
    (weight's dtype, float32 when weight is None)."""
    x, cl = _layout(x)
    fmt = memory_format(cl)
    grad_y = grad_y.contiguous(memory_format=fmt)
    mean, var = mean.to(torch.float32).contiguous(), var.to(torch.float32).contiguous()
    n, c, h, w = x.shape
    hw, r = h * w, n * h * w
    block_r, block_c, rows_per_chunk, c_blocks, chunks = _plan(x, cl)
    part_db = torch.empty((chunks, c), device=x.device, dtype=torch.float32)
    part_dw = torch.empty((chunks, c), device=x.device, dtype=torch.float32)
    w_arg = weight if weight is not None else x
    b_arg = bias if bias is not None else x
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RELU=relu, CHANNELS_LAST=cl)
    _bn_relu_bwd_reduce_kernel[(c_blocks, chunks)](
        grad_y, x, mean, var, w_arg, b_arg, part_db, part_dw,
        c, hw, r, rows_per_chunk, eps,
        **flags, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8,
    )
    # Summed over row chunks in a fixed order: deterministic.
    sum_dy, sum_dy_xhat = part_db.sum(0), part_dw.sum(0)
    dx = torch.empty_like(x, memory_format=fmt)
    _bn_relu_bwd_dx_kernel[(c_blocks, chunks)](
        grad_y, x, mean, var, w_arg, b_arg, sum_dy, sum_dy_xhat, dx,
        c, hw, r, rows_per_chunk, eps,
        **flags, TRAINING=training, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8,
    )
    pdtype = weight.dtype if weight is not None else torch.float32
    return dx, sum_dy_xhat.to(pdtype), sum_dy.to(pdtype)


def batch_norm_update_stats_(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    momentum: float,
    count: int,
) -> None:
    """PyTorch's running-statistics update, in place; the variance made unbiased with
    ``count`` (the elements each channel reduced)."""
    c = running_mean.numel()
    unbias = count / (count - 1) if count > 1 else 1.0
    rm = running_mean if running_mean.is_contiguous() else running_mean.contiguous()
    rv = running_var if running_var.is_contiguous() else running_var.contiguous()
    _bn_update_stats_kernel[(triton.cdiv(c, 1024),)](
        rm, rv, mean.to(torch.float32).contiguous(), var.to(torch.float32).contiguous(),
        c, momentum, unbias, BLOCK=1024,
    )
    if rm is not running_mean:
        running_mean.copy_(rm)
    if rv is not running_var:
        running_var.copy_(rv)
