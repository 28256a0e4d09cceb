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

// Where each weight's rows start in the list's row numbering (n + 1 entries), and the
// weights' row sizes and formats.
struct RowTable {
  std::vector<int64_t> first, k;
  std::vector<at::MemoryFormat> fmt;
  int64_t max_k = 0, elements = 0;
};

RowTable row_table(at::TensorList ws) {
  RowTable t;
  t.first.push_back(0);
  for (const auto& w : ws) {
    const int64_t k = row_size(w);
    t.k.push_back(k);
    t.fmt.push_back(format_of(w));
    t.first.push_back(t.first.back() + w.size(0));
    t.max_k = std::max(t.max_k, k);
    t.elements += w.numel();
  }
  return t;
}

// The rows [begin, end) of the list, each handed to fn(tensor index, row within it, global row).
template <typename F>
void for_rows(const RowTable& t, int64_t begin, int64_t end, F&& fn) {
  auto i = static_cast<size_t>(std::upper_bound(t.first.begin(), t.first.end(), begin) - t.first.begin() - 1);
  for (int64_t r = begin; r < end; ++r) {
    while (r >= t.first[i + 1]) ++i;
    fn(i, r - t.first[i], r);
  }
}

// The list's rows cut into chunks of about equal work (elements, not rows: the rows of a
// stem and of a late 3x3 conv differ 30-fold), at least kRowGrain elements each and about
// eight per thread; each chunk is one task of the parallel region.
std::vector<int64_t> row_chunks(const RowTable& t) {
  const int64_t target = std::max<int64_t>(kRowGrain, t.elements / (8 * std::max(at::get_num_threads(), 1)));
  std::vector<int64_t> bounds{0};
  int64_t acc = 0;
  for (size_t i = 0; i < t.k.size(); ++i) {
    for (int64_t r = t.first[i]; r < t.first[i + 1]; ++r) {
      acc += t.k[i];
      if (acc >= target) {
        bounds.push_back(r + 1);
        acc = 0;
      }
    }
  }
  if (bounds.back() != t.first.back()) bounds.push_back(t.first.back());
  return bounds;
}

// fn(begin, end) for the row ranges of row_chunks, in parallel.
template <typename F>
void parallel_rows(const RowTable& t, F&& fn) {
  const std::vector<int64_t> bounds = row_chunks(t);
  const int64_t n = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    if (b < e) fn(bounds[b], bounds[e]);
  });
}

// The rows of every weight in one parallel region, each by the single-weight row code.
template <typename scalar_t>
void multi_fwd_rows(const RowTable& t, const std::vector<at::Tensor>& in, std::vector<at::Tensor>& outs,
                    at::opmath_type<scalar_t>* M, at::opmath_type<scalar_t>* R, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  parallel_rows(t, [&](int64_t begin, int64_t end) {
    std::vector<float> x, y;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      x.resize(t.max_k);
      y.resize(t.max_k);
    }
    for_rows(t, begin, end, [&](size_t i, int64_t o, int64_t r) {
      const int64_t K = t.k[i];
      const scalar_t* W = in[i].const_data_ptr<scalar_t>() + o * K;
      scalar_t* OUT = outs[i].data_ptr<scalar_t>() + o * K;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        fwd_row_any(W, OUT, K, acc_t(eps), M + r, R + r);
      } else {
        widen(W, x.data(), K);
        fwd_row_any(x.data(), y.data(), K, float(eps), M + r, R + r);
        narrow(y.data(), OUT, K);
      }
    });
  });
}

template <typename scalar_t>
void multi_bwd_rows(const RowTable& t, const std::vector<at::Tensor>& gs, const std::vector<at::Tensor>& in,
                    std::vector<at::Tensor>& dws, const at::opmath_type<scalar_t>* M,
                    const at::opmath_type<scalar_t>* R) {
  using acc_t = at::opmath_type<scalar_t>;
  parallel_rows(t, [&](int64_t begin, int64_t end) {
    std::vector<float> g, x, y;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      g.resize(t.max_k);
      x.resize(t.max_k);
      y.resize(t.max_k);
    }
    for_rows(t, begin, end, [&](size_t i, int64_t o, int64_t r) {
      const int64_t K = t.k[i];
      const scalar_t* G = gs[i].const_data_ptr<scalar_t>() + o * K;
      const scalar_t* W = in[i].const_data_ptr<scalar_t>() + o * K;
      scalar_t* DW = dws[i].data_ptr<scalar_t>() + o * K;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        bwd_row_any(G, W, DW, K, M[r], R[r]);
      } else {
        widen(G, g.data(), K);
        widen(W, x.data(), K);
        bwd_row_any(g.data(), x.data(), y.data(), K, M[r], R[r]);
        narrow(y.data(), DW, K);
      }
    });
  });
}

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> weight_standardize_multi_fwd(
    at::TensorList ws, double eps, std::optional<at::ScalarType> out_dtype) {
  check_weight_standardize_multi_fwd(ws, c10::DeviceType::CPU, out_dtype);
  const RowTable t = row_table(ws);
  std::vector<at::Tensor> in, outs;
  for (size_t i = 0; i < ws.size(); ++i) {
    in.push_back(ws[i].contiguous(t.fmt[i]));
    outs.push_back(at::empty(ws[i].sizes(), ws[i].options().memory_format(t.fmt[i])));
  }
  const auto stat = ws[0].options().dtype(stat_dtype(ws[0].scalar_type()));
  at::Tensor mean = at::empty({t.first.back()}, stat), rstd = at::empty({t.first.back()}, stat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ws[0].scalar_type(), "native_weight_standardize_multi_fwd",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    multi_fwd_rows<scalar_t>(t, in, outs, mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), eps);
  });
  if (out_dtype.has_value() && *out_dtype != ws[0].scalar_type()) {
    // one rounding of the weight-dtype result: what a conv under autocast would cast it to
    for (auto& o : outs) o = o.to(*out_dtype);
  }
  return {outs, mean, rstd};
}

std::vector<at::Tensor> weight_standardize_multi_bwd(at::TensorList grad_outs, at::TensorList ws,
                                                     const at::Tensor& mean, const at::Tensor& rstd) {
  check_weight_standardize_multi_bwd(grad_outs, ws, mean, rstd, c10::DeviceType::CPU);
  const RowTable t = row_table(ws);
  std::vector<at::Tensor> gs, in, dws;
  for (size_t i = 0; i < ws.size(); ++i) {
    gs.push_back(grad_outs[i].to(ws[i].scalar_type()).contiguous(t.fmt[i]));
    in.push_back(ws[i].contiguous(t.fmt[i]));
    dws.push_back(at::empty(ws[i].sizes(), ws[i].options().memory_format(t.fmt[i])));
  }
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ws[0].scalar_type(), "native_weight_standardize_multi_bwd",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    multi_bwd_rows<scalar_t>(t, gs, in, dws, mc.const_data_ptr<acc_t>(), rc.const_data_ptr<acc_t>());
  });
  return dws;
}

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
  m.impl("native_weight_standardize_multi_fwd", &bitfast::cpu::weight_standardize_multi_fwd);
  m.impl("native_weight_standardize_multi_bwd", &bitfast::cpu::weight_standardize_multi_bwd);
}
