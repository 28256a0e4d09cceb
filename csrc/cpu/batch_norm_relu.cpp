// BatchNorm+ReLU on CPU, NCHW and channels_last, without transposing either.
//
// NCHW: a channel is N rows of H * W contiguous elements, C * H * W apart, and one parallel
// task: two passes for the statistics in training (the mean, then the variance about the
// mean), one that writes y. channels_last: the loops run across channels (vectorized over
// C) and a task is a block of pixels; each pass writes per-block column sums that are then
// combined per channel, in double and in block order. The backward has the same shape: a
// pass for the sums of d and d * (x - mean), one for dx.
//
// No sum races and every combination has a fixed order, so results are reproducible
// whatever the thread count. fp16 data are widened into float buffers per task; bf16 is
// read and written in place (converted in registers, bitwise the float loops on widened
// copies). Statistics are float32 (float64 for fp64 inputs).
#include "cpu/batch_norm_relu.h"

#include "ops/batch_norm_relu.h"
#include "cpu/norm_rows.h"
#include "cpu/norm_util.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace bitfast::cpu {
namespace {

// Elements per parallel task at least: below this a thread costs more than it saves.
constexpr int64_t kGrainElems = 32768;

int64_t grain(int64_t elems_per_task) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(elems_per_task, 1));
}

struct Shape {
  int64_t N, C, HW, count;  // count = N * HW, the elements of a channel
  int64_t Rb, nblk;         // channels_last: pixels per block, blocks over all N * HW pixels
};

Shape shape_of(const at::Tensor& x) {
  Shape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.HW = x.size(2) * x.size(3);
  s.count = s.N * s.HW;
  s.Rb = rows_per_block(s.C);
  s.nblk = (s.count + s.Rb - 1) / s.Rb;
  return s;
}

// Per-channel arguments of the kernels, in the math type.
template <typename acc_t>
struct Params {
  acc_t* MEAN;      // (C,) written in training, read otherwise
  acc_t* VAR;       // (C,)
  const acc_t* W;   // (C,)
  const acc_t* B;   // (C,)
};

// rstd = 1 / sqrt(var + eps), in the math type as the reference computes it.
template <typename acc_t>
acc_t rstd_of(acc_t var, double eps) {
  return acc_t(1) / std::sqrt(var + acc_t(eps));
}

// ---------------------------------------------------------------------------------------
// NCHW
// ---------------------------------------------------------------------------------------

// A channel is read through rows_input: bf16 in place (a channel of a late stage at batch
// 16 is 16 rows of 16 or 49 elements, whose copies in and out cost more than the passes
// over them), fp32/fp64 in place, fp16 widened into a float buffer.
template <typename scalar_t>
void fwd_nchw(const scalar_t* X, scalar_t* Y, const Params<at::opmath_type<scalar_t>>& p, const Shape& s,
              bool training, double eps, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = s.C * s.HW;
  at::parallel_for(0, s.C, grain(s.count), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, ybuf, sc(s.N), sh(s.N);
    for (int64_t c = begin; c < end; ++c) {
      int64_t st = 0;
      const auto* x = rows_input(X + c * s.HW, s.N, s.HW, stride, xbuf, &st);
      if (training) {
        const acc_t mean = acc_t(rows::sum_rows(x, s.N, s.HW, st) / double(s.count));
        p.MEAN[c] = mean;
        p.VAR[c] = acc_t(rows::sum_sq_dev_rows(x, s.N, s.HW, st, mean) / double(s.count));
      }
      const acc_t rstd = rstd_of(p.VAR[c], eps);
      std::fill(sc.begin(), sc.end(), rstd * p.W[c]);
      std::fill(sh.begin(), sh.end(), p.B[c] - p.MEAN[c] * (rstd * p.W[c]));
      if constexpr (direct_rows<scalar_t>) {
        rows::planar_affine(x, Y + c * s.HW, s.N, s.HW, st, sc.data(), sh.data(), relu);
      } else {
        // fp32/fp64 write y in place (rows `stride` apart), fp16 into contiguous rows
        acc_t* y = out_buffer(Y + c * s.HW, s.N * s.HW, ybuf);
        rows::planar_affine(x, y, s.N, s.HW, st, sc.data(), sh.data(), relu);
        store_rows(y, Y + c * s.HW, s.N, s.HW, stride);
      }
    }
  });
}

