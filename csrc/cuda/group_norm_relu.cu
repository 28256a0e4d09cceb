// GroupNorm+ReLU on CUDA, NCHW and channels_last, without transposing either.
//
// Forward, when the group fits in shared memory (every group of BiT-R50x1 does: at most
// 8 x 56 x 56 elements, 49 KB in bf16, 100 KB in fp32): one block per (sample, group)
// reads the group from global memory once, 16 bytes per thread where alignment allows,
// into shared memory, takes the mean and then the variance about the mean from there (two
// exact passes, no E[x^2] - E[x]^2 cancellation), and writes y. 4 bytes of traffic per bf16
// element, the floor. In NCHW a group is one contiguous run of C / G * H * W elements; in
// channels_last it is H * W runs of C / G channels, C apart.
//
// Forward, otherwise (two phases): per-(sample, split, channel) Welford partials over the
// pixels (cuda/norm_common.h), merged per (sample, group) in a fixed order into mean, rstd
// and the per-(sample, channel) scale and shift, then one pointwise pass writes y.
//
// Backward: per-(sample, split, channel) sums of d and d * (x - mean), with d = dy masked
// by the recomputed ReLU; per (sample, group) they give grad_weight and grad_bias per
// sample and the two group means dx needs, dx = rstd * (g - mean(g) - xhat * mean(g *
// xhat)) with g = d * weight, written as a[c] * d + kx * x + k0[c] by one pointwise pass.
// grad_weight and grad_bias add the per-sample values in sample order.
//
// No atomics, fixed merge orders: results are bitwise reproducible. Statistics are float32
// (float64 for fp64 inputs), as bitfast.ops.reference.
//
// Launch settings (cuda/launch_config.h), all 0 by default: the fused forward's threads
// per block and bytes per access (16, 8, or one element), the pixel splits of the partial
// reductions, and the pointwise passes' threads and vectors per thread.
#include "cuda/group_norm_relu.h"

#include "ops/group_norm_relu.h"
#include "cuda/launch_config.h"
#include "cuda/norm_common.h"
#include "cuda/reduce.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace bitfast::cuda {
namespace {

constexpr int kThreads = 256;  // threads per block of the small per-(sample, group) kernels

// Bytes of the scale and shift arrays at the head of the fused kernel's shared memory,
// rounded up so that the group after them is 16-byte aligned.
__host__ __device__ inline int64_t coef_bytes(int64_t cg, int64_t acc_size) {
  return (2 * cg * acc_size + 15) / 16 * 16;
}

template <typename scalar_t, typename acc_t, bool CL, int VEC>
__global__ void __launch_bounds__(512) _gn_fwd_smem_kernel(
    const scalar_t* __restrict__ X,  // (N, C, H, W), NCHW or channels_last
    scalar_t* __restrict__ Y,        // like X
    acc_t* __restrict__ MEAN,        // (N, G)
    acc_t* __restrict__ RSTD,        // (N, G) 1 / sqrt(var + eps)
    const acc_t* __restrict__ W,     // (C,) or nullptr (ones)
    const acc_t* __restrict__ B,     // (C,) or nullptr (zeros)
    int64_t C,                       // channels
    int64_t HW,                      // pixels per sample
    int64_t G,                       // groups
    acc_t EPS,                       // added to the variance
    bool RELU) {                     // apply the ReLU
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ acc_t red[32];
  const int64_t ng = blockIdx.x, n = ng / G, g = ng % G;
  // the group fits in shared memory, so its sizes fit in int
  const int cg = static_cast<int>(C / G), hw = static_cast<int>(HW), m = cg * hw;
  acc_t* sc = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sh = sc + cg;
  scalar_t* xs = reinterpret_cast<scalar_t*>(smem_raw + coef_bytes(cg, sizeof(acc_t)));
  // element j of the group: channel-major in NCHW, pixel-major in channels_last (where a
  // vector stays within one pixel: cg is a multiple of VEC)
  const int64_t base = CL ? n * HW * C + g * cg : ng * m;
  auto offset = [&](int j) -> int64_t { return CL ? base + static_cast<int64_t>(j / cg) * C + j % cg : base + j; };
  using V = Pack<scalar_t, VEC>;

  acc_t s = acc_t(0);
  for (int j = threadIdx.x * VEC; j < m; j += blockDim.x * VEC) {
    const V v = *reinterpret_cast<const V*>(X + offset(j));
    *reinterpret_cast<V*>(xs + j) = v;
#pragma unroll
    for (int e = 0; e < VEC; ++e) s += static_cast<acc_t>(v.v[e]);
  }
  const acc_t mean = block_sum(s, red) / static_cast<acc_t>(m);
  acc_t q = acc_t(0);
  for (int j = threadIdx.x; j < m; j += blockDim.x) {
    const acc_t d = static_cast<acc_t>(xs[j]) - mean;
    q += d * d;
  }
  const acc_t rstd = inv_sqrt(block_sum(q, red) / static_cast<acc_t>(m) + EPS);
  if (threadIdx.x == 0) {
    MEAN[ng] = mean;
    RSTD[ng] = rstd;
  }
  for (int c = threadIdx.x; c < cg; c += blockDim.x) {
    const int64_t ch = g * cg + c;
    sc[c] = rstd * (W ? W[ch] : acc_t(1));
    sh[c] = (B ? B[ch] : acc_t(0)) - mean * sc[c];
  }
  __syncthreads();
  for (int j = threadIdx.x * VEC; j < m; j += blockDim.x * VEC) {
    const V v = *reinterpret_cast<const V*>(xs + j);
    V out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int c = CL ? (j + e) % cg : (j + e) / hw;
      const acc_t y = static_cast<acc_t>(v.v[e]) * sc[c] + sh[c];
      out.v[e] = static_cast<scalar_t>(RELU && y < acc_t(0) ? acc_t(0) : y);
    }
    *reinterpret_cast<V*>(Y + offset(j)) = out;
  }
}

