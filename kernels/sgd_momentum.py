"""Triton multi-tensor SGD step with momentum (``torch.optim.SGD``'s update, term for term),
with the learning rate read from a device tensor when one is given, and an optional
exponential moving average of the parameters updated in the same pass.

The contract is ``bitfast.ops.reference.sgd_momentum_``. One launch updates every tensor
of the list: the launcher writes the tensors' addresses into small int64 tables and cuts
each tensor into chunks of ``_CHUNK`` elements; program ``i`` looks up its chunk's tensor
and start, turns the addresses back into typed pointers and updates that chunk (params
and momentum buffers in place). Math is float32 whatever the storage dtype, so a half
precision buffer is rounded once per step rather than after every term. The average, when
asked for, is updated from the parameter as stored (rounded), right after it is written,
so ``p`` is read from memory once; it may be float32 while the params are half precision.
A tensor learning rate is loaded by every program (one cached scalar), never by the host.

Each tensor is walked in storage order, so params, grads and buffers must share one dense
layout (contiguous, channels_last, a transpose ...). A tensor whose layout differs from its
param's, or a param that is not dense (a strided slice), goes through a working copy in
the param's layout, written back after the launch.

Launch configuration (``SgdConfig``; ``sgd_momentum_`` takes ``config=``, the default is
``DEFAULT_CONFIG``): elements per loop step, loop steps per program, warps, pipeline
stages, and ``aligned``, which tells the compiler that every address is 16-byte aligned
(checked by the launcher for each call: a call with an unaligned tensor launches without
the hint), so loads and stores may be vectorized. The default launches without the hint.
``tools/kernel_sweep.py`` times these configurations on a GPU.

Not yet done: the tables are rebuilt on the host at every step.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

_BLOCK = 2048  # elements per loop step
_CHUNK = 4 * _BLOCK  # elements per program



def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class SgdConfig:
    """How the Triton SGD kernel is launched: ``block`` elements per loop step (a power of
    two, at least 16), ``blocks_per_chunk`` loop steps per program (a chunk of a tensor),
    ``num_warps`` (a power of two up to 32), ``num_stages`` (None: Triton's default) and
    ``aligned`` (assert 16-byte aligned addresses to the compiler when every tensor of the
    call is so aligned). Any configuration gives the same values, bit for bit: each element
    is updated by the same arithmetic wherever it falls."""

    block: int = _BLOCK
    blocks_per_chunk: int = _CHUNK // _BLOCK
    num_warps: int = 8
    num_stages: int | None = None
    aligned: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or not _pow2(self.block) or self.block < 16:
            raise ValueError(f"SgdConfig: block is {self.block!r}; expected a power of two >= 16")
        if not isinstance(self.blocks_per_chunk, int) or self.blocks_per_chunk < 1:
            raise ValueError(f"SgdConfig: blocks_per_chunk is {self.blocks_per_chunk!r}; expected an int >= 1")
        if not isinstance(self.num_warps, int) or not _pow2(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"SgdConfig: num_warps is {self.num_warps!r}; expected a power of two <= 32")
        if self.num_stages is not None and (not isinstance(self.num_stages, int) or self.num_stages < 1):
            raise ValueError(f"SgdConfig: num_stages is {self.num_stages!r}; expected None or an int >= 1")

    @property
    def chunk(self) -> int:
        """Elements per program."""
        return self.block * self.blocks_per_chunk

    def label(self) -> str:
        """A short name of the configuration, listing what differs from the default."""
        parts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                 if getattr(self, f.name) != f.default]
        return ",".join(parts) or "default"


DEFAULT_CONFIG = SgdConfig()

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _round_to(
    X,  # values to store, float32 tensor
    DTYPE: tl.constexpr,  # storage element type
):
    # float32 -> bfloat16 rounded to nearest even by hand: the Triton interpreter (what CI
    # runs) truncates in this cast, and a truncated parameter drifts a little every step.
    # On a GPU this is what the native conversion does; it costs a few integer ops here.
    if DTYPE == tl.bfloat16:
        bits = X.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(X == X, y, X.to(tl.bfloat16))  # NaN stays NaN
    else:
        return X.to(DTYPE)


@triton.jit
def _sgd_momentum_kernel(
    P_ADDR,  # param addresses, (T,) int64
    G_ADDR,  # grad addresses, (T,) int64
    M_ADDR,  # momentum buffer addresses, (T,) int64; unused unless HAS_MOMENTUM
    E_ADDR,  # average (EMA) addresses, (T,) int64; unused unless HAS_EMA
    NUMEL,  # elements of each tensor, (T,) int64
    CHUNK_TENSOR,  # tensor of each chunk, (num_chunks,) int32
    CHUNK_START,  # first element of each chunk within its tensor, (num_chunks,) int64
    lr,  # learning rate, unless LR_FROM_PTR
    LR_PTR,  # one-element float32 tensor holding the learning rate; read when LR_FROM_PTR
    momentum,  # momentum factor
    dampening,  # dampening of the gradient in the buffer update
    weight_decay,  # L2 penalty added to the gradient
    ema_weight,  # 1 - ema_decay: ema += ema_weight * (p - ema)
    DTYPE: tl.constexpr,  # element type of params, grads and buffers
    EMA_DTYPE: tl.constexpr,  # element type of the averages
    LR_FROM_PTR: tl.constexpr,  # the learning rate is *LR_PTR
    HAS_EMA: tl.constexpr,  # update the averages
    HAS_MOMENTUM: tl.constexpr,  # momentum != 0
    HAS_WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
    NESTEROV: tl.constexpr,  # Nesterov momentum
    MAXIMIZE: tl.constexpr,  # ascend instead of descend
    FIRST_STEP: tl.constexpr,  # buffers are initialised with the first direction
    BLOCK: tl.constexpr,  # elements per loop step
    CHUNK: tl.constexpr,  # elements per program, a multiple of BLOCK
    ALIGNED: tl.constexpr = False,  # every address is 16-byte aligned (checked by the launcher)
):
    pid = tl.program_id(0)
    t = tl.load(CHUNK_TENSOR + pid)
    start = tl.load(CHUNK_START + pid)
    numel = tl.load(NUMEL + t)
    p_ptr = tl.load(P_ADDR + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(G_ADDR + t).to(tl.pointer_type(DTYPE))
    if HAS_MOMENTUM:
        m_ptr = tl.load(M_ADDR + t).to(tl.pointer_type(DTYPE))
    if HAS_EMA:
        e_ptr = tl.load(E_ADDR + t).to(tl.pointer_type(EMA_DTYPE))
    if ALIGNED:
        # chunk starts are multiples of CHUNK (>= 16 elements), the tensors 16-byte aligned
        start = tl.multiple_of(start, 16)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        if HAS_MOMENTUM:
            m_ptr = tl.multiple_of(m_ptr, 16)
        if HAS_EMA:
            e_ptr = tl.multiple_of(e_ptr, 16)
    if LR_FROM_PTR:
        step_size = tl.load(LR_PTR).to(tl.float32)
    else:
        step_size = lr
    offs = tl.arange(0, BLOCK)
    # A tensor's last chunk stops at its end (small tensors are common: biases, norms).
    for off in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
        idx = start + off + offs
        mask = idx < numel
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            d = -d
        if HAS_WEIGHT_DECAY:
            d = d + weight_decay * p
        if HAS_MOMENTUM:
            if FIRST_STEP:
                buf = d
            else:
                buf = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
                buf = momentum * buf + (1.0 - dampening) * d
            tl.store(m_ptr + idx, _round_to(buf, DTYPE), mask=mask)
            if NESTEROV:
                d = d + momentum * buf
            else:
                d = buf
        p = _round_to(p - step_size * d, DTYPE)
        tl.store(p_ptr + idx, p, mask=mask)
        if HAS_EMA:
            e = tl.load(e_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            e = e + ema_weight * (p.to(tl.float32) - e)
            tl.store(e_ptr + idx, _round_to(e, EMA_DTYPE), mask=mask)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill a gap-free block of memory in some dim order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def sgd_momentum_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    lr_tensor: torch.Tensor | None = None,
    ema_params: list[torch.Tensor] = (),
    ema_decay: float = 0.0,
    config: SgdConfig = DEFAULT_CONFIG,
) -> None:
    """One in-place SGD step over lists of same-dtype tensors on one device, one launch;
    the learning rate is ``lr_tensor`` (read on the device) when given, and the averages
    ``ema_params`` (the params' dtype or float32) are updated when the list is not empty.
    ``config`` says how the kernel is launched (the values do not depend on it)."""
    chunk = config.chunk
    has_momentum = momentum != 0
    has_ema = len(ema_params) > 0
    addrs: list[list[int]] = [[], [], [], []]
    numels: list[int] = []
    chunk_tensor: list[int] = []
    chunk_start: list[int] = []
    write_back: list[tuple[torch.Tensor, torch.Tensor]] = []
    keep: list[torch.Tensor] = []  # working copies stay alive until the launch is queued
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        ref = p if _dense(p) else p.contiguous()
        group = (p, grads[i], momentum_buffers[i] if has_momentum else None, ema_params[i] if has_ema else None)
        for k, t in enumerate(group):
            if t is None:
                addrs[k].append(0)
                continue
            if t.stride() != ref.stride() or not _dense(t):
                w = torch.empty_like(ref, dtype=t.dtype).copy_(t)
                keep.append(w)
                if k != 1:  # params, buffers and averages are updated: copy the result back
                    write_back.append((t, w))
                t = w
            addrs[k].append(t.data_ptr())
        for s in range(0, n, chunk):
            chunk_tensor.append(len(numels))
            chunk_start.append(s)
        numels.append(n)
    if not numels:
        return
    device = params[0].device
    # the hint holds only if every tensor the kernel walks starts on a 16-byte boundary
    aligned = config.aligned and all(a % 16 == 0 for table in addrs for a in table)
    tables = torch.tensor(addrs + [numels], dtype=torch.int64).to(device)
    chunks_t = torch.tensor(chunk_tensor, dtype=torch.int32).to(device)
    chunks_s = torch.tensor(chunk_start, dtype=torch.int64).to(device)
    _sgd_momentum_kernel[(len(chunk_tensor),)](
        tables[0], tables[1], tables[2], tables[3], tables[4],
        chunks_t, chunks_s,
        lr, tables[4] if lr_tensor is None else lr_tensor,  # the numel table: never read
        momentum, dampening, weight_decay, 1.0 - ema_decay,
        DTYPE=_TL_DTYPES[params[0].dtype],
        EMA_DTYPE=_TL_DTYPES[ema_params[0].dtype] if has_ema else _TL_DTYPES[params[0].dtype],
        LR_FROM_PTR=lr_tensor is not None,
        HAS_EMA=has_ema,
        HAS_MOMENTUM=has_momentum,
        HAS_WEIGHT_DECAY=weight_decay != 0,
        NESTEROV=nesterov,
        MAXIMIZE=maximize,
        FIRST_STEP=is_first_step,
        BLOCK=config.block,
        CHUNK=chunk,
        **({"ALIGNED": True} if aligned else {}),
        num_warps=config.num_warps,
        **({} if config.num_stages is None else {"num_stages": config.num_stages}),
    )
    for t, w in write_back:
        t.copy_(w)
