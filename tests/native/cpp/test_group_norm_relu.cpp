// C++ unit test of bitfast::cpu::group_norm_relu_fwd/bwd against straightforward loops in
// float64 (the math of bitfast/ops/reference/group_norm_relu_ref.py), for fp32 and fp64 inputs in NCHW and
// channels_last, with and without affine parameters and ReLU, at edge and BiT shapes.
#include "cpu/group_norm_relu.h"

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
  at::Tensor y, mean, rstd, dx, dw, db;
};

// Two passes per (sample, group) in double, then the closed-form gradients.
Expected naive(const at::Tensor& x_in, const at::Tensor& dy_in, const at::Tensor& w_in, const at::Tensor& b_in,
               int64_t G, double eps, bool relu) {
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3), Cg = C / G, M = Cg * HW;
  const at::Tensor x = x_in.to(at::kDouble).contiguous().reshape({N, C, HW});
  const at::Tensor dy = dy_in.to(at::kDouble).contiguous().reshape({N, C, HW});
  const at::Tensor w = w_in.to(at::kDouble), b = b_in.to(at::kDouble);
  const auto o = x.options();
  Expected e{at::empty({N, C, HW}, o), at::empty({N, G}, o), at::empty({N, G}, o), at::empty({N, C, HW}, o),
             at::zeros({C}, o), at::zeros({C}, o)};
  auto xa = x.accessor<double, 3>(), ga = dy.accessor<double, 3>(), ya = e.y.accessor<double, 3>();
  auto dxa = e.dx.accessor<double, 3>();
  auto wa = w.accessor<double, 1>(), ba = b.accessor<double, 1>();
  auto dwa = e.dw.accessor<double, 1>(), dba = e.db.accessor<double, 1>();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      double s = 0, q = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (int64_t i = 0; i < HW; ++i) s += xa[n][c][i];
      const double mean = s / M;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (int64_t i = 0; i < HW; ++i) q += (xa[n][c][i] - mean) * (xa[n][c][i] - mean);
      const double rstd = 1.0 / std::sqrt(q / M + eps);
      e.mean[n][g] = mean;
      e.rstd[n][g] = rstd;
      double sg = 0, sgx = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        for (int64_t i = 0; i < HW; ++i) {
          const double xhat = (xa[n][c][i] - mean) * rstd, v = xhat * wa[c] + ba[c];
          ya[n][c][i] = relu ? std::max(v, 0.0) : v;
          const double d = (!relu || v > 0) ? ga[n][c][i] : 0.0;
          dba[c] += d;
          dwa[c] += d * xhat;
          sg += d * wa[c];
          sgx += d * wa[c] * xhat;
        }
      }
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        for (int64_t i = 0; i < HW; ++i) {
          const double xhat = (xa[n][c][i] - mean) * rstd, v = xhat * wa[c] + ba[c];
          const double d = (!relu || v > 0) ? ga[n][c][i] : 0.0;
          dxa[n][c][i] = rstd * (d * wa[c] - sg / M - xhat * sgx / M);
        }
      }
    }
  }
  e.y = e.y.reshape(x_in.sizes());
  e.dx = e.dx.reshape(x_in.sizes());
  return e;
}

void check_case(const std::string& name, const at::Tensor& x, int64_t G, bool affine, bool relu, double eps = 1e-5) {
  const bool f64 = x.scalar_type() == at::kDouble;
  const int64_t C = x.size(1);
  const auto opts = at::TensorOptions().dtype(x.scalar_type());
  const at::Tensor w = at::randn({C}, opts) * 0.5 + 1.0, b = at::randn({C}, opts) * 0.5;
  const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor dy = at::randn(x.sizes(), opts).contiguous(cl ? at::MemoryFormat::ChannelsLast
                                                                  : at::MemoryFormat::Contiguous);
  const std::optional<at::Tensor> wo = affine ? std::optional<at::Tensor>(w) : std::nullopt;
  const std::optional<at::Tensor> bo = affine ? std::optional<at::Tensor>(b) : std::nullopt;
  const Expected e = naive(x, dy, affine ? w : at::ones({C}, opts), affine ? b : at::zeros({C}, opts), G, eps, relu);
  auto [y, mean, rstd] = bitfast::cpu::group_norm_relu_fwd(x, wo, bo, G, eps, relu);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (!y.is_contiguous(fmt) || y.scalar_type() != x.scalar_type()) {
    std::printf("FAIL %s: y has the wrong layout or dtype\n", name.c_str());
    ++bitfast::test::failures();
  }
  const double tol = f64 ? 1e-10 : 2e-5;
  expect_close(name + " y", y, e.y, tol, tol);
  expect_close(name + " mean", mean, e.mean, tol, tol);
  expect_close(name + " rstd", rstd, e.rstd, tol, tol);
  auto [dx, dw, db] = bitfast::cpu::group_norm_relu_bwd(dy, x, wo, bo, mean, rstd, G, relu);
  if (!dx.is_contiguous(fmt) || dx.scalar_type() != x.scalar_type()) {
    std::printf("FAIL %s: dx has the wrong layout or dtype\n", name.c_str());
    ++bitfast::test::failures();
  }
  // dx is rstd times a difference of O(1) terms; dw and db are sums over N * H * W terms
  const double scale = e.rstd.abs().max().item<double>();
  const double sums = double(x.numel() / C);
  expect_close(name + " dx", dx, e.dx, tol * scale * 4, tol * 4);
  // without weight, grad_weight and grad_bias are float32 (the reference's rule)
  const double ptol = affine ? tol : 2e-5;
  expect_close(name + " dw", dw, e.dw, ptol * sums, ptol * 4);
  expect_close(name + " db", db, e.db, ptol * sums, ptol * 4);
}

}  // namespace

