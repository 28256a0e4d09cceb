// The per-channel reductions and pointwise passes shared by GroupNorm+ReLU and
// BatchNorm+ReLU on CUDA (see cuda/norm_common.h for the indexing conventions).
//
// Loads and stores move 16 bytes per thread (8 fp16/bf16, 4 fp32, 2 fp64 values) when the
// pointers are 16-byte aligned and the innermost dimension of the layout (H * W for NCHW,
// C for channels_last) is a multiple of the vector, so that a vector never straddles two
// (sample, channel) rows; otherwise the same kernels run with one element per thread.
//
// Reductions: NCHW rows of a (sample, channel) are contiguous, so one warp reduces one
// split of one row (coalesced 512-byte reads). channels_last pixels hold C contiguous
// channels, so a block of 32 x 8 threads reduces a tile of 32 vectors of channels over a
// split of pixels, each thread a strided subset of rows, then the 8 rows of threads are
// merged through shared memory in order. Statistics use Welford's update per thread and
// Chan's merge across threads, in the math type (float32, float64 for fp64 inputs).
#include "cuda/norm_common.h"

#include "cuda/reduce.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace bitfast::cuda {
namespace {

constexpr int kThreads = 256;      // threads per block of every launch here
constexpr int kWarps = kThreads / 32;
constexpr int kTX = 32, kTY = 8;   // channels_last reductions: vectors of channels x rows

// ---------------------------------------------------------------------------------------
// reductions
// ---------------------------------------------------------------------------------------

// What a reduction accumulates per channel, from x (and dy, in the backward).
//   stats: Welford (mean, m2) of x; the count is kept per thread.
//   bwd:   (sum d, sum d * (x - mu)) with d = dy masked by the forward's ReLU.
template <typename acc_t, bool BWD>
struct Acc {
  acc_t a = acc_t(0), b = acc_t(0);
  __device__ __forceinline__ void add(acc_t x, acc_t dy, acc_t inv_count, acc_t sc, acc_t sh, acc_t mu, bool relu) {
    if constexpr (BWD) {
      const acc_t d = (!relu || x * sc + sh > acc_t(0)) ? dy : acc_t(0);
      a += d;
      b += d * (x - mu);
    } else {
      welford_add(a, b, x, inv_count);
    }
  }
};

// NCHW: one warp per (sample n, split j, channel c) segment; segments are numbered
// ((n * S) + j) * C + c, the index of its partial.
template <typename scalar_t, typename acc_t, int VEC, bool BWD>
__global__ void __launch_bounds__(kThreads) _nchw_partials_kernel(
    const scalar_t* __restrict__ X,   // (N, C, HW) contiguous
    const scalar_t* __restrict__ DY,  // like X (BWD), else unused
    const acc_t* __restrict__ SC,     // BWD: forward scale at n * KN + c
    const acc_t* __restrict__ SH,     // BWD: forward shift at n * KN + c
    const acc_t* __restrict__ MU,     // BWD: the mean x was centred with, at n * KN + c
    acc_t* __restrict__ P0,           // (N, S, C) mean (stats) or sum d (BWD)
    acc_t* __restrict__ P1,           // (N, S, C) m2 (stats) or sum d * (x - mu) (BWD)
    acc_t* __restrict__ P2,           // (N, S, C) count (stats), else unused
    int64_t C,                        // channels
    int64_t HW,                       // pixels per sample; a multiple of VEC
    int64_t S,                        // splits per sample
    int64_t RPS,                      // pixels per split; a multiple of VEC
    int64_t KN,                       // coefficient stride per sample: C or 0
    int64_t SEGMENTS,                 // N * S * C
    bool RELU) {                      // BWD: mask by the forward's ReLU
  const int lane = threadIdx.x & 31;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (q >= SEGMENTS) return;  // a whole warp: no block barrier below
  const int64_t c = q % C, nj = q / C, n = nj / S, j = nj % S;
  const int64_t row = (n * C + c) * HW;
  const int64_t p0 = j * RPS, p1 = min(HW, p0 + RPS);
  acc_t sc = acc_t(0), sh = acc_t(0), mu = acc_t(0);
  if constexpr (BWD) {
    sc = SC[n * KN + c];
    sh = SH[n * KN + c];
    mu = MU[n * KN + c];
  }
  Acc<acc_t, BWD> acc;
  acc_t count = acc_t(0);
  for (int64_t p = p0 + lane * VEC; p < p1; p += 32 * VEC) {
    const Pack<scalar_t, VEC> xv = load_pack<scalar_t, VEC>(X + row + p);
    Pack<scalar_t, VEC> dv;
    if constexpr (BWD) dv = load_pack<scalar_t, VEC>(DY + row + p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      count += acc_t(1);
      acc.add(static_cast<acc_t>(xv.v[e]), BWD ? static_cast<acc_t>(dv.v[e]) : acc_t(0), acc_t(1) / count, sc, sh,
              mu, RELU);
    }
  }
  if constexpr (BWD) {
    const acc_t a = warp_sum(acc.a), b = warp_sum(acc.b);
    if (lane == 0) {
      P0[q] = a;
      P1[q] = b;
    }
  } else {
    const Welford<acc_t> w = warp_welford(Welford<acc_t>{acc.a, acc.b, count});
    if (lane == 0) {
      P0[q] = w.mean;
      P1[q] = w.m2;
      P2[q] = w.count;
    }
  }
}

// channels_last: block (x, j, n) reduces channels [x * kTX * VEC, ...) over the pixels of
// split j of sample n; thread (tx, ty) takes VEC channels and every kTY-th pixel.
template <typename scalar_t, typename acc_t, int VEC, bool BWD>
__global__ void __launch_bounds__(kThreads) _cl_partials_kernel(
    const scalar_t* __restrict__ X,   // (N, HW, C) channels_last
    const scalar_t* __restrict__ DY,  // like X (BWD), else unused
    const acc_t* __restrict__ SC,     // BWD: forward scale at n * KN + c
    const acc_t* __restrict__ SH,     // BWD: forward shift at n * KN + c
    const acc_t* __restrict__ MU,     // BWD: the mean x was centred with, at n * KN + c
    acc_t* __restrict__ P0,           // (N, S, C) mean (stats) or sum d (BWD)
    acc_t* __restrict__ P1,           // (N, S, C) m2 (stats) or sum d * (x - mu) (BWD)
    acc_t* __restrict__ P2,           // (N, S, C) count (stats), else unused
    int64_t C,                        // channels; a multiple of VEC
    int64_t HW,                       // pixels per sample
    int64_t S,                        // splits per sample (gridDim.y)
    int64_t RPS,                      // pixels per split
    int64_t KN,                       // coefficient stride per sample: C or 0
    bool RELU) {                      // BWD: mask by the forward's ReLU
  __shared__ acc_t s_a[kTY][kTX * VEC];
  __shared__ acc_t s_b[kTY][kTX * VEC];
  __shared__ acc_t s_n[kTY];
  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * kTX + tx) * VEC;
  const int64_t j = blockIdx.y, n = blockIdx.z;
  const int64_t p0 = j * RPS, p1 = min(HW, p0 + RPS);
  const bool active = c0 < C;
  Acc<acc_t, BWD> acc[VEC];
  acc_t sc[VEC], sh[VEC], mu[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) sc[e] = sh[e] = mu[e] = acc_t(0);
  if (BWD && active) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      sc[e] = SC[n * KN + c0 + e];
      sh[e] = SH[n * KN + c0 + e];
      mu[e] = MU[n * KN + c0 + e];
    }
  }
  acc_t count = acc_t(0);
  if (active) {
    for (int64_t p = p0 + ty; p < p1; p += kTY) {
      const int64_t off = (n * HW + p) * C + c0;
      const Pack<scalar_t, VEC> xv = load_pack<scalar_t, VEC>(X + off);
      Pack<scalar_t, VEC> dv;
      if constexpr (BWD) dv = load_pack<scalar_t, VEC>(DY + off);
      count += acc_t(1);
      const acc_t inv = acc_t(1) / count;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        acc[e].add(static_cast<acc_t>(xv.v[e]), BWD ? static_cast<acc_t>(dv.v[e]) : acc_t(0), inv, sc[e], sh[e],
                   mu[e], RELU);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    s_a[ty][tx * VEC + e] = acc[e].a;
    s_b[ty][tx * VEC + e] = acc[e].b;
  }
  if (tx == 0) s_n[ty] = count;
  __syncthreads();
  if (ty != 0 || !active) return;
  const int64_t out = (n * S + j) * C + c0;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    if constexpr (BWD) {
      acc_t a = acc_t(0), b = acc_t(0);
      for (int t = 0; t < kTY; ++t) {
        a += s_a[t][tx * VEC + e];
        b += s_b[t][tx * VEC + e];
      }
      P0[out + e] = a;
      P1[out + e] = b;
    } else {
      Welford<acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
      for (int t = 0; t < kTY; ++t) {
        w = welford_merge(w, Welford<acc_t>{s_a[t][tx * VEC + e], s_b[t][tx * VEC + e], s_n[t]});
      }
      P0[out + e] = w.mean;
      P1[out + e] = w.m2;
      P2[out + e] = w.count;
    }
  }
}

