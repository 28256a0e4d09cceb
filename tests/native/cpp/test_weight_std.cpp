// C++ unit test of bitfast::cpu::weight_standardize_fwd/bwd against straightforward loops
// in float64 (the math of bitfast/ops/reference/weight_std_ref.py), for fp32 and fp64 weights of BiT
// shapes, edge shapes and non-contiguous layouts (results in the weight's memory format).
#include "cpu/weight_std.h"

#include "common/layout.h"

#include "check.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

using bitfast::test::expect_close;
using bitfast::test::expect_error;

namespace {

struct Expected {
  at::Tensor out, mean, rstd, dw;
};

// The reference: two passes per row in double, then the closed-form gradient.
Expected naive(const at::Tensor& w, const at::Tensor& grad, double eps) {
  const int64_t O = w.size(0), K = w.numel() / O;
  const at::Tensor x = w.to(at::kDouble).contiguous().reshape({O, K});
  const at::Tensor g = grad.to(at::kDouble).contiguous().reshape({O, K});
  Expected e{at::empty({O, K}, x.options()), at::empty({O}, x.options()), at::empty({O}, x.options()),
             at::empty({O, K}, x.options())};
  auto xa = x.accessor<double, 2>(), ga = g.accessor<double, 2>();
  auto oa = e.out.accessor<double, 2>(), da = e.dw.accessor<double, 2>();
  for (int64_t o = 0; o < O; ++o) {
    double s = 0;
    for (int64_t j = 0; j < K; ++j) s += xa[o][j];
    const double mean = s / K;
    double q = 0;
    for (int64_t j = 0; j < K; ++j) q += (xa[o][j] - mean) * (xa[o][j] - mean);
    const double rstd = 1.0 / std::sqrt(q / K + eps);
    double sg = 0, sgw = 0;
    for (int64_t j = 0; j < K; ++j) {
      oa[o][j] = (xa[o][j] - mean) * rstd;
      sg += ga[o][j];
      sgw += ga[o][j] * oa[o][j];
    }
    for (int64_t j = 0; j < K; ++j) da[o][j] = rstd * (ga[o][j] - sg / K - oa[o][j] * sgw / K);
    e.mean[o] = mean;
    e.rstd[o] = rstd;
  }
  e.out = e.out.reshape(w.sizes());
  e.dw = e.dw.reshape(w.sizes());
  return e;
}

void check_case(const std::string& name, const at::Tensor& w, double eps) {
  const bool f64 = w.scalar_type() == at::kDouble;
  const at::Tensor grad = at::randn(w.sizes(), w.options());
  const Expected e = naive(w, grad, eps);
  auto [out, mean, rstd] = bitfast::cpu::weight_standardize_fwd(w, eps);
  const at::ScalarType sd = f64 ? at::kDouble : at::kFloat;
  // results in w's memory format: channels_last for a channels_last w, else contiguous
  const at::MemoryFormat fmt = bitfast::format_of(w);
  if (!out.is_contiguous(fmt) || out.scalar_type() != w.scalar_type() || mean.scalar_type() != sd ||
      rstd.scalar_type() != sd) {
    std::printf("FAIL %s: wrong layout or dtype of the results\n", name.c_str());
    ++bitfast::test::failures();
  }
  // fp32: the statistics of a few thousand elements, a few ulp; the output of rows with a
  // large 1/std is scaled by it, so relative error carries over.
  const double tol = f64 ? 1e-12 : 2e-5;
  expect_close(name + " out", out, e.out, tol, tol);
  expect_close(name + " mean", mean, e.mean, tol, tol);
  expect_close(name + " rstd", rstd, e.rstd, tol, tol);
  const at::Tensor dw = bitfast::cpu::weight_standardize_bwd(grad, w, mean, rstd);
  if (!dw.is_contiguous(fmt) || dw.scalar_type() != w.scalar_type()) {
    std::printf("FAIL %s: wrong layout or dtype of dw\n", name.c_str());
    ++bitfast::test::failures();
  }
  // dw is rstd times a difference of O(1) terms: compare relative to rstd.
  const double scale = e.rstd.abs().max().item<double>();
  expect_close(name + " dw", dw, e.dw, tol * scale * 4, tol);
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<std::vector<int64_t>> shapes = {
      {1, 1, 1, 1},    // minimal: one element, var 0
      {64, 3, 7, 7},   // BiT stem
      {256, 64, 1, 1}, // 1x1 conv
      {7, 5, 3, 3},    // odd sizes, rows shorter than the vector tail
      {3, 4607},       // a long row with a tail
      {2, 1},          // K = 1
      {33, 17, 5},     // three dims
  };
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    const std::string dn = dtype == at::kFloat ? "fp32" : "fp64";
    for (const auto& shape : shapes) {
      std::string sn;
      for (auto s : shape) sn += std::to_string(s) + "x";
      const at::Tensor w = at::randn(shape, at::TensorOptions().dtype(dtype)) * 0.1 + 0.05;
      check_case(dn + " " + sn, w, 1e-8);
    }
    // eps of the authors' release, and a large eps
    check_case(dn + " eps1e-10", at::randn({16, 8, 3, 3}, at::TensorOptions().dtype(dtype)), 1e-10);
    check_case(dn + " eps0.5", at::randn({16, 8, 3, 3}, at::TensorOptions().dtype(dtype)), 0.5);
    // non-contiguous: a transposed weight, a channels_last weight, a strided slice
    check_case(dn + " transposed", at::randn({8, 16, 3, 3}, at::TensorOptions().dtype(dtype)).transpose(0, 1), 1e-8);
    check_case(dn + " channels_last",
               at::randn({32, 16, 3, 3}, at::TensorOptions().dtype(dtype)).contiguous(at::MemoryFormat::ChannelsLast),
               1e-8);
    check_case(dn + " sliced", at::randn({16, 20, 3, 3}, at::TensorOptions().dtype(dtype)).slice(1, 0, 20, 2), 1e-8);
  }

  // argument checks: clear errors, no crash
  const at::Tensor w = at::randn({4, 3, 3, 3});
  expect_error("1-dim w", "expected (O, ...)", [&] { bitfast::cpu::weight_standardize_fwd(at::randn({5}), 1e-8); });
  expect_error("int w", "expected Half, BFloat16, Float or Double",
               [&] { bitfast::cpu::weight_standardize_fwd(at::ones({2, 2}, at::kInt), 1e-8); });
  auto [out, mean, rstd] = bitfast::cpu::weight_standardize_fwd(w, 1e-8);
  expect_error("grad shape", "expected equal shapes",
               [&] { bitfast::cpu::weight_standardize_bwd(at::randn({4, 3, 3, 2}), w, mean, rstd); });
  expect_error("mean shape", "one value per output channel",
               [&] { bitfast::cpu::weight_standardize_bwd(out, w, mean.narrow(0, 0, 3), rstd); });
  expect_error("rstd dtype", "expected Float",
               [&] { bitfast::cpu::weight_standardize_bwd(out, w, mean, rstd.to(at::kDouble)); });
  return bitfast::test::finish("test_weight_std");
}
