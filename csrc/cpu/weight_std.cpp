// Weight standardization on CPU: one output channel (one row of K elements) per task.
//
// A row of a BiT weight holds at most a few thousand elements (512 x 3 x 3 = 4608), so it
// stays in L1/L2 while the kernel makes its passes over it: the mean, then the variance
// about the mean (two passes are more accurate than one-pass sums of squares, and cost no
// extra memory traffic here), then the output. Each row is read from memory once and
// written once. fp16/bf16 rows are widened into a per-thread float buffer first.
#include "cpu/weight_std.h"

#include "common/checks.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace bitfast::cpu {
namespace {

using at::vec::Vectorized;

// Four independent vector accumulators hide the latency of the adds.
constexpr int kAcc = 4;

// sum_j f(j) over j < n, where f takes an index and a vector flag; vectorized with kAcc
// accumulators, scalar tail.
template <typename acc_t, typename VecFn, typename ScalarFn>
acc_t row_sum(int64_t n, const VecFn& vf, const ScalarFn& sf) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec acc[kAcc];
  for (auto& a : acc) a = Vec(acc_t(0));
  int64_t j = 0;
  for (; j + kAcc * W <= n; j += kAcc * W) {
    for (int k = 0; k < kAcc; ++k) acc[k] = acc[k] + vf(j + k * W);
  }
  for (; j + W <= n; j += W) acc[0] = acc[0] + vf(j);
  for (int k = 1; k < kAcc; ++k) acc[0] = acc[0] + acc[k];
  acc_t s = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, acc[0]);
  for (; j < n; ++j) s += sf(j);
  return s;
}

// The rows of an fp16/bf16 tensor are widened to float before the math; float and double
// rows are used in place.
template <typename scalar_t, typename acc_t>
const acc_t* widen(const scalar_t* src, int64_t n, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    buf.resize(n);
    at::vec::convert(src, buf.data(), n);
    return buf.data();
  }
}

// Stores n acc_t values into dst of scalar_t, rounding fp16/bf16.
template <typename scalar_t, typename acc_t>
void narrow(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(src, dst, n);
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
  using Vec = Vectorized<acc_t>;
  constexpr int64_t VW = Vec::size();
  constexpr bool kWide = std::is_same_v<scalar_t, acc_t>;
  const acc_t eps_ = acc_t(eps);
  at::parallel_for(0, O, row_grain(K), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> in_buf, out_buf;
    if constexpr (!kWide) out_buf.resize(K);
    for (int64_t o = begin; o < end; ++o) {
      const acc_t* x = widen<scalar_t, acc_t>(W + o * K, K, in_buf);
      const acc_t sum = row_sum<acc_t>(
          K, [&](int64_t j) { return Vec::loadu(x + j); }, [&](int64_t j) { return x[j]; });
      // 0 / 0 = NaN for an empty row, as the reference's mean of nothing.
      const acc_t mean = sum / acc_t(K);
      const Vec mean_v(mean);
      const acc_t sq = row_sum<acc_t>(
          K,
          [&](int64_t j) {
            const Vec d = Vec::loadu(x + j) - mean_v;
            return d * d;
          },
          [&](int64_t j) {
            const acc_t d = x[j] - mean;
            return d * d;
          });
      const acc_t rstd = acc_t(1) / std::sqrt(sq / acc_t(K) + eps_);
      MEAN[o] = mean;
      RSTD[o] = rstd;
      acc_t* y = kWide ? reinterpret_cast<acc_t*>(OUT + o * K) : out_buf.data();
      const Vec rstd_v(rstd);
      int64_t j = 0;
      for (; j + VW <= K; j += VW) ((Vec::loadu(x + j) - mean_v) * rstd_v).store(y + j);
      for (; j < K; ++j) y[j] = (x[j] - mean) * rstd;
      narrow<scalar_t, acc_t>(y, OUT + o * K, K);
    }
  });
}

template <typename scalar_t>
void bwd_rows(const scalar_t* G, const scalar_t* W, const at::opmath_type<scalar_t>* MEAN,
              const at::opmath_type<scalar_t>* RSTD, scalar_t* DW, int64_t O, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t VW = Vec::size();
  constexpr bool kWide = std::is_same_v<scalar_t, acc_t>;
  at::parallel_for(0, O, row_grain(K), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g_buf, w_buf, out_buf;
    if constexpr (!kWide) out_buf.resize(K);
    for (int64_t o = begin; o < end; ++o) {
      const acc_t* g = widen<scalar_t, acc_t>(G + o * K, K, g_buf);
      const acc_t* x = widen<scalar_t, acc_t>(W + o * K, K, w_buf);
      const acc_t mean = MEAN[o], rstd = RSTD[o];
      const Vec mean_v(mean), rstd_v(rstd);
      const acc_t sum_g = row_sum<acc_t>(
          K, [&](int64_t j) { return Vec::loadu(g + j); }, [&](int64_t j) { return g[j]; });
      const acc_t sum_gw = row_sum<acc_t>(
          K, [&](int64_t j) { return Vec::loadu(g + j) * ((Vec::loadu(x + j) - mean_v) * rstd_v); },
          [&](int64_t j) { return g[j] * ((x[j] - mean) * rstd); });
      const acc_t mean_g = sum_g / acc_t(K), mean_gw = sum_gw / acc_t(K);
      const Vec mean_g_v(mean_g), mean_gw_v(mean_gw);
      acc_t* y = kWide ? reinterpret_cast<acc_t*>(DW + o * K) : out_buf.data();
      int64_t j = 0;
      for (; j + VW <= K; j += VW) {
        const Vec what = (Vec::loadu(x + j) - mean_v) * rstd_v;
        (rstd_v * (Vec::loadu(g + j) - mean_g_v - what * mean_gw_v)).store(y + j);
      }
      for (; j < K; ++j) {
        const acc_t what = (x[j] - mean) * rstd;
        y[j] = rstd * (g[j] - mean_g - what * mean_gw);
      }
      narrow<scalar_t, acc_t>(y, DW + o * K, K);
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
  const at::Tensor wc = w.contiguous();
  const int64_t O = w.size(0), K = row_size(w);
  at::Tensor out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
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
  const at::Tensor gc = grad_out.contiguous(), wc = w.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const int64_t O = w.size(0), K = row_size(w);
  at::Tensor dw = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "native_weight_standardize_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bwd_rows<scalar_t>(gc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(), mc.const_data_ptr<acc_t>(),
                       rc.const_data_ptr<acc_t>(), dw.data_ptr<scalar_t>(), O, K);
  });
  return dw;
}

}  // namespace bitfast::cpu