// Two-phase forward: merges the Welford partials of the channels of each (sample, group)
// (channel by channel, split by split) into its mean and rstd, and the per-(sample,
// channel) scale and shift of the pointwise pass. One thread per (sample, group).
template <typename acc_t>
__global__ void _gn_stats_finalize_kernel(
    const acc_t* __restrict__ P,   // (3, N, S, C) Welford partials: mean, m2, count
    acc_t* __restrict__ MEAN,      // (N, G)
    acc_t* __restrict__ RSTD,      // (N, G)
    acc_t* __restrict__ SC,        // (N, C) rstd * weight
    acc_t* __restrict__ SH,        // (N, C) bias - mean * rstd * weight
    const acc_t* __restrict__ W,   // (C,) or nullptr
    const acc_t* __restrict__ B,   // (C,) or nullptr
    int64_t N, int64_t C, int64_t G, int64_t S,
    acc_t EPS) {
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ng >= N * G) return;
  const int64_t n = ng / G, g = ng % G, cg = C / G, stride = N * S * C;
  // Merged in float64 (see "Final merges" in cuda/norm_common.h).
  Welford<double> w{0.0, 0.0, 0.0};
  for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
    for (int64_t j = 0; j < S; ++j) {
      const int64_t i = (n * S + j) * C + c;
      w = welford_merge(w, Welford<double>{P[i], P[stride + i], P[2 * stride + i]});
    }
  }
  const acc_t mean = static_cast<acc_t>(w.mean);
  const acc_t rstd = static_cast<acc_t>(inv_sqrt(w.m2 / w.count + static_cast<double>(EPS)));
  MEAN[ng] = mean;
  RSTD[ng] = rstd;
  for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
    const acc_t s = rstd * (W ? W[c] : acc_t(1));
    SC[n * C + c] = s;
    SH[n * C + c] = (B ? B[c] : acc_t(0)) - mean * s;
  }
}

// Backward, before the sums: the forward's per-(sample, channel) scale and shift (for the
// ReLU mask) and mean. One thread per (sample, channel).
template <typename acc_t>
__global__ void _gn_bwd_prep_kernel(
    const acc_t* __restrict__ MEAN,  // (N, G)
    const acc_t* __restrict__ RSTD,  // (N, G)
    const acc_t* __restrict__ W,     // (C,) or nullptr
    const acc_t* __restrict__ B,     // (C,) or nullptr
    acc_t* __restrict__ SC,          // (N, C) out
    acc_t* __restrict__ SH,          // (N, C) out
    acc_t* __restrict__ MU,          // (N, C) out
    int64_t N, int64_t C, int64_t G) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * C) return;
  const int64_t n = i / C, c = i % C, ng = n * G + c / (C / G);
  const acc_t mean = MEAN[ng], s = RSTD[ng] * (W ? W[c] : acc_t(1));
  SC[i] = s;
  SH[i] = (B ? B[c] : acc_t(0)) - mean * s;
  MU[i] = mean;
}