// DW, DB: (C,) outputs, sum of d * xhat and of d.
template <typename scalar_t>
void bwd_nchw(const scalar_t* DY, const scalar_t* X, scalar_t* DX, const Params<at::opmath_type<scalar_t>>& p,
              double* DW, double* DB, const Shape& s, bool training, double eps, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = s.C * s.HW;
  at::parallel_for(0, s.C, grain(2 * s.count), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, dybuf, dxbuf, sc(s.N), sh(s.N), mv(s.N), a(s.N), kx(s.N), k0(s.N);
    std::vector<double> sdy(s.N), sdyx(s.N);
    for (int64_t c = begin; c < end; ++c) {
      int64_t st = 0, st2 = 0;  // equal: rows of the same width and type
      const auto* x = rows_input(X + c * s.HW, s.N, s.HW, stride, xbuf, &st);
      const auto* dy = rows_input(DY + c * s.HW, s.N, s.HW, stride, dybuf, &st2);
      const acc_t mean = p.MEAN[c], rstd = rstd_of(p.VAR[c], eps), w = p.W[c];
      std::fill(sc.begin(), sc.end(), rstd * w);
      std::fill(sh.begin(), sh.end(), p.B[c] - mean * (rstd * w));
      std::fill(mv.begin(), mv.end(), mean);
      rows::planar_bwd_sums(dy, x, s.N, s.HW, st, sc.data(), sh.data(), mv.data(), relu, sdy.data(), sdyx.data());
      double db = 0, dwx = 0;
      for (int64_t n = 0; n < s.N; ++n) {
        db += sdy[n];
        dwx += sdyx[n];
      }
      const double r = rstd, dw = dwx * r;
      DB[c] = db;
      DW[c] = dw;
      // training: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = d * w;
      // eval: dx = rstd * g.
      const double mg = training ? double(w) * db / double(s.count) : 0.0;
      const double mgx = training ? double(w) * dw / double(s.count) : 0.0;
      std::fill(a.begin(), a.end(), acc_t(r * double(w)));
      std::fill(kx.begin(), kx.end(), acc_t(-r * r * mgx));
      std::fill(k0.begin(), k0.end(), acc_t(r * r * mgx * double(mean) - r * mg));
      if constexpr (direct_rows<scalar_t>) {
        rows::planar_bwd_dx(dy, x, DX + c * s.HW, s.N, s.HW, st, sc.data(), sh.data(), a.data(), kx.data(),
                            k0.data(), relu);
      } else {
        acc_t* dx = out_buffer(DX + c * s.HW, s.N * s.HW, dxbuf);
        rows::planar_bwd_dx(dy, x, dx, s.N, s.HW, st, sc.data(), sh.data(), a.data(), kx.data(), k0.data(), relu);
        store_rows(dx, DX + c * s.HW, s.N, s.HW, stride);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// channels_last
// ---------------------------------------------------------------------------------------

// Calls f(task, pixels, element offset) for every block of pixels.
template <typename F>
void for_blocks(const Shape& s, F&& f) {
  at::parallel_for(0, s.nblk, grain(s.Rb * s.C), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t p0 = b * s.Rb;
      f(b, std::min(s.Rb, s.count - p0), p0 * s.C);
    }
  });
}

// Calls f(c, total) with the sum over the blocks of part[b * C + c], in block order, in
// double, for every channel.
template <typename acc_t, typename F>
void for_channel_totals(const std::vector<acc_t>& part, const Shape& s, F&& f) {
  at::parallel_for(0, s.C, std::max<int64_t>(1, 4096 / std::max<int64_t>(s.nblk, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double t = 0;
      for (int64_t b = 0; b < s.nblk; ++b) t += double(part[b * s.C + c]);
      f(c, t);
    }
  });
}

template <typename scalar_t>
void fwd_nhwc(const scalar_t* X, scalar_t* Y, const Params<at::opmath_type<scalar_t>>& p, const Shape& s,
              bool training, double eps, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  if (training) {
    std::vector<acc_t> part(s.nblk * s.C);
    for_blocks(s, [&](int64_t b, int64_t np, int64_t off) {
      thread_local std::vector<acc_t> xbuf;
      rows::cols_sum(cols_load(X + off, np * s.C, xbuf), np, s.C, s.C, part.data() + b * s.C);
    });
    for_channel_totals(part, s, [&](int64_t c, double t) { p.MEAN[c] = acc_t(t / double(s.count)); });
    for_blocks(s, [&](int64_t b, int64_t np, int64_t off) {
      thread_local std::vector<acc_t> xbuf;
      rows::cols_sum_sq_dev(cols_load(X + off, np * s.C, xbuf), np, s.C, s.C, p.MEAN, part.data() + b * s.C);
    });
    for_channel_totals(part, s, [&](int64_t c, double q) { p.VAR[c] = acc_t(q / double(s.count)); });
  }
  std::vector<acc_t> sc(s.C), sh(s.C);
  for (int64_t c = 0; c < s.C; ++c) {
    sc[c] = rstd_of(p.VAR[c], eps) * p.W[c];
    sh[c] = p.B[c] - p.MEAN[c] * sc[c];
  }
  for_blocks(s, [&](int64_t, int64_t np, int64_t off) {
    thread_local std::vector<acc_t> xbuf, ybuf;
    if constexpr (direct_rows<scalar_t>) {
      rows::cols_affine(X + off, Y + off, np, s.C, s.C, sc.data(), sh.data(), relu);
      return;
    }
    const acc_t* x = load(X + off, np * s.C, xbuf);
    acc_t* y = out_buffer(Y + off, np * s.C, ybuf);
    rows::cols_affine(x, y, np, s.C, s.C, sc.data(), sh.data(), relu);
    store(y, Y + off, np * s.C);
  });
}

template <typename scalar_t>
void bwd_nhwc(const scalar_t* DY, const scalar_t* X, scalar_t* DX, const Params<at::opmath_type<scalar_t>>& p,
              double* DW, double* DB, const Shape& s, bool training, double eps, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> sc(s.C), sh(s.C), rs(s.C), a(s.C), kx(s.C), k0(s.C);
  for (int64_t c = 0; c < s.C; ++c) {
    rs[c] = rstd_of(p.VAR[c], eps);
    sc[c] = rs[c] * p.W[c];
    sh[c] = p.B[c] - p.MEAN[c] * sc[c];
  }
  std::vector<acc_t> pdy(s.nblk * s.C), pdyx(s.nblk * s.C);
  for_blocks(s, [&](int64_t b, int64_t np, int64_t off) {
    thread_local std::vector<acc_t> xbuf, dybuf;
    const auto* x = cols_load(X + off, np * s.C, xbuf);
    const auto* dy = cols_load(DY + off, np * s.C, dybuf);
    rows::cols_bwd_sums(dy, x, np, s.C, s.C, sc.data(), sh.data(), p.MEAN, relu, pdy.data() + b * s.C,
                        pdyx.data() + b * s.C);
  });
  for_channel_totals(pdy, s, [&](int64_t c, double t) { DB[c] = t; });
  for_channel_totals(pdyx, s, [&](int64_t c, double t) { DW[c] = t * double(rs[c]); });
  for (int64_t c = 0; c < s.C; ++c) {
    const double r = rs[c], w = p.W[c];
    const double mg = training ? w * DB[c] / double(s.count) : 0.0;
    const double mgx = training ? w * DW[c] / double(s.count) : 0.0;
    a[c] = acc_t(r * w);
    kx[c] = acc_t(-r * r * mgx);
    k0[c] = acc_t(r * r * mgx * double(p.MEAN[c]) - r * mg);
  }
  for_blocks(s, [&](int64_t, int64_t np, int64_t off) {
    thread_local std::vector<acc_t> xbuf, dybuf, dxbuf;
    if constexpr (direct_rows<scalar_t>) {
      rows::cols_bwd_dx(DY + off, X + off, DX + off, np, s.C, s.C, sc.data(), sh.data(), a.data(), kx.data(),
                        k0.data(), relu);
      return;
    }
    const acc_t* x = load(X + off, np * s.C, xbuf);
    const acc_t* dy = load(DY + off, np * s.C, dybuf);
    acc_t* dx = out_buffer(DX + off, np * s.C, dxbuf);
    rows::cols_bwd_dx(dy, x, dx, np, s.C, s.C, sc.data(), sh.data(), a.data(), kx.data(), k0.data(), relu);
    store(dx, DX + off, np * s.C);
  });
}

at::Tensor to_param_dtype(const std::vector<double>& v, at::ScalarType dtype) {
  at::Tensor out = at::empty({int64_t(v.size())}, at::TensorOptions().dtype(at::kDouble));
  std::copy(v.begin(), v.end(), out.data_ptr<double>());
  return out.to(dtype);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_fwd(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& running_mean,
                                                                   const std::optional<at::Tensor>& running_var,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   bool training, double eps, bool relu) {
  check_batch_norm_relu_fwd(x, running_mean, running_var, weight, bias, training, c10::DeviceType::CPU);
  const bool cl = is_channels_last(x);
  const at::Tensor xc = x.contiguous(format_of(cl));
  const Shape s = shape_of(x);
  const auto acc = stat_dtype(x.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(format_of(cl)));
  at::Tensor mean, var;
  if (training) {
    mean = at::empty({s.C}, x.options().dtype(acc));
    var = at::empty({s.C}, x.options().dtype(acc));
  } else {
    // float32 copies of the running statistics: the outputs never alias the buffers
    mean = running_mean->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
    var = running_var->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  }
  const at::Tensor w = channel_param(weight, s.C, acc, 1.0), b = channel_param(bias, s.C, acc, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "native_batch_norm_relu_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Params<acc_t> p{mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
                          b.const_data_ptr<acc_t>()};
    auto run = cl ? fwd_nhwc<scalar_t> : fwd_nchw<scalar_t>;
    run(xc.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), p, s, training, eps, relu);
  });
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const at::Tensor& mean, const at::Tensor& var,
                                                                   bool training, double eps, bool relu) {
  check_batch_norm_relu_bwd(grad_y, x, weight, bias, mean, var, c10::DeviceType::CPU);
  const bool cl = is_channels_last(x);
  const auto fmt = format_of(cl);
  const at::Tensor xc = x.contiguous(fmt), gc = grad_y.contiguous(fmt);
  // the kernels take mutable statistics pointers (the forward writes them); these copies
  // are only read
  at::Tensor mc = mean.contiguous(), vc = var.contiguous();
  const Shape s = shape_of(x);
  const auto acc = stat_dtype(x.scalar_type());
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  const at::Tensor w = channel_param(weight, s.C, acc, 1.0), b = channel_param(bias, s.C, acc, 0.0);
  std::vector<double> dw(s.C), db(s.C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "native_batch_norm_relu_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Params<acc_t> p{mc.data_ptr<acc_t>(), vc.data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
                          b.const_data_ptr<acc_t>()};
    auto run = cl ? bwd_nhwc<scalar_t> : bwd_nchw<scalar_t>;
    run(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), p, dw.data(),
        db.data(), s, training, eps, relu);
  });
  const auto pdtype = weight.has_value() && weight->defined() ? weight->scalar_type() : at::kFloat;
  return {dx, to_param_dtype(dw, pdtype), to_param_dtype(db, pdtype)};
}

void batch_norm_update_stats_(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                              const at::Tensor& var, double momentum, int64_t count) {
  check_batch_norm_update_stats(running_mean, running_var, mean, var, count, c10::DeviceType::CPU);
  // (C,) vectors: tensor arithmetic is as fast as a loop here, and rounds as the reference
  const at::Tensor unbiased = count > 1 ? var.mul(double(count) / double(count - 1)) : var;
  running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
  running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.scalar_type()), momentum);
}

}  // namespace bitfast::cpu

// The op's CPU kernels, attached to its native schemas (defined in bitfast/ops/batch_norm_relu.py).
TORCH_LIBRARY_IMPL(bitfast, CPU, m) {
  m.impl("native_batch_norm_relu_fwd", &bitfast::cpu::batch_norm_relu_fwd);
  m.impl("native_batch_norm_relu_bwd", &bitfast::cpu::batch_norm_relu_bwd);
  m.impl("native_batch_norm_update_stats_", &bitfast::cpu::batch_norm_update_stats_);
}
