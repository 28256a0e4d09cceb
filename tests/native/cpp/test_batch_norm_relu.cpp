// C++ unit test of bitfast::cpu::batch_norm_relu_fwd/bwd and batch_norm_update_stats_
// against straightforward loops in float64 (the math of bitfast/ops/reference/batch_norm_relu_ref.py), for fp32
// and fp64 inputs in NCHW and channels_last, training and eval, with and without ReLU.
#include "cpu/batch_norm_relu.h"

#include "check.h"

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

using bitfast::test::expect_close;
using bitfast::test::expect_error;

namespace {

struct Expected {
  at::Tensor y, mean, var, dx, dw, db;
};

Expected naive(const at::Tensor& x_in, const at::Tensor& dy_in, const at::Tensor& rm, const at::Tensor& rv,
               const at::Tensor& w_in, const at::Tensor& b_in, bool training, double eps, bool relu) {
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3), M = N * HW;
  const at::Tensor x = x_in.to(at::kDouble).contiguous().reshape({N, C, HW});
  const at::Tensor dy = dy_in.to(at::kDouble).contiguous().reshape({N, C, HW});
  const at::Tensor w = w_in.to(at::kDouble), b = b_in.to(at::kDouble);
  const auto o = x.options();
  Expected e{at::empty({N, C, HW}, o), rm.to(at::kDouble).clone(), rv.to(at::kDouble).clone(),
             at::empty({N, C, HW}, o), at::zeros({C}, o), at::zeros({C}, o)};
  auto xa = x.accessor<double, 3>(), ga = dy.accessor<double, 3>(), ya = e.y.accessor<double, 3>();
  auto dxa = e.dx.accessor<double, 3>();
  auto wa = w.accessor<double, 1>(), ba = b.accessor<double, 1>();
  auto ma = e.mean.accessor<double, 1>(), va = e.var.accessor<double, 1>();
  auto dwa = e.dw.accessor<double, 1>(), dba = e.db.accessor<double, 1>();
  for (int64_t c = 0; c < C; ++c) {
    if (training) {
      double s = 0, q = 0;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t i = 0; i < HW; ++i) s += xa[n][c][i];
      ma[c] = s / M;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t i = 0; i < HW; ++i) q += (xa[n][c][i] - ma[c]) * (xa[n][c][i] - ma[c]);
      va[c] = q / M;
    }
    const double mean = ma[c], rstd = 1.0 / std::sqrt(va[c] + eps);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t i = 0; i < HW; ++i) {
        const double xhat = (xa[n][c][i] - mean) * rstd, v = xhat * wa[c] + ba[c];
        ya[n][c][i] = relu ? std::max(v, 0.0) : v;
        const double d = (!relu || v > 0) ? ga[n][c][i] : 0.0;
        dba[c] += d;
        dwa[c] += d * xhat;
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t i = 0; i < HW; ++i) {
        const double xhat = (xa[n][c][i] - mean) * rstd, v = xhat * wa[c] + ba[c];
        const double d = (!relu || v > 0) ? ga[n][c][i] : 0.0;
        dxa[n][c][i] = training ? rstd * (d * wa[c] - wa[c] * dba[c] / M - xhat * wa[c] * dwa[c] / M)
                                : rstd * d * wa[c];
      }
    }
  }
  e.y = e.y.reshape(x_in.sizes());
  e.dx = e.dx.reshape(x_in.sizes());
  return e;
}