int main() {
  at::manual_seed(0);
  struct Case {
    std::vector<int64_t> shape;
    int64_t groups;
  };
  const std::vector<Case> cases = {
      {{1, 2, 1, 2}, 1},     // minimal
      {{2, 6, 5, 3}, 1},     // one group
      {{2, 12, 3, 5}, 12},   // groups == channels
      {{3, 40, 7, 9}, 8},    // odd sizes
      {{2, 64, 14, 14}, 32}, // BiT C=64
      {{2, 512, 4, 4}, 32},  // a late stage, few pixels
      {{1, 8, 40, 40}, 2},   // a group longer than a sum chunk; many pixel blocks
  };
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    const std::string dn = dtype == at::kFloat ? "fp32" : "fp64";
    for (const auto& c : cases) {
      std::string sn;
      for (auto s : c.shape) sn += std::to_string(s) + "x";
      const at::Tensor x = at::randn(c.shape, at::TensorOptions().dtype(dtype)) * 1.5 + 0.3;
      for (const bool relu : {true, false}) {
        const std::string rn = relu ? " relu" : " norelu";
        check_case(dn + " nchw " + sn + rn, x, c.groups, true, relu);
        check_case(dn + " nhwc " + sn + rn, x.contiguous(at::MemoryFormat::ChannelsLast), c.groups, true, relu);
      }
      check_case(dn + " nchw noaffine " + sn, x, c.groups, false, true);
      check_case(dn + " nhwc noaffine " + sn, x.contiguous(at::MemoryFormat::ChannelsLast), c.groups, false, true);
    }
    // H and W swapped in memory: neither layout, taken contiguous
    check_case(dn + " transposed", at::randn({2, 16, 5, 7}, at::TensorOptions().dtype(dtype)).transpose(2, 3), 4,
               true, true);
  }

  // argument checks: clear errors, no crash
  const at::Tensor x = at::randn({2, 6, 3, 3});
  const std::optional<at::Tensor> none;
  expect_error("3-dim x", "expected (N, C, H, W)",
               [&] { bitfast::cpu::group_norm_relu_fwd(at::randn({2, 6, 3}), none, none, 3, 1e-5, true); });
  expect_error("groups", "not divisible by num_groups=4",
               [&] { bitfast::cpu::group_norm_relu_fwd(x, none, none, 4, 1e-5, true); });
  expect_error("weight shape", "one value per channel",
               [&] { bitfast::cpu::group_norm_relu_fwd(x, at::randn({5}), none, 3, 1e-5, true); });
  auto [y, mean, rstd] = bitfast::cpu::group_norm_relu_fwd(x, none, none, 3, 1e-5, true);
  expect_error("grad shape", "expected equal shapes",
               [&] { bitfast::cpu::group_norm_relu_bwd(at::randn({1, 6, 3, 3}), x, none, none, mean, rstd, 3, true); });
  expect_error("mean shape", "one value per (sample, group)",
               [&] { bitfast::cpu::group_norm_relu_bwd(y, x, none, none, mean.narrow(1, 0, 2), rstd, 3, true); });
  expect_error("rstd dtype", "expected Float",
               [&] { bitfast::cpu::group_norm_relu_bwd(y, x, none, none, mean, rstd.to(at::kDouble), 3, true); });
  return bitfast::test::finish("test_group_norm_relu");
}