// Backward, after the sums: per (sample, group), the per-sample parameter gradients and
// the coefficients of dx = a * d + kx * x + k0. One thread per (sample, group).
template <typename acc_t>
__global__ void _gn_bwd_coef_kernel(
    const acc_t* __restrict__ P,     // (2, N, S, C) sums of d and d * (x - mean)
    const acc_t* __restrict__ MEAN,  // (N, G)
    const acc_t* __restrict__ RSTD,  // (N, G)
    const acc_t* __restrict__ W,     // (C,) or nullptr
    acc_t* __restrict__ DWN,         // (N, C) out: sum of d * xhat per sample
    acc_t* __restrict__ DBN,         // (N, C) out: sum of d per sample
    acc_t* __restrict__ A,           // (N, C) out
    acc_t* __restrict__ KX,          // (N, C) out
    acc_t* __restrict__ K0,          // (N, C) out
    int64_t N, int64_t C, int64_t G, int64_t S, int64_t HW) {
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ng >= N * G) return;
  const int64_t n = ng / G, g = ng % G, cg = C / G, stride = N * S * C;
  const acc_t mean = MEAN[ng], r = RSTD[ng];
  // Summed in float64 (see "Final merges" in cuda/norm_common.h).
  double sum_g = 0.0, sum_gx = 0.0;
  for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
    double db = 0.0, dwx = 0.0;
    for (int64_t j = 0; j < S; ++j) {
      const int64_t i = (n * S + j) * C + c;
      db += P[i];
      dwx += P[stride + i];
    }
    const double dw = dwx * r, w = W ? W[c] : acc_t(1);
    DBN[n * C + c] = static_cast<acc_t>(db);
    DWN[n * C + c] = static_cast<acc_t>(dw);
    sum_g += w * db;
    sum_gx += w * dw;
  }
  const double m = static_cast<double>(cg * HW);
  const acc_t mg = static_cast<acc_t>(sum_g / m), mgx = static_cast<acc_t>(sum_gx / m);
  for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
    A[n * C + c] = r * (W ? W[c] : acc_t(1));
    KX[n * C + c] = -r * r * mgx;
    K0[n * C + c] = r * r * mgx * mean - r * mg;
  }
}

// grad_weight and grad_bias: the per-sample values added in sample order. One thread per
// channel.
template <typename acc_t>
__global__ void _sum_over_samples_kernel(
    const acc_t* __restrict__ DWN,  // (N, C)
    const acc_t* __restrict__ DBN,  // (N, C)
    acc_t* __restrict__ DW,         // (C,) out
    acc_t* __restrict__ DB,         // (C,) out
    int64_t N, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_t dw = acc_t(0), db = acc_t(0);
  for (int64_t n = 0; n < N; ++n) {
    dw += DWN[n * C + c];
    db += DBN[n * C + c];
  }
  DW[c] = dw;
  DB[c] = db;
}

// The opt-in shared memory per block of the current device (227 KB on an H100, 163 KB on
// an A100), less what the fused kernel declares statically.
int64_t smem_budget() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<int64_t>(bytes) - 1024;
}

// Threads of the fused kernel: full warps, about four vectors each, 64 to 512.
int smem_threads(int64_t vectors) {
  int threads = 64;
  while (threads < 512 && threads * 4 < vectors) threads *= 2;
  return threads;
}

