// Weight standardization on CPU: one output channel (one row of K elements) per task.
//
// A row of a BiT weight holds at most a few thousand elements (512 x 3 x 3 = 4608), so it
// stays in L1/L2 while the kernel makes its passes over it: the mean, then the variance
// about the mean (two passes are more accurate than one-pass sums of squares, and cost no
// extra memory traffic here), then the output. Each row is read from memory once and
// written once. fp16/bf16 rows are widened into a per-thread float buffer first. The row
// math is plain loops the compiler vectorizes (OpenMP simd lets it split the sums into
// vector lanes), compiled for the baseline and for AVX2 (cpu/simd.h).
#include "cpu/weight_std.h"

#include "ops/weight_std.h"
#include "common/layout.h"
#include "cpu/convert.h"
#include "cpu/simd.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace bitfast::cpu {
namespace {

// Standardizes one row x[0..K) into y, returning its mean and rstd.
template <typename T>
BITFAST_INLINE void fwd_row(const T* __restrict x, T* __restrict y, int64_t K, T eps, T* mean_out, T* rstd_out) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < K; ++j) sum += x[j];
  // 0 / 0 = NaN for an empty row, as the reference's mean of nothing.
  const T mean = sum / T(K);
  T sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < K; ++j) sq += (x[j] - mean) * (x[j] - mean);
  const T rstd = T(1) / std::sqrt(sq / T(K) + eps);
#pragma omp simd
  for (int64_t j = 0; j < K; ++j) y[j] = (x[j] - mean) * rstd;
  *mean_out = mean;
  *rstd_out = rstd;
}

// dw = rstd * (g - mean(g) - w_hat * mean(g * w_hat)) over one row.
template <typename T>
BITFAST_INLINE void bwd_row(const T* __restrict g, const T* __restrict x, T* __restrict dw, int64_t K, T mean,
                            T rstd) {
  T sum_g = 0, sum_gw = 0;
#pragma omp simd reduction(+ : sum_g, sum_gw)
  for (int64_t j = 0; j < K; ++j) {
    sum_g += g[j];
    sum_gw += g[j] * ((x[j] - mean) * rstd);
  }
  const T mean_g = sum_g / T(K), mean_gw = sum_gw / T(K);
#pragma omp simd
  for (int64_t j = 0; j < K; ++j) dw[j] = rstd * (g[j] - mean_g - ((x[j] - mean) * rstd) * mean_gw);
}

BITFAST_TARGET_CLONES void fwd_row_float(const float* x, float* y, int64_t K, float eps, float* mean, float* rstd) {
  fwd_row<float>(x, y, K, eps, mean, rstd);
}
BITFAST_TARGET_CLONES void fwd_row_double(const double* x, double* y, int64_t K, double eps, double* mean,
                                          double* rstd) {
  fwd_row<double>(x, y, K, eps, mean, rstd);
}
BITFAST_TARGET_CLONES void bwd_row_float(const float* g, const float* x, float* dw, int64_t K, float mean,
                                         float rstd) {
  bwd_row<float>(g, x, dw, K, mean, rstd);
}
BITFAST_TARGET_CLONES void bwd_row_double(const double* g, const double* x, double* dw, int64_t K, double mean,
                                          double rstd) {
  bwd_row<double>(g, x, dw, K, mean, rstd);
}

void fwd_row_any(const float* x, float* y, int64_t K, float eps, float* mean, float* rstd) {
  fwd_row_float(x, y, K, eps, mean, rstd);
}
void fwd_row_any(const double* x, double* y, int64_t K, double eps, double* mean, double* rstd) {
  fwd_row_double(x, y, K, eps, mean, rstd);
}
void bwd_row_any(const float* g, const float* x, float* dw, int64_t K, float mean, float rstd) {
  bwd_row_float(g, x, dw, K, mean, rstd);
}
void bwd_row_any(const double* g, const double* x, double* dw, int64_t K, double mean, double rstd) {
  bwd_row_double(g, x, dw, K, mean, rstd);
}

// Rows per parallel task: enough that a task has about kRowGrain elements, below which a
// thread costs more than it saves.
constexpr int64_t kRowGrain = 32768;

