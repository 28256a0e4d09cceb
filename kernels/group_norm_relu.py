"""Triton GroupNorm (Wu & He, 2018) fused with ReLU, forward and backward.

The contract is ``bitfast.ops.reference.group_norm_relu_forward`` / ``_backward``.

One program per (sample, group). A group is walked in 2D tiles of (spatial, channel)
whose strides come from the memory format, so NCHW and channels_last (NHWC) inputs are
read in place, never transposed: in NCHW a group is one contiguous run of C/G * H*W
elements, in NHWC it is H*W runs of C/G channels, C apart.

Forward: one read of the group for the statistics (per-tile mean and centred sum of
squares, merged across tiles with Chan et al.'s pairwise update, so no E[x^2] - E[x]^2
cancellation and no third pass), one read to normalize, scale, shift, ReLU and store.
Statistics are float32 whatever the input dtype.

Backward: the normalized value and the ReLU mask are recomputed from ``x`` and the saved
(N, G) statistics. A first pass reduces, per channel of the group, sum(dy) and
sum(dy * xhat) over H*W; these are written to (N, C) float32 buffers (grad_bias and
grad_weight are their sums over N, taken by torch: deterministic, no atomics), and, weighted
by gamma, give the two group sums the input gradient needs. A second pass writes dx.

Residual add (``group_norm_relu_add_*``, the joint of two pre-activation units): with
HAS_RESIDUAL the forward's first pass reads a and b, stores their sum (rounded to the
storage dtype, as ``a + b`` is) and takes the statistics of the rounded sum; the second
pass reads the sum back (from L2 on a GPU: a group is at most a few hundred KB). With
HAS_GRAD_SUM the backward adds the gradient reaching the sum directly to dx before its one
rounding, so the gradient of a and b leaves in the pass that writes dx.

Offsets within a sample are int32 (C*H*W < 2**31, checked by the launchers); the sample
offset is int64.

Launch configuration (``GroupNormConfig``; the launchers take ``config=``, the default is
``DEFAULT_CONFIG``): the tile size, the cap on channels per tile, the warps and pipeline
stages, and groups per program. With ``groups_per_program`` > 1 a program normalizes that
many adjacent groups of one sample (the kernels' ``GP > 1`` branch): its tiles span all
their channels, so in channels_last a row of a tile is ``groups_per_program * C/G``
contiguous channels instead of ``C/G`` (wider, better coalesced accesses when groups are
narrow), and the per-group sums are taken from the per-channel ones. Both branches walk
their tiles with the same ``@triton.jit`` helpers (the tile's offsets, the input load and
residual sum, the statistics merge, the normalize+ReLU pass, the backward's two passes;
Triton inlines them). ``tools/kernel_sweep.py`` times these configurations on a GPU.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._formats import channels_last, memory_format

# Elements per (spatial x channel) tile. Large tiles also keep the interpreter's
# per-iteration cost down (CI runs these kernels on CPU).
_TILE = 4096


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class GroupNormConfig:
    """How the Triton GroupNorm+ReLU kernels are launched (forward and backward alike).

    ``tile``: elements per (spatial x channel) tile, a power of two; ``max_block_c``: the
    most channels a tile spans (one group per program), a power of two; ``num_warps``:
    warps per program (None: 8 for tiles of 2048 elements or more, else 4);
    ``num_stages``: Triton's software-pipelining stages (None: Triton's default);
    ``groups_per_program``: adjacent groups of one sample per program, a power of two that
    must divide the number of groups of the input (1: one (sample, group) per program, the
    default kernel). The default is what the op layer launches."""

    tile: int = _TILE
    max_block_c: int = 256
    num_warps: int | None = None
    num_stages: int | None = None
    groups_per_program: int = 1

    def __post_init__(self) -> None:
        for name in ("tile", "max_block_c", "groups_per_program"):
            v = getattr(self, name)
            if not isinstance(v, int) or not _pow2(v):
                raise ValueError(f"GroupNormConfig: {name} is {v!r}; expected a power of two")
        if self.num_warps is not None and (not isinstance(self.num_warps, int) or not _pow2(self.num_warps)
                                           or self.num_warps > 32):
            raise ValueError(f"GroupNormConfig: num_warps is {self.num_warps!r}; expected None or a power of two <= 32")
        if self.num_stages is not None and (not isinstance(self.num_stages, int) or self.num_stages < 1):
            raise ValueError(f"GroupNormConfig: num_stages is {self.num_stages!r}; expected None or an int >= 1")

    def label(self) -> str:
        """A short name of the configuration, listing what differs from the default."""
        parts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                 if getattr(self, f.name) != f.default]
        return ",".join(parts) or "default"


DEFAULT_CONFIG = GroupNormConfig()


@triton.jit
def _round_to(
    X,  # values to store, float32 tensor
    DTYPE: tl.constexpr,  # storage element type
):
    # float32 -> bfloat16 rounded to nearest even by hand, so that the stored residual sum
    # is bit for bit the a + b of PyTorch: the Triton interpreter (what CI runs) truncates
    # in this cast, while a GPU rounds to nearest even as done here.
    if DTYPE == tl.bfloat16:
        bits = X.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(X == X, y, X.to(tl.bfloat16))  # NaN stays NaN
    else:
        return X.to(DTYPE)


@triton.jit
def _tile(
    ss,  # first spatial position of the tile
    offs_s,  # tl.arange(0, BLOCK_S)
    ch,  # channels of the tile, (BLOCK_C,) int
    c_mask,  # which of ch the tile covers, (BLOCK_C,) bool
    C,  # channels
    HW,  # H * W
    CHANNELS_LAST: tl.constexpr,  # memory layout
):
    # The mask and the offsets, from the sample's first element, of the (BLOCK_S, BLOCK_C)
    # tile of spatial positions ss + offs_s and channels ch.
    if CHANNELS_LAST:
        stride_c = 1
        stride_s = C
    else:
        stride_c = HW
        stride_s = 1
    sp = ss + offs_s
    mask = (sp < HW)[:, None] & c_mask[None, :]
    offs = ch[None, :] * stride_c + sp[:, None] * stride_s
    return mask, offs


@triton.jit
def _load_affine(
    W,  # gamma, (C,) any float dtype; ignored unless HAS_WEIGHT
    B,  # beta, (C,) any float dtype; ignored unless HAS_BIAS
    ch,  # channels, (BLOCK_C,) int
    c_mask,  # which of ch to load, (BLOCK_C,) bool
    HAS_WEIGHT: tl.constexpr,  # gamma given (else 1)
    HAS_BIAS: tl.constexpr,  # beta given (else 0)
    BLOCK_C: tl.constexpr,  # length of ch
):
    # gamma and beta of channels ch, float32 (a loaded value is 0 where c_mask is off).
    if HAS_WEIGHT:
        w = tl.load(W + ch, mask=c_mask, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_BIAS:
        b = tl.load(B + ch, mask=c_mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_C], tl.float32)
    return w, b


@triton.jit
def _fwd_load(
    X,  # input; with HAS_RESIDUAL, where the sum is stored
    RES_A,  # residual operand a, like X; ignored unless HAS_RESIDUAL
    RES_B,  # residual operand b, like X; ignored unless HAS_RESIDUAL
    base,  # offset of the sample's first element, int64
    offs,  # offsets of the tile from it
    mask,  # elements of the tile that exist
    HAS_RESIDUAL: tl.constexpr,  # X = RES_A + RES_B is computed and stored
):
    # A tile of the forward's input, float32, as the statistics pass reads it.
    if HAS_RESIDUAL:
        # The sum rounded to the storage dtype, as a + b is, and its statistics are
        # those of the rounded values that pass 2 reads back.
        ra = tl.load(RES_A + base + offs, mask=mask, other=0.0).to(tl.float32)
        rb = tl.load(RES_B + base + offs, mask=mask, other=0.0).to(tl.float32)
        xs = _round_to(ra + rb, X.dtype.element_ty)
        tl.store(X + base + offs, xs, mask=mask)
        x = xs.to(tl.float32)
    else:
        x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _chan_merge(
    count,  # elements merged so far, float32
    mean,  # their mean
    m2,  # their centred sum of squares
    n_b,  # elements of the tile, float32
    mean_b,  # the tile's mean
    m2_b,  # the tile's centred sum of squares
):
    # Chan et al.: (count, mean, m2) merged with the tile's (n_b, mean_b, m2_b); scalars, or
    # vectors with one lane per group.
    total = count + n_b
    delta = mean_b - mean
    mean = mean + delta * (n_b / total)
    m2 = m2 + m2_b + delta * delta * (count * n_b / total)
    return total, mean, m2


@triton.jit
def _fwd_apply(
    X,  # input (the stored sum with the residual add), (N, C, H, W)
    Y,  # output, like X
    base,  # offset of the sample's first element, int64
    ch,  # channels of the tiles, (BLOCK_C,) int
    c_mask,  # which of ch exist, (BLOCK_C,) bool
    offs_s,  # tl.arange(0, BLOCK_S)
    C,  # channels
    HW,  # H * W
    mean,  # group mean: a scalar, or that of each channel's group, (1, BLOCK_C)
    scale,  # gamma * rstd per channel, (BLOCK_C,) float32
    b,  # beta per channel, (BLOCK_C,) float32
    RELU: tl.constexpr,  # apply the ReLU
    CHANNELS_LAST: tl.constexpr,  # memory layout of X and Y
    BLOCK_S: tl.constexpr,  # spatial positions per tile
):
    # The forward's second pass over channels ch: normalize, scale, shift, ReLU, store.
    for ss in range(0, HW, BLOCK_S):
        mask, offs = _tile(ss, offs_s, ch, c_mask, C, HW, CHANNELS_LAST)
        x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * scale[None, :] + b[None, :]
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, as torch.relu does
        tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_load(
    DY,  # gradient w.r.t. the output
    X,  # forward input
    base,  # offset of the sample's first element, int64
    offs,  # offsets of the tile from it
    mask,  # elements of the tile that exist
    mean,  # group mean: a scalar, or that of each channel's group, (1, BLOCK_C)
    scale,  # gamma * rstd per channel, (BLOCK_C,) float32
    b,  # beta per channel, (BLOCK_C,) float32
    RELU: tl.constexpr,  # the forward applied the ReLU
):
    # A tile's x - mean and dy (0 where the forward's ReLU cut), float32.
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + base + offs, mask=mask, other=0.0).to(tl.float32)
    xc = x - mean
    if RELU:
        # The forward's own expression, so the mask matches the stored output.
        dy = tl.where(xc * scale[None, :] + b[None, :] > 0.0, dy, 0.0)
    return xc, dy


@triton.jit
def _bwd_channel_sums(
    DY,  # gradient w.r.t. the output, (N, C, H, W) in X's memory layout
    X,  # forward input, (N, C, H, W)
    DW_PART,  # per-(sample, channel) sum(dy * xhat), (N, C) float32
    DB_PART,  # per-(sample, channel) sum(dy), (N, C) float32
    base,  # offset of the sample's first element, int64
    part,  # offset of the sample's row of DW_PART and DB_PART, int64
    ch,  # channels of the tiles, (BLOCK_C,) int
    c_mask,  # which of ch exist, (BLOCK_C,) bool
    offs_s,  # tl.arange(0, BLOCK_S)
    C,  # channels
    HW,  # H * W
    mean,  # group mean: a scalar, or that of each channel's group, (1, BLOCK_C)
    rstd,  # group rstd, like mean
    scale,  # gamma * rstd per channel, (BLOCK_C,) float32
    b,  # beta per channel, (BLOCK_C,) float32
    RELU: tl.constexpr,  # the forward applied the ReLU
    CHANNELS_LAST: tl.constexpr,  # memory layout of DY and X
    BLOCK_C: tl.constexpr,  # channels per tile
    BLOCK_S: tl.constexpr,  # spatial positions per tile
):
    # The backward's first pass over channels ch: sum(dy) and sum(dy * xhat) over H*W per
    # channel, stored to DB_PART and DW_PART and returned, (BLOCK_C,) each.
    acc_db = tl.zeros([BLOCK_C], tl.float32)
    acc_dw = tl.zeros([BLOCK_C], tl.float32)
    for ss in range(0, HW, BLOCK_S):
        mask, offs = _tile(ss, offs_s, ch, c_mask, C, HW, CHANNELS_LAST)
        xc, dy = _bwd_load(DY, X, base, offs, mask, mean, scale, b, RELU)
        acc_db += tl.sum(dy, axis=0)
        acc_dw += tl.sum(dy * (xc * rstd), axis=0)
    tl.store(DB_PART + part + ch, acc_db, mask=c_mask)
    tl.store(DW_PART + part + ch, acc_dw, mask=c_mask)
    return acc_db, acc_dw


@triton.jit
def _bwd_dx(
    DY,  # gradient w.r.t. the output, (N, C, H, W) in X's memory layout
    X,  # forward input, (N, C, H, W)
    DX,  # gradient w.r.t. X, like X; with HAS_GRAD_SUM, plus GRAD_SUM
    GRAD_SUM,  # gradient reaching X from elsewhere, like X; ignored unless HAS_GRAD_SUM
    base,  # offset of the sample's first element, int64
    ch,  # channels of the tiles, (BLOCK_C,) int
    c_mask,  # which of ch exist, (BLOCK_C,) bool
    offs_s,  # tl.arange(0, BLOCK_S)
    C,  # channels
    HW,  # H * W
    mean,  # group mean: a scalar, or that of each channel's group, (1, BLOCK_C)
    rstd,  # group rstd, like mean
    mean_g,  # group mean of g = dy * gamma, like mean
    mean_gx,  # group mean of g * xhat, like mean
    w,  # gamma per channel, (BLOCK_C,) float32
    scale,  # gamma * rstd per channel, (BLOCK_C,) float32
    b,  # beta per channel, (BLOCK_C,) float32
    HAS_GRAD_SUM: tl.constexpr,  # add GRAD_SUM to dx before the store
    RELU: tl.constexpr,  # the forward applied the ReLU
    CHANNELS_LAST: tl.constexpr,  # memory layout of DY, X, DX and GRAD_SUM
    BLOCK_S: tl.constexpr,  # spatial positions per tile
):
    # The backward's second pass over channels ch: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
    # g = dy * gamma, plus GRAD_SUM with HAS_GRAD_SUM, stored to DX.
    for ss in range(0, HW, BLOCK_S):
        mask, offs = _tile(ss, offs_s, ch, c_mask, C, HW, CHANNELS_LAST)
        xc, dy = _bwd_load(DY, X, base, offs, mask, mean, scale, b, RELU)
        dx = rstd * (dy * w[None, :] - mean_g - (xc * rstd) * mean_gx)
        if HAS_GRAD_SUM:
            dx += tl.load(GRAD_SUM + base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _seg_sum(
    V,  # per-channel values, (BLOCK_C,) float32
    SEG,  # group of each channel within the program, (BLOCK_C,) int; >= GP: none
    GP: tl.constexpr,  # groups per program
):
    # The per-group sums of V, (GP,).
    gi = tl.arange(0, GP)
    return tl.sum(tl.where(SEG[None, :] == gi[:, None], V[None, :], 0.0), axis=1)


@triton.jit
def _seg_bcast(
    V,  # per-group values, (GP,) float32
    SEG,  # group of each channel within the program, (BLOCK_C,) int
    GP: tl.constexpr,  # groups per program
):
    # Each channel's group value, (BLOCK_C,) (0 for a channel of no group).
    gi = tl.arange(0, GP)
    return tl.sum(tl.where(SEG[None, :] == gi[:, None], V[:, None], 0.0), axis=0)


@triton.jit
def _multi_program(
    C,  # channels
    HW,  # H * W
    G,  # groups
    CG,  # channels per group, C // G
    GP: tl.constexpr,  # groups per program (divides G)
    BLOCK_C: tl.constexpr,  # channels per tile, >= GP * CG
    BLOCK_S: tl.constexpr,  # spatial positions per tile
):
    # What a multi-group program covers: its sample n, its first group, the offset of the
    # sample's first element (int64), tl.arange(0, BLOCK_S), and per lane of a tile row its
    # group within the program (GP for lanes past the program's channels), whether it holds
    # a channel, and which channel.
    pid = tl.program_id(0)
    per_sample = G // GP
    n = pid // per_sample
    g_first = (pid % per_sample) * GP
    base = n.to(tl.int64) * C * HW
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    seg = offs_c // CG
    c_mask = offs_c < GP * CG
    ch = g_first * CG + offs_c
    return n, g_first, base, offs_s, seg, c_mask, ch


@triton.jit
def _gn_relu_fwd_kernel(
    X,  # input, (N, C, H, W) in NCHW or NHWC memory; with HAS_RESIDUAL, the sum written here
    Y,  # output, like X
    RES_A,  # residual operand a, like X; ignored unless HAS_RESIDUAL
    RES_B,  # residual operand b, like X; ignored unless HAS_RESIDUAL
    W,  # gamma, (C,) any float dtype; ignored unless HAS_WEIGHT
    B,  # beta, (C,) any float dtype; ignored unless HAS_BIAS
    MEAN,  # per-(sample, group) mean, (N, G) float32
    RSTD,  # per-(sample, group) 1/sqrt(var + eps), (N, G) float32
    C,  # channels
    HW,  # H * W
    G,  # groups
    CG,  # channels per group, C // G
    eps,  # added to the biased variance
    HAS_RESIDUAL: tl.constexpr,  # X = RES_A + RES_B is computed and stored, then normalized
    HAS_WEIGHT: tl.constexpr,  # gamma given (else 1)
    HAS_BIAS: tl.constexpr,  # beta given (else 0)
    RELU: tl.constexpr,  # apply the ReLU
    CHANNELS_LAST: tl.constexpr,  # memory layout of X and Y
    GP: tl.constexpr,  # groups per program (divides G); 1: one (sample, group) per program
    BLOCK_C: tl.constexpr,  # channels per tile; with GP > 1, >= GP * CG
    BLOCK_S: tl.constexpr,  # spatial positions per tile
):
    if GP == 1:
        pid = tl.program_id(0)
        n = pid // G
        c_first = (pid % G) * CG
        base = n.to(tl.int64) * C * HW
        offs_c = tl.arange(0, BLOCK_C)
        offs_s = tl.arange(0, BLOCK_S)

        count = 0.0
        mean = 0.0
        m2 = 0.0
        for cs in range(0, CG, BLOCK_C):
            cc = cs + offs_c
            c_mask = cc < CG
            for ss in range(0, HW, BLOCK_S):
                mask, offs = _tile(ss, offs_s, c_first + cc, c_mask, C, HW, CHANNELS_LAST)
                x = _fwd_load(X, RES_A, RES_B, base, offs, mask, HAS_RESIDUAL)
                n_b = (tl.minimum(CG - cs, BLOCK_C) * tl.minimum(HW - ss, BLOCK_S)).to(tl.float32)
                mean_b = tl.sum(tl.sum(x, axis=1), axis=0) / n_b
                d = tl.where(mask, x - mean_b, 0.0)
                m2_b = tl.sum(tl.sum(d * d, axis=1), axis=0)
                count, mean, m2 = _chan_merge(count, mean, m2, n_b, mean_b, m2_b)
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        tl.store(MEAN + pid, mean)
        tl.store(RSTD + pid, rstd)
        if HAS_RESIDUAL:
            # Pass 2 reads the sum back; a thread may load elements another thread stored.
            tl.debug_barrier()

        for cs in range(0, CG, BLOCK_C):
            cc = cs + offs_c
            c_mask = cc < CG
            ch = c_first + cc
            w, b = _load_affine(W, B, ch, c_mask, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
            _fwd_apply(X, Y, base, ch, c_mask, offs_s, C, HW, mean, w * rstd, b, RELU, CHANNELS_LAST, BLOCK_S)
    else:
        # GP adjacent groups of one sample: tiles span the GP * CG channels, the statistics
        # are merged per group as above, one vector lane per group.
        n, g_first, base, offs_s, seg, c_mask, ch = _multi_program(C, HW, G, CG, GP, BLOCK_C, BLOCK_S)

        count = tl.zeros([GP], tl.float32)
        mean = tl.zeros([GP], tl.float32)
        m2 = tl.zeros([GP], tl.float32)
        for ss in range(0, HW, BLOCK_S):
            mask, offs = _tile(ss, offs_s, ch, c_mask, C, HW, CHANNELS_LAST)
            x = _fwd_load(X, RES_A, RES_B, base, offs, mask, HAS_RESIDUAL)
            n_b = (tl.minimum(HW - ss, BLOCK_S) * CG).to(tl.float32)
            mean_b = _seg_sum(tl.sum(x, axis=0), seg, GP) / n_b
            d = tl.where(mask, x - _seg_bcast(mean_b, seg, GP)[None, :], 0.0)
            m2_b = _seg_sum(tl.sum(d * d, axis=0), seg, GP)
            count, mean, m2 = _chan_merge(count, mean, m2, n_b, mean_b, m2_b)
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        gi = tl.arange(0, GP)
        tl.store(MEAN + n * G + g_first + gi, mean)
        tl.store(RSTD + n * G + g_first + gi, rstd)
        if HAS_RESIDUAL:
            tl.debug_barrier()

        w, b = _load_affine(W, B, ch, c_mask, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
        mean_c = _seg_bcast(mean, seg, GP)
        scale = w * _seg_bcast(rstd, seg, GP)
        _fwd_apply(X, Y, base, ch, c_mask, offs_s, C, HW, mean_c[None, :], scale, b, RELU, CHANNELS_LAST, BLOCK_S)


@triton.jit
def _gn_relu_bwd_kernel(
    DY,  # gradient w.r.t. the output, (N, C, H, W) in X's memory layout
    X,  # forward input, (N, C, H, W) in NCHW or NHWC memory
    W,  # gamma, (C,) any float dtype; ignored unless HAS_WEIGHT
    B,  # beta, (C,) any float dtype; ignored unless HAS_BIAS
    MEAN,  # saved mean, (N, G) float32
    RSTD,  # saved rstd, (N, G) float32
    DX,  # gradient w.r.t. X, like X; with HAS_GRAD_SUM, plus GRAD_SUM
    GRAD_SUM,  # gradient reaching X from elsewhere, like X; ignored unless HAS_GRAD_SUM
    DW_PART,  # per-(sample, channel) sum(dy * xhat), (N, C) float32
    DB_PART,  # per-(sample, channel) sum(dy), (N, C) float32
    C,  # channels
    HW,  # H * W
    G,  # groups
    CG,  # channels per group, C // G
    HAS_GRAD_SUM: tl.constexpr,  # add GRAD_SUM to dx before the store
    HAS_WEIGHT: tl.constexpr,  # gamma given (else 1)
    HAS_BIAS: tl.constexpr,  # beta given (else 0)
    RELU: tl.constexpr,  # the forward applied the ReLU
    CHANNELS_LAST: tl.constexpr,  # memory layout of DY, X and DX
    GP: tl.constexpr,  # groups per program (divides G); 1: one (sample, group) per program
    BLOCK_C: tl.constexpr,  # channels per tile; with GP > 1, >= GP * CG
    BLOCK_S: tl.constexpr,  # spatial positions per tile
):
    if GP == 1:
        pid = tl.program_id(0)
        n = pid // G
        c_first = (pid % G) * CG
        base = n.to(tl.int64) * C * HW
        part = n.to(tl.int64) * C
        offs_c = tl.arange(0, BLOCK_C)
        offs_s = tl.arange(0, BLOCK_S)
        mean = tl.load(MEAN + pid)
        rstd = tl.load(RSTD + pid)

        # Pass 1: per-channel sums, and from them the group's sum(g) and sum(g * xhat), g = dy * gamma.
        sum_g = 0.0
        sum_gx = 0.0
        for cs in range(0, CG, BLOCK_C):
            cc = cs + offs_c
            c_mask = cc < CG
            ch = c_first + cc
            w, b = _load_affine(W, B, ch, c_mask, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
            acc_db, acc_dw = _bwd_channel_sums(DY, X, DW_PART, DB_PART, base, part, ch, c_mask, offs_s, C, HW,
                                               mean, rstd, w * rstd, b, RELU, CHANNELS_LAST, BLOCK_C, BLOCK_S)
            sum_g += tl.sum(acc_db * w, axis=0)
            sum_gx += tl.sum(acc_dw * w, axis=0)
        m = (CG * HW).to(tl.float32)
        mean_g = sum_g / m
        mean_gx = sum_gx / m

        # Pass 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
        for cs in range(0, CG, BLOCK_C):
            cc = cs + offs_c
            c_mask = cc < CG
            ch = c_first + cc
            w, b = _load_affine(W, B, ch, c_mask, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
            _bwd_dx(DY, X, DX, GRAD_SUM, base, ch, c_mask, offs_s, C, HW, mean, rstd, mean_g, mean_gx,
                    w, w * rstd, b, HAS_GRAD_SUM, RELU, CHANNELS_LAST, BLOCK_S)
    else:
        # GP adjacent groups of one sample, one channel block: the per-channel sums of pass 1
        # give the per-group sums through _seg_sum.
        n, g_first, base, offs_s, seg, c_mask, ch = _multi_program(C, HW, G, CG, GP, BLOCK_C, BLOCK_S)
        part = n.to(tl.int64) * C
        mean_c = tl.load(MEAN + n * G + g_first + seg, mask=c_mask, other=0.0)
        rstd_c = tl.load(RSTD + n * G + g_first + seg, mask=c_mask, other=0.0)
        w, b = _load_affine(W, B, ch, c_mask, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
        scale = w * rstd_c

        acc_db, acc_dw = _bwd_channel_sums(DY, X, DW_PART, DB_PART, base, part, ch, c_mask, offs_s, C, HW,
                                           mean_c[None, :], rstd_c[None, :], scale, b, RELU, CHANNELS_LAST,
                                           BLOCK_C, BLOCK_S)
        m = (CG * HW).to(tl.float32)
        mean_g = _seg_bcast(_seg_sum(acc_db * w, seg, GP) / m, seg, GP)
        mean_gx = _seg_bcast(_seg_sum(acc_dw * w, seg, GP) / m, seg, GP)

        _bwd_dx(DY, X, DX, GRAD_SUM, base, ch, c_mask, offs_s, C, HW, mean_c[None, :], rstd_c[None, :],
                mean_g[None, :], mean_gx[None, :], w, scale, b, HAS_GRAD_SUM, RELU, CHANNELS_LAST, BLOCK_S)


def _blocks(cg: int, hw: int, num_groups: int, config: GroupNormConfig) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) of a launch; raises ValueError when ``config`` cannot serve the input."""
    gp = config.groups_per_program
    if gp == 1:
        block_c = min(triton.next_power_of_2(cg), config.max_block_c)
    else:
        if num_groups % gp:
            raise ValueError(f"GroupNormConfig: groups_per_program={gp} does not divide num_groups={num_groups}")
        block_c = triton.next_power_of_2(gp * cg)
        if block_c > 4096:
            raise ValueError(f"GroupNormConfig: groups_per_program={gp} with {cg} channels per group makes tiles "
                             f"{block_c} channels wide; expected at most 4096")
    block_s = min(triton.next_power_of_2(hw), max(config.tile // block_c, 1))
    return block_c, block_s


def _launch_options(block_c: int, block_s: int, config: GroupNormConfig) -> dict:
    opts = {"num_warps": config.num_warps or (8 if block_c * block_s >= 2048 else 4)}
    if config.num_stages is not None:
        opts["num_stages"] = config.num_stages
    return opts


def _layout(x: torch.Tensor, fn: str) -> tuple[torch.Tensor, bool]:
    n, c, h, w = x.shape
    if c * h * w >= 2**31:
        raise ValueError(f"{fn}: a sample of x has {c * h * w} elements; the Triton kernel supports < 2**31")
    cl = channels_last(x)
    if not cl and not x.is_contiguous():
        x = x.contiguous()  # the op layer never passes this; kept for direct callers
    return x, cl


def _launch_fwd(x, b, weight, bias, num_groups, eps, relu, cl, residual, config=DEFAULT_CONFIG):
    # x is the norm's input, or the first operand of the sum when residual (b the second).
    fmt = memory_format(cl)
    n, c, h, w = x.shape
    hw, cg = h * w, c // num_groups
    block_c, block_s = _blocks(cg, hw, num_groups, config)
    y = torch.empty_like(x, memory_format=fmt)
    s = torch.empty_like(x, memory_format=fmt) if residual else x
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    gp = config.groups_per_program
    _gn_relu_fwd_kernel[(n * num_groups // gp,)](
        s, y, x, b if residual else x,
        weight if weight is not None else x,
        bias if bias is not None else x,
        mean, rstd,
        c, hw, num_groups, cg, eps,
        HAS_RESIDUAL=residual,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        RELU=relu,
        CHANNELS_LAST=cl,
        GP=gp,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        **_launch_options(block_c, block_s, config),
    )
    return s, y, mean, rstd


def _launch_bwd(grad_y, grad_sum, x, weight, bias, mean, rstd, num_groups, relu, cl, config=DEFAULT_CONFIG):
    fmt = memory_format(cl)
    n, c, h, w = x.shape
    hw, cg = h * w, c // num_groups
    block_c, block_s = _blocks(cg, hw, num_groups, config)
    grad_y = grad_y.contiguous(memory_format=fmt)
    if grad_sum is not None:
        grad_sum = grad_sum.contiguous(memory_format=fmt)
    dx = torch.empty_like(x, memory_format=fmt)
    dw_part = torch.empty((n, c), device=x.device, dtype=torch.float32)
    db_part = torch.empty((n, c), device=x.device, dtype=torch.float32)
    gp = config.groups_per_program
    _gn_relu_bwd_kernel[(n * num_groups // gp,)](
        grad_y, x,
        weight if weight is not None else x,
        bias if bias is not None else x,
        mean.contiguous(), rstd.contiguous(),
        dx, grad_sum if grad_sum is not None else dx, dw_part, db_part,
        c, hw, num_groups, cg,
        HAS_GRAD_SUM=grad_sum is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        RELU=relu,
        CHANNELS_LAST=cl,
        GP=gp,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        **_launch_options(block_c, block_s, config),
    )
    pdtype = weight.dtype if weight is not None else torch.float32
    return dx, dw_part.sum(0).to(pdtype), db_part.sum(0).to(pdtype)


def group_norm_relu_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    relu: bool,
    config: GroupNormConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm(+ReLU) of ``x`` (NCHW or channels_last) plus (N, G) float32 mean and rstd,
    launched as ``config`` says."""
    x, cl = _layout(x, "group_norm_relu_fwd")
    _, y, mean, rstd = _launch_fwd(x, None, weight, bias, num_groups, eps, relu, cl, residual=False, config=config)
    return y, mean, rstd


def group_norm_relu_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    relu: bool,
    config: GroupNormConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. ``x`` (x's dtype and memory format), ``weight`` and ``bias``
    (weight's dtype, float32 when weight is None), launched as ``config`` says."""
    x, cl = _layout(x, "group_norm_relu_bwd")
    return _launch_bwd(grad_y, None, x, weight, bias, mean, rstd, num_groups, relu, cl, config)


def group_norm_relu_add_fwd(
    a: torch.Tensor,
    b: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    relu: bool,
    config: GroupNormConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sum ``a + b`` and its GroupNorm(+ReLU), in ``a``'s memory format (NCHW or
    channels_last; ``b`` is brought to it), plus (N, G) float32 mean and rstd, launched
    as ``config`` says."""
    a, cl = _layout(a, "group_norm_relu_add_fwd")
    b = b.contiguous(memory_format=memory_format(cl))
    return _launch_fwd(a, b, weight, bias, num_groups, eps, relu, cl, residual=True, config=config)


def group_norm_relu_add_bwd(
    grad_y: torch.Tensor,
    grad_sum: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    relu: bool,
    config: GroupNormConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grad_sum`` (None: zero) plus the GroupNorm(+ReLU) gradient w.r.t. the sum ``s``,
    in ``s``'s dtype and memory format, and the gradients w.r.t. ``weight`` and ``bias``,
    launched as ``config`` says."""
    s, cl = _layout(s, "group_norm_relu_add_bwd")
    return _launch_bwd(grad_y, grad_sum, s, weight, bias, mean, rstd, num_groups, relu, cl, config)