// ---------------------------------------------------------------------------------------
// pointwise passes
// ---------------------------------------------------------------------------------------

// Forward (BWD false): OUT = relu?(X * SC[k] + SH[k]).
// Backward (BWD true): OUT = A[k] * d + KX[k] * X + K0[k] (+ GS), d = DY masked by the ReLU.
// Thread i handles elements [i * VEC, (i + 1) * VEC), which share their sample and, in
// NCHW, their channel (the innermost dimension is a multiple of VEC).
template <typename scalar_t, typename acc_t, int VEC, bool CL, bool BWD>
__global__ void __launch_bounds__(kThreads) _pointwise_kernel(
    const scalar_t* __restrict__ X,   // (N, C, H, W), NCHW or channels_last
    const scalar_t* __restrict__ DY,  // like X (BWD), else unused
    const scalar_t* __restrict__ GS,  // like X, added to OUT (BWD), or nullptr
    scalar_t* __restrict__ OUT,       // like X
    const acc_t* __restrict__ SC,     // forward scale at k = n * KN + c
    const acc_t* __restrict__ SH,     // forward shift at k
    const acc_t* __restrict__ A,      // BWD: coefficient of d at k
    const acc_t* __restrict__ KX,     // BWD: coefficient of x at k
    const acc_t* __restrict__ K0,     // BWD: constant term at k
    int64_t C,                        // channels
    int64_t HW,                       // pixels per sample
    int64_t KN,                       // coefficient stride per sample: C or 0
    int64_t NVEC,                     // numel / VEC
    bool RELU) {                      // apply (forward) or mask by (backward) the ReLU
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < NVEC; v += stride) {
    const int64_t i = v * VEC;
    int64_t c, n;
    if constexpr (CL) {
      c = i % C;
      n = i / (HW * C);
    } else {
      const int64_t nc = i / HW;
      c = nc % C;
      n = nc / C;
    }
    const int64_t k = n * KN + c;
    const Pack<scalar_t, VEC> xv = load_pack<scalar_t, VEC>(X + i);
    Pack<scalar_t, VEC> dv, gv{}, ov;
    if constexpr (BWD) {
      dv = load_pack<scalar_t, VEC>(DY + i);
      if (GS != nullptr) gv = load_pack<scalar_t, VEC>(GS + i);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int64_t ke = CL ? k + e : k;
      const acc_t x = static_cast<acc_t>(xv.v[e]);
      const acc_t pre = x * SC[ke] + SH[ke];
      if constexpr (BWD) {
        const acc_t d = (!RELU || pre > acc_t(0)) ? static_cast<acc_t>(dv.v[e]) : acc_t(0);
        const acc_t g = A[ke] * d + KX[ke] * x + K0[ke];
        ov.v[e] = static_cast<scalar_t>(GS != nullptr ? g + static_cast<acc_t>(gv.v[e]) : g);
      } else {
        ov.v[e] = static_cast<scalar_t>(RELU && pre < acc_t(0) ? acc_t(0) : pre);
      }
    }
    store_pack<scalar_t, VEC>(OUT + i, ov);
  }
}

