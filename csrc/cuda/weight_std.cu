// Weight standardization on CUDA: one block per output channel (one row of K elements).
//
// A step standardizes every conv weight of the model once, so the cost is launches, not
// bytes (docs/performance.md): one launch per conv for the forward and one for the backward. Rows are
// short (K <= 4608 in BiT), so a block makes its passes over its row straight from global
// memory: the re-reads hit L1/L2. The mean, then the variance about the mean (more accurate
// than a one-pass sum of squares), accumulated in float32 (float64 for fp64 weights).
#include "cuda/weight_std.h"

#include "ops/weight_std.h"
#include "common/layout.h"
#include "cuda/reduce.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

namespace bitfast::cuda {
namespace {

__device__ __forceinline__ float rsqrt_acc(float x) { return rsqrtf(x); }
__device__ __forceinline__ double rsqrt_acc(double x) { return rsqrt(x); }

template <typename scalar_t, typename acc_t>
__global__ void _ws_fwd_kernel(const scalar_t* __restrict__ W,  // (O, K) raw weight, contiguous
                               scalar_t* __restrict__ OUT,      // (O, K) standardized weight
                               acc_t* __restrict__ MEAN,        // (O,) per-row mean
                               acc_t* __restrict__ RSTD,        // (O,) per-row 1 / sqrt(var + eps)
                               int64_t K,                       // elements per row
                               acc_t EPS) {
  __shared__ acc_t smem[32];
  const int64_t row = blockIdx.x;
  const scalar_t* w = W + row * K;
  scalar_t* out = OUT + row * K;
  acc_t s = acc_t(0);
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) s += static_cast<acc_t>(w[j]);
  const acc_t mean = block_sum(s, smem) / static_cast<acc_t>(K);
  acc_t q = acc_t(0);
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const acc_t d = static_cast<acc_t>(w[j]) - mean;
    q += d * d;
  }
  const acc_t rstd = rsqrt_acc(block_sum(q, smem) / static_cast<acc_t>(K) + EPS);
  if (threadIdx.x == 0) {
    MEAN[row] = mean;
    RSTD[row] = rstd;
  }
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    out[j] = static_cast<scalar_t>((static_cast<acc_t>(w[j]) - mean) * rstd);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void _ws_bwd_kernel(const scalar_t* __restrict__ G,  // (O, K) gradient of the output
                               const scalar_t* __restrict__ W,  // (O, K) raw weight
                               const acc_t* __restrict__ MEAN,  // (O,)
                               const acc_t* __restrict__ RSTD,  // (O,)
                               scalar_t* __restrict__ DW,       // (O, K) gradient of the weight
                               int64_t K) {
  __shared__ acc_t smem[32];
  const int64_t row = blockIdx.x;
  const scalar_t* g = G + row * K;
  const scalar_t* w = W + row * K;
  scalar_t* dw = DW + row * K;
  const acc_t mean = MEAN[row], rstd = RSTD[row];
  acc_t sg = acc_t(0), sgw = acc_t(0);
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const acc_t gj = static_cast<acc_t>(g[j]);
    sg += gj;
    sgw += gj * ((static_cast<acc_t>(w[j]) - mean) * rstd);
  }
  const acc_t mean_g = block_sum(sg, smem) / static_cast<acc_t>(K);
  const acc_t mean_gw = block_sum(sgw, smem) / static_cast<acc_t>(K);
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const acc_t what = (static_cast<acc_t>(w[j]) - mean) * rstd;
    dw[j] = static_cast<scalar_t>(rstd * (static_cast<acc_t>(g[j]) - mean_g - what * mean_gw));
  }
}

// Threads per row: about four elements each, 32 to 256 (full warps, see block_sum).
int row_threads(int64_t k) {
  int threads = 32;
  while (threads < 256 && threads * 4 < k) threads *= 2;
  return threads;
}

int64_t row_size(const at::Tensor& w) {
  int64_t k = 1;
  for (int64_t d = 1; d < w.dim(); ++d) k *= w.size(d);
  return k;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_standardize_fwd(const at::Tensor& w, double eps) {
  const c10::cuda::CUDAGuard guard(w.device());
  // Each output channel's K elements are one dense run in either format: the rows below
  // are those runs, in memory order.
  const auto fmt = format_of(w);
  const at::Tensor wc = w.contiguous(fmt);
  const int64_t O = w.size(0), K = row_size(w);
  at::Tensor out = at::empty(w.sizes(), w.options().memory_format(fmt));
  const auto stat = w.options().dtype(stat_dtype(w.scalar_type()));
  at::Tensor mean = at::empty({O}, stat), rstd = at::empty({O}, stat);
  if (O == 0) return {out, mean, rstd};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "native_weight_standardize_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    _ws_fwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(O), row_threads(K), 0, stream>>>(
        wc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), K,
        static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

at::Tensor weight_standardize_bwd(const at::Tensor& grad_out, const at::Tensor& w, const at::Tensor& mean,
                                  const at::Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(w.device());
  const auto fmt = format_of(w);
  const at::Tensor gc = grad_out.contiguous(fmt), wc = w.contiguous(fmt);
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const int64_t O = w.size(0), K = row_size(w);
  at::Tensor dw = at::empty(w.sizes(), w.options().memory_format(fmt));
  if (O == 0) return dw;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "native_weight_standardize_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    _ws_bwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(O), row_threads(K), 0, stream>>>(
        gc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(), mc.const_data_ptr<acc_t>(),
        rc.const_data_ptr<acc_t>(), dw.data_ptr<scalar_t>(), K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dw;
}

}  // namespace bitfast::cuda