template <typename scalar_t, typename acc_t, bool CL, int VEC>
void launch_fused(const scalar_t* x, scalar_t* y, acc_t* mean, acc_t* rstd, const acc_t* w, const acc_t* b,
                  int64_t N, int64_t C, int64_t HW, int64_t G, int64_t bytes, double eps, bool relu) {
  auto kernel = _gn_fwd_smem_kernel<scalar_t, acc_t, CL, VEC>;
  if (bytes > 48 * 1024) {
    // beyond the default 48 KB a kernel must opt in to its dynamic shared memory
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  const int64_t m = C / G * HW;
  const int64_t threads = launch_knob(Knob::kGnFwdThreads);
  kernel<<<static_cast<unsigned>(N * G), threads ? static_cast<int>(threads) : smem_threads(m / VEC),
           static_cast<size_t>(bytes),
           c10::cuda::getCurrentCUDAStream()>>>(x, y, mean, rstd, w, b, C, HW, G, static_cast<acc_t>(eps), relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned_to(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// The pointwise passes' launch settings.
PointwiseLaunch pointwise_launch() {
  return {static_cast<int>(launch_knob(Knob::kGnPointwiseThreads)),
          static_cast<int>(launch_knob(Knob::kGnPointwiseVectors))};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_relu_fwd(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   int64_t num_groups, double eps, bool relu) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool cl = is_channels_last(x);
  const at::Tensor xc = x.contiguous(format_of(cl));
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), G = num_groups, cg = C / G;
  const auto acc = stat_dtype(x.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(format_of(cl)));
  at::Tensor mean = at::empty({N, G}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({N, G}, x.options().dtype(acc));
  if (x.numel() == 0) {
    // 0 / 0: the reference's mean of nothing
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, mean, rstd};
  }
  const at::Tensor w = param_as(weight, acc), b = param_as(bias, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "native_group_norm_relu_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int VEC = static_cast<int>(16 / sizeof(scalar_t));
    const int64_t bytes = coef_bytes(cg, sizeof(acc_t)) + cg * HW * static_cast<int64_t>(sizeof(scalar_t));
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t *mp = mean.data_ptr<acc_t>(), *rp = rstd.data_ptr<acc_t>();
    const acc_t *wp = ptr_or_null<acc_t>(w), *bp = ptr_or_null<acc_t>(b);
    if (bytes <= smem_budget() && N * G <= std::numeric_limits<int32_t>::max()) {
      // vectors stay inside a contiguous run: the whole group (NCHW) or a pixel's channels;
      // 16-byte vectors where they fit (or 8-byte ones when the launch settings ask), else
      // one element per access
      constexpr int HALF = VEC > 1 ? VEC / 2 : 1;
      const int64_t inner = cl ? cg : cg * HW, vec_bytes = launch_knob(Knob::kGnFwdVecBytes);
      auto fits = [&](int v) {
        const int align = v * static_cast<int>(sizeof(scalar_t));
        return aligned_to(xp, align) && aligned_to(yp, align) && inner % v == 0;
      };
      const int v = (vec_bytes == 0 || vec_bytes == 16) && fits(VEC) ? VEC : (vec_bytes == 8 && fits(HALF) ? HALF : 1);
      auto launch = [&](auto cl_tag, auto vec_tag) {
        launch_fused<scalar_t, acc_t, decltype(cl_tag)::value, decltype(vec_tag)::value>(xp, yp, mp, rp, wp, bp, N, C,
                                                                                          HW, G, bytes, eps, relu);
      };
      auto with_vec = [&](auto cl_tag) {
        if (v == VEC) {
          launch(cl_tag, std::integral_constant<int, VEC>{});
        } else if (v == HALF) {
          launch(cl_tag, std::integral_constant<int, HALF>{});
        } else {
          launch(cl_tag, std::integral_constant<int, 1>{});
        }
      };
      cl ? with_vec(std::true_type{}) : with_vec(std::false_type{});
      return;
    }
    const NormShape s = norm_shape(xc, cl, launch_knob(Knob::kGnSplitTarget));
    at::Tensor part = at::empty({3, N * s.S * C}, x.options().dtype(acc));
    at::Tensor coef = at::empty({2, N * C}, x.options().dtype(acc));
    at::Tensor sc = coef[0], sh = coef[1];
    channel_stats_partials(xc, s, part);
    _gn_stats_finalize_kernel<acc_t><<<blocks_for(N * G, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        part.const_data_ptr<acc_t>(), mp, rp, sc.data_ptr<acc_t>(), sh.data_ptr<acc_t>(), wp, bp, N, C, G, s.S,
        static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    affine_relu(xc, sc, sh, C, relu, s, y, pointwise_launch());
  });
  return {y, mean, rstd};
}

namespace {

// The backward of both ops: grad_sum, when defined, is added to dx before it is rounded.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_bwd(const at::Tensor& grad_y, const at::Tensor& grad_sum,
                                                      const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                      const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                      const at::Tensor& rstd, int64_t num_groups, bool relu) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool cl = is_channels_last(x);
  const auto fmt = format_of(cl);
  const at::Tensor xc = x.contiguous(fmt), gc = grad_y.contiguous(fmt);
  const at::Tensor gsc = grad_sum.defined() ? grad_sum.contiguous(fmt) : at::Tensor();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), G = num_groups;
  const auto acc = stat_dtype(x.scalar_type());
  const auto pdtype = weight.has_value() && weight->defined() ? weight->scalar_type() : at::kFloat;
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() == 0) {
    // sums over nothing
    const auto opts = x.options().dtype(pdtype);
    return {grad_sum.defined() ? dx.copy_(grad_sum) : dx, at::zeros({C}, opts), at::zeros({C}, opts)};
  }
  const at::Tensor w = param_as(weight, acc), b = param_as(bias, acc);
  const NormShape s = norm_shape(xc, cl, launch_knob(Knob::kGnSplitTarget));
  // per (sample, channel): forward scale, shift, mean; dx coefficients a, kx, k0; and the
  // per-sample parameter gradients
  at::Tensor coef = at::empty({8, N * C}, x.options().dtype(acc));
  at::Tensor sc = coef[0], sh = coef[1], mu = coef[2], a = coef[3], kx = coef[4], k0 = coef[5];
  at::Tensor dwn = coef[6], dbn = coef[7];
  at::Tensor part = at::empty({2, N * s.S * C}, x.options().dtype(acc));
  at::Tensor gw = at::empty({C}, x.options().dtype(acc)), gb = at::empty({C}, x.options().dtype(acc));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "native_group_norm_relu_bwd", [&] {
    using acc_t = scalar_t;
    const acc_t *mp = mc.const_data_ptr<acc_t>(), *rp = rc.const_data_ptr<acc_t>();
    const acc_t *wp = ptr_or_null<acc_t>(w), *bp = ptr_or_null<acc_t>(b);
    _gn_bwd_prep_kernel<acc_t><<<blocks_for(N * C, kThreads), kThreads, 0, stream>>>(
        mp, rp, wp, bp, sc.data_ptr<acc_t>(), sh.data_ptr<acc_t>(), mu.data_ptr<acc_t>(), N, C, G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    channel_bwd_partials(gc, xc, sc, sh, mu, C, relu, s, part);
    _gn_bwd_coef_kernel<acc_t><<<blocks_for(N * G, kThreads), kThreads, 0, stream>>>(
        part.const_data_ptr<acc_t>(), mp, rp, wp, dwn.data_ptr<acc_t>(), dbn.data_ptr<acc_t>(), a.data_ptr<acc_t>(),
        kx.data_ptr<acc_t>(), k0.data_ptr<acc_t>(), N, C, G, s.S, HW);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_dx(gc, xc, sc, sh, a, kx, k0, C, relu, s, dx, gsc, pointwise_launch());
    _sum_over_samples_kernel<acc_t><<<blocks_for(C, kThreads), kThreads, 0, stream>>>(
        dwn.const_data_ptr<acc_t>(), dbn.const_data_ptr<acc_t>(), gw.data_ptr<acc_t>(), gb.data_ptr<acc_t>(), N, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, gw.to(pdtype), gb.to(pdtype)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_relu_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   int64_t num_groups, bool relu) {
  return gn_bwd(grad_y, at::Tensor(), x, weight, bias, mean, rstd, num_groups, relu);
}

// The residual sum is ATen's own a + b (so it is bitwise the reference's), laid out like a;
// the GroupNorm+ReLU forward above then reads it: one pass more than a fused kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_relu_add_fwd(
    const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t num_groups, double eps, bool relu) {
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor sum = at::add(a, b).contiguous(format_of(is_channels_last(a)));
  auto [y, mean, rstd] = group_norm_relu_fwd(sum, weight, bias, num_groups, eps, relu);
  return {sum, y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_relu_add_bwd(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_sum, const at::Tensor& sum,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool relu) {
  const at::Tensor gs = grad_sum.has_value() && grad_sum->defined() ? *grad_sum : at::Tensor();
  return gn_bwd(grad_y, gs, sum, weight, bias, mean, rstd, num_groups, relu);
}

}  // namespace bitfast::cuda