// ---------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------

template <typename scalar_t>
constexpr int vec_of() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether the vectorized kernels apply: aligned pointers and an innermost dimension that
// is a multiple of the vector.
template <typename scalar_t>
bool can_vectorize(const NormShape& s, std::initializer_list<const void*> ptrs) {
  constexpr int vec = vec_of<scalar_t>();
  if ((s.channels_last ? s.C : s.HW) % vec != 0) return false;
  return std::all_of(ptrs.begin(), ptrs.end(), [](const void* p) { return p == nullptr || aligned16(p); });
}

template <typename scalar_t, typename acc_t, int VEC, bool BWD>
void launch_partials(const scalar_t* x, const scalar_t* dy, const acc_t* sc, const acc_t* sh, const acc_t* mu,
                     acc_t* p0, acc_t* p1, acc_t* p2, int64_t kn, bool relu, const NormShape& s) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (s.channels_last) {
    // one grid dimension per sample
    TORCH_CHECK(s.N <= 65535, "bitfast CUDA norms: channels_last x has ", s.N,
                " samples; these kernels take at most 65535");
    const dim3 grid(blocks_for(s.C, kTX * VEC), static_cast<unsigned>(s.S), static_cast<unsigned>(s.N));
    _cl_partials_kernel<scalar_t, acc_t, VEC, BWD>
        <<<grid, kThreads, 0, stream>>>(x, dy, sc, sh, mu, p0, p1, p2, s.C, s.HW, s.S, s.rps, kn, relu);
  } else {
    const int64_t segments = s.N * s.S * s.C;
    _nchw_partials_kernel<scalar_t, acc_t, VEC, BWD><<<blocks_for(segments, kWarps), kThreads, 0, stream>>>(
        x, dy, sc, sh, mu, p0, p1, p2, s.C, s.HW, s.S, s.rps, kn, segments, relu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int VEC, bool BWD>
void launch_pointwise(const scalar_t* x, const scalar_t* dy, const scalar_t* gs, scalar_t* out, const acc_t* sc,
                      const acc_t* sh, const acc_t* a, const acc_t* kx, const acc_t* k0, int64_t kn, bool relu,
                      const NormShape& s, const PointwiseLaunch& launch) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t nvec = s.N * s.C * s.HW / VEC;
  const int threads = launch.threads > 0 ? std::min(launch.threads, kThreads) : kThreads;
  const int64_t per_thread = launch.vectors > 0 ? launch.vectors : 1;
  // a grid-stride loop: at most 2^16 blocks, each thread then handles a few vectors
  const unsigned blocks = std::min<unsigned>(blocks_for((nvec + per_thread - 1) / per_thread, threads), 1u << 16);
  if (s.channels_last) {
    _pointwise_kernel<scalar_t, acc_t, VEC, true, BWD>
        <<<blocks, threads, 0, stream>>>(x, dy, gs, out, sc, sh, a, kx, k0, s.C, s.HW, kn, nvec, relu);
  } else {
    _pointwise_kernel<scalar_t, acc_t, VEC, false, BWD>
        <<<blocks, threads, 0, stream>>>(x, dy, gs, out, sc, sh, a, kx, k0, s.C, s.HW, kn, nvec, relu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

NormShape norm_shape(const at::Tensor& x, bool channels_last, int64_t split_target) {
  NormShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.HW = x.size(2) * x.size(3);
  s.channels_last = channels_last;
  // Splits: enough blocks (or warps) to fill a GPU even for a few samples of few channels,
  // few enough that each reduces a useful run of pixels. rps is a multiple of 8, so NCHW
  // splits start on a 16-byte boundary for every dtype.
  const int64_t hw = std::max<int64_t>(s.HW, 1);
  int64_t want, lo, hi;
  if (channels_last) {
    const int vec = static_cast<int>(16 / x.element_size());
    const int64_t tiles = ceil_div(s.C, kTX * vec);
    want = ceil_div(split_target > 0 ? split_target : 512, tiles * s.N);  // blocks
    lo = ceil_div(hw, 1024);            // at most 128 pixels per thread row
    hi = std::max<int64_t>(1, hw / 64);  // at least 8 pixels per thread row
  } else {
    want = ceil_div(split_target > 0 ? split_target : 4096, s.N * s.C);  // warps
    lo = ceil_div(hw, 4096);
    hi = std::max<int64_t>(1, hw / 256);
  }
  const int64_t splits = std::min<int64_t>(65535, std::max(lo, std::min(want, hi)));
  s.rps = ceil_div(ceil_div(hw, splits), 8) * 8;
  s.S = ceil_div(hw, s.rps);
  return s;
}

void channel_stats_partials(const at::Tensor& x, const NormShape& s, at::Tensor& part) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bitfast_norm_stats_partials", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t stride = s.N * s.S * s.C;
    acc_t* p = part.data_ptr<acc_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (can_vectorize<scalar_t>(s, {xp})) {
      launch_partials<scalar_t, acc_t, vec_of<scalar_t>(), false>(xp, nullptr, nullptr, nullptr, nullptr, p,
                                                                  p + stride, p + 2 * stride, 0, false, s);
    } else {
      launch_partials<scalar_t, acc_t, 1, false>(xp, nullptr, nullptr, nullptr, nullptr, p, p + stride,
                                                 p + 2 * stride, 0, false, s);
    }
  });
}

void channel_bwd_partials(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& sc, const at::Tensor& sh,
                          const at::Tensor& mu, int64_t kn, bool relu, const NormShape& s, at::Tensor& part) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bitfast_norm_bwd_partials", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t stride = s.N * s.S * s.C;
    acc_t* p = part.data_ptr<acc_t>();
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *dp = dy.const_data_ptr<scalar_t>();
    const acc_t *scp = sc.const_data_ptr<acc_t>(), *shp = sh.const_data_ptr<acc_t>(), *mup = mu.const_data_ptr<acc_t>();
    if (can_vectorize<scalar_t>(s, {xp, dp})) {
      launch_partials<scalar_t, acc_t, vec_of<scalar_t>(), true>(xp, dp, scp, shp, mup, p, p + stride, nullptr, kn,
                                                                 relu, s);
    } else {
      launch_partials<scalar_t, acc_t, 1, true>(xp, dp, scp, shp, mup, p, p + stride, nullptr, kn, relu, s);
    }
  });
}

