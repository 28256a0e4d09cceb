// BatchNorm+ReLU on CUDA, NCHW and channels_last, without transposing either.
//
// Every channel reduces over all N * H * W pixels of the batch, far more than one block
// should walk, so the statistics are a split reduction in two launches: per-(sample,
// split, channel) Welford partials (cuda/norm_common.h: one warp per split of an NCHW row,
// or a block per tile of channels x split of pixels in channels_last), then one thread per
// channel merges its partials in a fixed order (Chan's update) into the mean and biased
// variance, and the scale and shift of the pointwise pass that writes y. The backward has
// the same shape: partial sums of d and d * (x - mean), a per-channel pass that yields
// grad_weight, grad_bias and the coefficients of dx = a * d + kx * x + k0, and one
// pointwise pass for dx.
//
// No atomics, fixed merge orders: results are bitwise reproducible. Statistics are float32
// (float64 for fp64 inputs), as bitfast.ops.reference.
#include "cuda/batch_norm_relu.h"

#include "ops/batch_norm_relu.h"
#include "cuda/norm_common.h"
#include "cuda/reduce.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

namespace bitfast::cuda {
namespace {

constexpr int kThreads = 256;  // threads per block of the per-channel kernels

// Per channel: with P, merges the Welford partials (sample by sample, split by split) into
// the batch mean and biased variance, written to MEAN and VAR; without P, reads MEAN and
// VAR (eval, or the backward). Then the scale and shift of the forward's pointwise pass.
template <typename acc_t>
__global__ void _bn_coef_kernel(
    const acc_t* __restrict__ P,   // (3, N * S, C) Welford partials (mean, m2, count), or nullptr
    acc_t* __restrict__ MEAN,      // (C,) written with P, else read
    acc_t* __restrict__ VAR,       // (C,) written with P, else read
    const acc_t* __restrict__ W,   // (C,) or nullptr (ones)
    const acc_t* __restrict__ B,   // (C,) or nullptr (zeros)
    acc_t* __restrict__ SC,        // (C,) out: rstd * weight
    acc_t* __restrict__ SH,        // (C,) out: bias - mean * rstd * weight
    int64_t C,                     // channels
    int64_t NPARTS,                // N * S partials per channel
    acc_t EPS) {                   // added to the variance
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_t mean, var;
  if (P != nullptr) {
    const int64_t stride = NPARTS * C;
    // Merged in float64 (see "Final merges" in cuda/norm_common.h).
    Welford<double> w{0.0, 0.0, 0.0};
    for (int64_t q = 0; q < NPARTS; ++q) {
      const int64_t i = q * C + c;
      w = welford_merge(w, Welford<double>{P[i], P[stride + i], P[2 * stride + i]});
    }
    mean = static_cast<acc_t>(w.mean);
    var = static_cast<acc_t>(w.m2 / w.count);
    MEAN[c] = mean;
    VAR[c] = var;
  } else {
    mean = MEAN[c];
    var = VAR[c];
  }
  const acc_t s = inv_sqrt(var + EPS) * (W ? W[c] : acc_t(1));
  SC[c] = s;
  SH[c] = (B ? B[c] : acc_t(0)) - mean * s;
}

// Backward, per channel: merges the partial sums of d and d * (x - mean) (in order) into
// grad_bias and grad_weight and the coefficients of dx. In training the statistics depend
// on x: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = d * weight; in eval they are
// constants: dx = rstd * g.
template <typename acc_t>
__global__ void _bn_bwd_coef_kernel(
    const acc_t* __restrict__ P,     // (2, N * S, C) partial sums
    const acc_t* __restrict__ MEAN,  // (C,)
    const acc_t* __restrict__ VAR,   // (C,)
    const acc_t* __restrict__ W,     // (C,) or nullptr (ones)
    acc_t* __restrict__ DW,          // (C,) out: grad_weight
    acc_t* __restrict__ DB,          // (C,) out: grad_bias
    acc_t* __restrict__ A,           // (C,) out
    acc_t* __restrict__ KX,          // (C,) out
    acc_t* __restrict__ K0,          // (C,) out
    int64_t C,                       // channels
    int64_t NPARTS,                  // N * S partials per channel
    acc_t COUNT,                     // N * H * W
    acc_t EPS,                       // added to the variance
    bool TRAINING) {                 // whether the statistics depend on x
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t stride = NPARTS * C;
  // Summed in float64 (see "Final merges" in cuda/norm_common.h).
  double db_wide = 0.0, dwx = 0.0;
  for (int64_t q = 0; q < NPARTS; ++q) {
    db_wide += P[q * C + c];
    dwx += P[stride + q * C + c];
  }
  const acc_t r = inv_sqrt(VAR[c] + EPS), w = W ? W[c] : acc_t(1);
  const acc_t dw = static_cast<acc_t>(dwx * r), db = static_cast<acc_t>(db_wide);
  DW[c] = dw;
  DB[c] = db;
  const acc_t mg = TRAINING ? w * db / COUNT : acc_t(0);
  const acc_t mgx = TRAINING ? w * dw / COUNT : acc_t(0);
  A[c] = r * w;
  KX[c] = -r * r * mgx;
  K0[c] = r * r * mgx * MEAN[c] - r * mg;
}

// The running-statistics update, one thread per channel, rounding as the reference's
// tensor ops do: the unbiased variance in the statistics' dtype, then r * (1 - momentum)
// rounded to r's dtype, then r + momentum * s.to(r's dtype) in r's math type.
template <typename run_t, typename stat_t>
__global__ void _bn_update_stats_kernel(
    run_t* __restrict__ RM,           // (C,) running mean, in place
    run_t* __restrict__ RV,           // (C,) running variance, in place
    const stat_t* __restrict__ MEAN,  // (C,) batch mean
    const stat_t* __restrict__ VAR,   // (C,) biased batch variance
    int64_t C,                        // channels
    double MOMENTUM,                  // weight of the batch statistics
    double UNBIAS,                    // count / (count - 1)
    bool HAS_UNBIAS) {                // count > 1
  using op_t = at::opmath_type<run_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const op_t keep = static_cast<op_t>(1.0 - MOMENTUM), mom = static_cast<op_t>(MOMENTUM);
  const stat_t v = HAS_UNBIAS ? VAR[c] * static_cast<stat_t>(UNBIAS) : VAR[c];
  const run_t m1 = static_cast<run_t>(static_cast<op_t>(RM[c]) * keep);
  const run_t v1 = static_cast<run_t>(static_cast<op_t>(RV[c]) * keep);
  RM[c] = static_cast<run_t>(static_cast<op_t>(m1) + mom * static_cast<op_t>(static_cast<run_t>(MEAN[c])));
  RV[c] = static_cast<run_t>(static_cast<op_t>(v1) + mom * static_cast<op_t>(static_cast<run_t>(v)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_fwd(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& running_mean,
                                                                   const std::optional<at::Tensor>& running_var,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   bool training, double eps, bool relu) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool cl = is_channels_last(x);
  const at::Tensor xc = x.contiguous(format_of(cl));
  const int64_t C = x.size(1);
  const auto acc = stat_dtype(x.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(format_of(cl)));
  at::Tensor mean, var;
  if (training) {
    mean = at::empty({C}, x.options().dtype(acc));
    var = at::empty({C}, x.options().dtype(acc));
  } else {
    // float32 copies of the running statistics: the outputs never alias the buffers
    mean = running_mean->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
    var = running_var->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  }
  if (x.numel() == 0) {
    if (training) {
      // 0 / 0: the reference's mean of nothing
      mean.fill_(std::numeric_limits<double>::quiet_NaN());
      var.fill_(std::numeric_limits<double>::quiet_NaN());
    }
    return {y, mean, var};
  }
  const at::Tensor w = param_as(weight, acc), b = param_as(bias, acc);
  const NormShape s = norm_shape(xc, cl);
  at::Tensor coef = at::empty({2, C}, x.options().dtype(acc));
  at::Tensor sc = coef[0], sh = coef[1];
  at::Tensor part;
  if (training) {
    part = at::empty({3, s.N * s.S * C}, x.options().dtype(acc));
    channel_stats_partials(xc, s, part);
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "native_batch_norm_relu_fwd", [&] {
    using acc_t = scalar_t;
    _bn_coef_kernel<acc_t><<<blocks_for(C, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ptr_or_null<acc_t>(part), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), ptr_or_null<acc_t>(w),
        ptr_or_null<acc_t>(b), sc.data_ptr<acc_t>(), sh.data_ptr<acc_t>(), C, s.N * s.S, static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  affine_relu(xc, sc, sh, 0, relu, s, y);
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const at::Tensor& mean, const at::Tensor& var,
                                                                   bool training, double eps, bool relu) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool cl = is_channels_last(x);
  const auto fmt = format_of(cl);
  const at::Tensor xc = x.contiguous(fmt), gc = grad_y.contiguous(fmt);
  // _bn_coef_kernel takes mutable statistics pointers (the forward writes them); without
  // partials it only reads them, so these may alias the caller's tensors
  at::Tensor mc = mean.contiguous(), vc = var.contiguous();
  const int64_t C = x.size(1);
  const auto acc = stat_dtype(x.scalar_type());
  const auto pdtype = weight.has_value() && weight->defined() ? weight->scalar_type() : at::kFloat;
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() == 0) {
    // sums over nothing
    const auto opts = x.options().dtype(pdtype);
    return {dx, at::zeros({C}, opts), at::zeros({C}, opts)};
  }
  const at::Tensor w = param_as(weight, acc), b = param_as(bias, acc);
  const NormShape s = norm_shape(xc, cl);
  at::Tensor coef = at::empty({5, C}, x.options().dtype(acc));
  at::Tensor sc = coef[0], sh = coef[1], a = coef[2], kx = coef[3], k0 = coef[4];
  // separate tensors: returned (when weight is float32) as grad_weight and grad_bias
  at::Tensor gw = at::empty({C}, x.options().dtype(acc)), gb = at::empty({C}, x.options().dtype(acc));
  at::Tensor part = at::empty({2, s.N * s.S * C}, x.options().dtype(acc));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "native_batch_norm_relu_bwd", [&] {
    using acc_t = scalar_t;
    const acc_t *wp = ptr_or_null<acc_t>(w), *bp = ptr_or_null<acc_t>(b);
    _bn_coef_kernel<acc_t><<<blocks_for(C, kThreads), kThreads, 0, stream>>>(
        nullptr, mc.data_ptr<acc_t>(), vc.data_ptr<acc_t>(), wp, bp, sc.data_ptr<acc_t>(), sh.data_ptr<acc_t>(), C,
        0, static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    channel_bwd_partials(gc, xc, sc, sh, mc, 0, relu, s, part);
    _bn_bwd_coef_kernel<acc_t><<<blocks_for(C, kThreads), kThreads, 0, stream>>>(
        part.const_data_ptr<acc_t>(), mc.const_data_ptr<acc_t>(), vc.const_data_ptr<acc_t>(), wp,
        gw.data_ptr<acc_t>(), gb.data_ptr<acc_t>(), a.data_ptr<acc_t>(), kx.data_ptr<acc_t>(), k0.data_ptr<acc_t>(), C,
        s.N * s.S, static_cast<acc_t>(s.N * s.HW), static_cast<acc_t>(eps), training);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  bwd_dx(gc, xc, sc, sh, a, kx, k0, 0, relu, s, dx);
  return {dx, gw.to(pdtype), gb.to(pdtype)};
}

void batch_norm_update_stats_(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                              const at::Tensor& var, double momentum, int64_t count) {
  const c10::cuda::CUDAGuard guard(running_mean.device());
  const int64_t C = running_mean.size(0);
  const bool fused = running_mean.is_contiguous() && running_var.is_contiguous() &&
                     running_var.scalar_type() == running_mean.scalar_type() &&
                     mean.scalar_type() == var.scalar_type() &&
                     (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble);
  if (!fused) {
    // unusual dtype mixes or strided buffers: the reference's own tensor arithmetic
    const at::Tensor unbiased = count > 1 ? var.mul(double(count) / double(count - 1)) : var;
    running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
    running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.scalar_type()), momentum);
    return;
  }
  if (C == 0) return;
  const at::Tensor mc = mean.contiguous(), vc = var.contiguous();
  const double unbias = count > 1 ? double(count) / double(count - 1) : 1.0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                  "native_batch_norm_update_stats_", [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "native_batch_norm_update_stats_", [&] {
      using stat_t = scalar_t;
      _bn_update_stats_kernel<run_t, stat_t><<<blocks_for(C, kThreads), kThreads, 0, stream>>>(
          running_mean.data_ptr<run_t>(), running_var.data_ptr<run_t>(), mc.const_data_ptr<stat_t>(),
          vc.const_data_ptr<stat_t>(), C, momentum, unbias, count > 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace bitfast::cuda