void check_case(const std::string& name, const at::Tensor& x, bool training, bool relu, double eps = 1e-5) {
  const bool f64 = x.scalar_type() == at::kDouble;
  const int64_t C = x.size(1);
  const auto opts = at::TensorOptions().dtype(x.scalar_type());
  const at::Tensor w = at::randn({C}, opts) * 0.5 + 1.0, b = at::randn({C}, opts) * 0.5;
  const at::Tensor rm = at::randn({C}) * 0.1, rv = at::rand({C}) + 0.5;
  const at::Tensor rm0 = rm.clone(), rv0 = rv.clone();
  const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor dy = at::randn(x.sizes(), opts).contiguous(fmt);
  const Expected e = naive(x, dy, rm, rv, w, b, training, eps, relu);
  auto [y, mean, var] = bitfast::cpu::batch_norm_relu_fwd(x, rm, rv, w, b, training, eps, relu);
  if (!y.is_contiguous(fmt) || y.scalar_type() != x.scalar_type()) {
    std::printf("FAIL %s: y has the wrong layout or dtype\n", name.c_str());
    ++bitfast::test::failures();
  }
  if (!rm.equal(rm0) || !rv.equal(rv0)) {
    std::printf("FAIL %s: the forward changed the running statistics\n", name.c_str());
    ++bitfast::test::failures();
  }
  const double tol = f64 ? 1e-10 : 2e-5;
  expect_close(name + " y", y, e.y, tol, tol);
  expect_close(name + " mean", mean, e.mean, tol, tol);
  expect_close(name + " var", var, e.var, tol, tol);
  auto [dx, dw, db] = bitfast::cpu::batch_norm_relu_bwd(dy, x, w, b, mean, var, training, eps, relu);
  if (!dx.is_contiguous(fmt) || dx.scalar_type() != x.scalar_type()) {
    std::printf("FAIL %s: dx has the wrong layout or dtype\n", name.c_str());
    ++bitfast::test::failures();
  }
  const double scale = (1.0 / (e.var + eps).sqrt()).max().item<double>();
  const double sums = double(x.numel() / C);
  expect_close(name + " dx", dx, e.dx, tol * scale * 4, tol * 4);
  expect_close(name + " dw", dw, e.dw, tol * sums, tol * 4);
  expect_close(name + " db", db, e.db, tol * sums, tol * 4);
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<std::vector<int64_t>> shapes = {
      {2, 1, 2, 1},     // minimal
      {3, 5, 7, 3},     // odd sizes
      {4, 64, 14, 14},  // BiT C=64
      {2, 512, 7, 7},   // a late stage
      {8, 3, 30, 30},   // few channels, many pixel blocks
  };
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    const std::string dn = dtype == at::kFloat ? "fp32" : "fp64";
    for (const auto& shape : shapes) {
      std::string sn;
      for (auto s : shape) sn += std::to_string(s) + "x";
      const at::Tensor x = at::randn(shape, at::TensorOptions().dtype(dtype)) * 2 + 0.5;
      for (const bool training : {true, false}) {
        for (const bool relu : {true, false}) {
          const std::string tn = std::string(training ? " train" : " eval") + (relu ? " relu" : " norelu");
          check_case(dn + " nchw " + sn + tn, x, training, relu);
          check_case(dn + " nhwc " + sn + tn, x.contiguous(at::MemoryFormat::ChannelsLast), training, relu);
        }
      }
    }
  }

  // the running-statistics update, unbiased variance
  {
    const at::Tensor rm = at::zeros({3}), rv = at::ones({3});
    at::Tensor rm_mut = rm.clone(), rv_mut = rv.clone();
    const at::Tensor mean = at::tensor({1.0f, -2.0f, 0.5f}), var = at::tensor({4.0f, 1.0f, 0.0f});
    bitfast::cpu::batch_norm_update_stats_(rm_mut, rv_mut, mean, var, 0.25, 5);
    expect_close("update mean", rm_mut, 0.75 * rm + 0.25 * mean, 1e-7, 1e-7);
    expect_close("update var", rv_mut, 0.75 * rv + 0.25 * var * 1.25, 1e-7, 1e-7);
  }

  // argument checks: clear errors, no crash
  const at::Tensor x = at::randn({2, 6, 3, 3});
  const std::optional<at::Tensor> none;
  expect_error("3-dim x", "expected (N, C, H, W)", [&] {
    bitfast::cpu::batch_norm_relu_fwd(at::randn({2, 6, 3}), none, none, none, none, true, 1e-5, true);
  });
  expect_error("eval without stats", "required when training=False",
               [&] { bitfast::cpu::batch_norm_relu_fwd(x, none, none, none, none, false, 1e-5, true); });
  auto [y, mean, var] = bitfast::cpu::batch_norm_relu_fwd(x, none, none, none, none, true, 1e-5, true);
  expect_error("var dtype", "expected Float", [&] {
    bitfast::cpu::batch_norm_relu_bwd(y, x, none, none, mean, var.to(at::kDouble), true, 1e-5, true);
  });
  at::Tensor rm = at::zeros({6}), rv = at::ones({5});
  expect_error("running_var shape", "like running_mean",
               [&] { bitfast::cpu::batch_norm_update_stats_(rm, rv, mean, var, 0.1, 18); });
  return bitfast::test::finish("test_batch_norm_relu");
}