void affine_relu(const at::Tensor& x, const at::Tensor& sc, const at::Tensor& sh, int64_t kn, bool relu,
                 const NormShape& s, at::Tensor& y, const PointwiseLaunch& launch) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bitfast_norm_affine_relu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const acc_t *scp = sc.const_data_ptr<acc_t>(), *shp = sh.const_data_ptr<acc_t>();
    if (can_vectorize<scalar_t>(s, {xp, yp})) {
      launch_pointwise<scalar_t, acc_t, vec_of<scalar_t>(), false>(xp, nullptr, nullptr, yp, scp, shp, nullptr,
                                                                   nullptr, nullptr, kn, relu, s, launch);
    } else {
      launch_pointwise<scalar_t, acc_t, 1, false>(xp, nullptr, nullptr, yp, scp, shp, nullptr, nullptr, nullptr, kn,
                                                  relu, s, launch);
    }
  });
}

void bwd_dx(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& sc, const at::Tensor& sh,
            const at::Tensor& a, const at::Tensor& kx, const at::Tensor& k0, int64_t kn, bool relu,
            const NormShape& s, at::Tensor& dx, const at::Tensor& gs, const PointwiseLaunch& launch) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bitfast_norm_bwd_dx", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *dp = dy.const_data_ptr<scalar_t>();
    const scalar_t* gp = gs.defined() ? gs.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = dx.data_ptr<scalar_t>();
    const acc_t *scp = sc.const_data_ptr<acc_t>(), *shp = sh.const_data_ptr<acc_t>();
    const acc_t *ap = a.const_data_ptr<acc_t>(), *kxp = kx.const_data_ptr<acc_t>(), *k0p = k0.const_data_ptr<acc_t>();
    if (can_vectorize<scalar_t>(s, {xp, dp, gp, op})) {
      launch_pointwise<scalar_t, acc_t, vec_of<scalar_t>(), true>(xp, dp, gp, op, scp, shp, ap, kxp, k0p, kn, relu,
                                                                  s, launch);
    } else {
      launch_pointwise<scalar_t, acc_t, 1, true>(xp, dp, gp, op, scp, shp, ap, kxp, k0p, kn, relu, s, launch);
    }
  });
}

}  // namespace bitfast::cuda