int64_t row_grain(int64_t k) {
  return std::max<int64_t>(1, kRowGrain / std::max<int64_t>(k, 1));
}

template <typename scalar_t>
void fwd_rows(const scalar_t* W, scalar_t* OUT, at::opmath_type<scalar_t>* MEAN, at::opmath_type<scalar_t>* RSTD,
              int64_t O, int64_t K, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, O, row_grain(K), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (int64_t o = begin; o < end; ++o) fwd_row_any(W + o * K, OUT + o * K, K, acc_t(eps), MEAN + o, RSTD + o);
    } else {
      std::vector<float> x(K), y(K);
      for (int64_t o = begin; o < end; ++o) {
        widen(W + o * K, x.data(), K);
        fwd_row_any(x.data(), y.data(), K, float(eps), MEAN + o, RSTD + o);
        narrow(y.data(), OUT + o * K, K);
      }
    }
  });
}

template <typename scalar_t>
void bwd_rows(const scalar_t* G, const scalar_t* W, const at::opmath_type<scalar_t>* MEAN,
              const at::opmath_type<scalar_t>* RSTD, scalar_t* DW, int64_t O, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, O, row_grain(K), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (int64_t o = begin; o < end; ++o) bwd_row_any(G + o * K, W + o * K, DW + o * K, K, MEAN[o], RSTD[o]);
    } else {
      std::vector<float> g(K), x(K), y(K);
      for (int64_t o = begin; o < end; ++o) {
        widen(G + o * K, g.data(), K);
        widen(W + o * K, x.data(), K);
        bwd_row_any(g.data(), x.data(), y.data(), K, MEAN[o], RSTD[o]);
        narrow(y.data(), DW + o * K, K);
      }
    }
  });
}

// K = the elements per output channel; well defined when O == 0 too.
int64_t row_size(const at::Tensor& w) {
  int64_t k = 1;
  for (int64_t d = 1; d < w.dim(); ++d) k *= w.size(d);
  return k;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_standardize_fwd(const at::Tensor& w, double eps) {
  check_weight_standardize_fwd(w, c10::DeviceType::CPU);
  // Each output channel's K elements are one dense run in either format: the rows below
  // are those runs, in memory order.
  const auto fmt = format_of(w);
  const at::Tensor wc = w.contiguous(fmt);
  const int64_t O = w.size(0), K = row_size(w);
  at::Tensor out = at::empty(w.sizes(), w.options().memory_format(fmt));
  const auto stat = w.options().dtype(stat_dtype(w.scalar_type()));
  at::Tensor mean = at::empty({O}, stat), rstd = at::empty({O}, stat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "native_weight_standardize_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fwd_rows<scalar_t>(wc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
                       rstd.data_ptr<acc_t>(), O, K, eps);
  });
  return {out, mean, rstd};
}

at::Tensor weight_standardize_bwd(const at::Tensor& grad_out, const at::Tensor& w, const at::Tensor& mean,
                                  const at::Tensor& rstd) {
  check_weight_standardize_bwd(grad_out, w, mean, rstd, c10::DeviceType::CPU);
  const auto fmt = format_of(w);
  const at::Tensor gc = grad_out.contiguous(fmt), wc = w.contiguous(fmt);
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const int64_t O = w.size(0), K = row_size(w);
  at::Tensor dw = at::empty(w.sizes(), w.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "native_weight_standardize_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bwd_rows<scalar_t>(gc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(), mc.const_data_ptr<acc_t>(),
                       rc.const_data_ptr<acc_t>(), dw.data_ptr<scalar_t>(), O, K);
  });
  return dw;
}

}  // namespace bitfast::cpu

// The op's CPU kernels, attached to its native schemas (defined in bitfast/ops/weight_std.py).
TORCH_LIBRARY_IMPL(bitfast, CPU, m) {
  m.impl("native_weight_standardize_fwd", &bitfast::cpu::weight_standardize_fwd);
  m.impl("native_weight_standardize_bwd", &bitfast::cpu::weight_standardize_bwd);
}
