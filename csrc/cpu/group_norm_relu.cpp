// GroupNorm+ReLU on CPU, NCHW and channels_last, without transposing either.
//
// NCHW: a (sample, group) is one contiguous run of M = C / G * H * W elements, and one
// parallel task. The forward makes two passes over it for the statistics (the mean, then
// the variance about the mean: more accurate than one-pass sums of squares) and one that
// writes y; a group of BiT (at most 8 x 56 x 56 fp32, 100 KB) stays in L2 meanwhile, so x
// is read from memory once. The backward makes one pass for its sums and one for dx.
//
// channels_last: the channels of a pixel are contiguous, so the loops run across channels
// (vectorized over C) and a task is a block of pixels of one sample. Each pass writes
// per-block column sums; the blocks of a sample are then combined, in double and in a
// fixed order, into the per-(sample, group) statistics, and the next pass runs.
//
// Sums never race: each block owns its partial sums and every combination has a fixed
// order, so results are bitwise reproducible whatever the thread count. fp16/bf16 data are
// widened into float buffers per task; statistics are float32 (float64 for fp64 inputs).
#include "cpu/group_norm_relu.h"

#include "common/checks.h"
#include "cpu/norm_rows.h"
#include "cpu/norm_util.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace bitfast::cpu {
namespace {

// Elements per parallel task at least: below this a thread costs more than it saves.
constexpr int64_t kGrainElems = 32768;

struct Shape {
  int64_t N, C, HW, G, Cg, M;  // M = Cg * HW, the elements of a group
  int64_t Rb, nblk;            // channels_last: pixels per block, blocks per sample
};

Shape shape_of(const at::Tensor& x, int64_t num_groups) {
  Shape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.HW = x.size(2) * x.size(3);
  s.G = num_groups;
  s.Cg = s.C / s.G;
  s.M = s.Cg * s.HW;
  s.Rb = rows_per_block(s.C);
  s.nblk = (s.HW + s.Rb - 1) / s.Rb;
  return s;
}

int64_t grain(int64_t elems_per_task) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(elems_per_task, 1));
}

// ---------------------------------------------------------------------------------------
// NCHW
// ---------------------------------------------------------------------------------------

template <typename scalar_t>
void fwd_nchw(const scalar_t* X, scalar_t* Y, at::opmath_type<scalar_t>* MEAN, at::opmath_type<scalar_t>* RSTD,
              const at::opmath_type<scalar_t>* W, const at::opmath_type<scalar_t>* B, const Shape& s, double eps,
              bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, s.N * s.G, grain(s.M), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, ybuf, sc(s.Cg), sh(s.Cg);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t c0 = (ng % s.G) * s.Cg;
      const acc_t* x = load(X + ng * s.M, s.M, xbuf);
      // 0 / 0 = NaN for an empty group, as the reference's mean of nothing.
      const acc_t mean = acc_t(rows::sum(x, s.M) / double(s.M));
      const double var = rows::sum_sq_dev(x, s.M, mean) / double(s.M);
      const acc_t rstd = acc_t(1.0 / std::sqrt(var + eps));
      MEAN[ng] = mean;
      RSTD[ng] = rstd;
      for (int64_t c = 0; c < s.Cg; ++c) {
        sc[c] = rstd * W[c0 + c];
        sh[c] = B[c0 + c] - mean * sc[c];
      }
      acc_t* y = out_buffer(Y + ng * s.M, s.M, ybuf);
      rows::planar_affine(x, y, s.Cg, s.HW, s.HW, sc.data(), sh.data(), relu);
      store(y, Y + ng * s.M, s.M);
    }
  });
}

// DWN, DBN: (N, C) per-sample sums of d * xhat and d, for grad_weight and grad_bias.
template <typename scalar_t>
void bwd_nchw(const scalar_t* DY, const scalar_t* X, scalar_t* DX, const at::opmath_type<scalar_t>* MEAN,
              const at::opmath_type<scalar_t>* RSTD, const at::opmath_type<scalar_t>* W,
              const at::opmath_type<scalar_t>* B, double* DWN, double* DBN, const Shape& s, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, s.N * s.G, grain(2 * s.M), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, dybuf, dxbuf, sc(s.Cg), sh(s.Cg), mv(s.Cg), a(s.Cg), kx(s.Cg), k0(s.Cg);
    std::vector<double> sdy(s.Cg), sdyx(s.Cg);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / s.G, c0 = (ng % s.G) * s.Cg;
      const acc_t* x = load(X + ng * s.M, s.M, xbuf);
      const acc_t* dy = load(DY + ng * s.M, s.M, dybuf);
      const acc_t mean = MEAN[ng], rstd = RSTD[ng];
      for (int64_t c = 0; c < s.Cg; ++c) {
        sc[c] = rstd * W[c0 + c];
        sh[c] = B[c0 + c] - mean * sc[c];
        mv[c] = mean;
      }
      rows::planar_bwd_sums(dy, x, s.Cg, s.HW, s.HW, sc.data(), sh.data(), mv.data(), relu, sdy.data(), sdyx.data());
      // with g = d * weight: sum(g) and sum(g * xhat) over the group
      double sum_g = 0, sum_gx = 0;
      for (int64_t c = 0; c < s.Cg; ++c) {
        const double db = sdy[c], dw = sdyx[c] * double(rstd);
        DBN[n * s.C + c0 + c] = db;
        DWN[n * s.C + c0 + c] = dw;
        sum_g += double(W[c0 + c]) * db;
        sum_gx += double(W[c0 + c]) * dw;
      }
      // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) = a * d + kx * x + k0
      const double r = rstd, mg = sum_g / double(s.M), mgx = sum_gx / double(s.M);
      for (int64_t c = 0; c < s.Cg; ++c) {
        a[c] = acc_t(r * double(W[c0 + c]));
        kx[c] = acc_t(-r * r * mgx);
        k0[c] = acc_t(r * r * mgx * double(mean) - r * mg);
      }
      acc_t* dx = out_buffer(DX + ng * s.M, s.M, dxbuf);
      rows::planar_bwd_dx(dy, x, dx, s.Cg, s.HW, s.HW, sc.data(), sh.data(), a.data(), kx.data(), k0.data(), relu);
      store(dx, DX + ng * s.M, s.M);
    }
  });
}

// ---------------------------------------------------------------------------------------
// channels_last
// ---------------------------------------------------------------------------------------

// Runs the channels_last passes of a call. With at least as many samples as threads, a
// task is a whole sample: its blocks are summed, combined and then written by one thread,
// so the sample (1 MB for 256 x 32 x 32 fp32) is still in L2 when the last pass reads it
// again. With fewer samples, each pass is spread over all blocks of all samples and the
// combinations run between them. Either way every block computes the same partial sums
// and every combination the same fixed-order sum: the results are bitwise identical.
//
//   sums(task, n, pixels, element offset)   fills the partial sums of one block
//   combine(n)                              turns a sample's partial sums into coefficients
//   write(task, n, pixels, element offset)  writes the output of one block
template <typename Sums, typename Combine, typename Write>
void nhwc_passes(const Shape& s, Sums&& sums, Combine&& combine, Write&& write) {
  auto block = [&](int64_t task, auto&& f) {
    const int64_t n = task / s.nblk, p0 = (task % s.nblk) * s.Rb;
    f(task, n, std::min(s.Rb, s.HW - p0), (n * s.HW + p0) * s.C);
  };
  if (s.N >= at::get_num_threads()) {
    at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t t = n * s.nblk; t < (n + 1) * s.nblk; ++t) block(t, sums);
        combine(n);
        for (int64_t t = n * s.nblk; t < (n + 1) * s.nblk; ++t) block(t, write);
      }
    });
    return;
  }
  const int64_t g = grain(s.Rb * s.C);
  at::parallel_for(0, s.N * s.nblk, g, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) block(t, sums);
  });
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) combine(n);
  });
  at::parallel_for(0, s.N * s.nblk, g, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) block(t, write);
  });
}

template <typename scalar_t>
void fwd_nhwc(const scalar_t* X, scalar_t* Y, at::opmath_type<scalar_t>* MEAN, at::opmath_type<scalar_t>* RSTD,
              const at::opmath_type<scalar_t>* W, const at::opmath_type<scalar_t>* B, const Shape& s, double eps,
              bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  // per block and channel: the sum, and the sum of squares about the block's own channel
  // mean, both from one read of the block (the second pass hits L1)
  std::vector<acc_t> sum(s.N * s.nblk * s.C), m2(s.N * s.nblk * s.C), sc(s.N * s.C), sh(s.N * s.C);
  auto block_pixels = [&](int64_t b) { return std::min(s.Rb, s.HW - b * s.Rb); };
  auto sums = [&](int64_t task, int64_t, int64_t np, int64_t off) {
    thread_local std::vector<acc_t> xbuf, bmean;
    const acc_t* x = load(X + off, np * s.C, xbuf);
    acc_t* bs = sum.data() + task * s.C;
    rows::cols_sum(x, np, s.C, bs);
    bmean.resize(s.C);
    for (int64_t c = 0; c < s.C; ++c) bmean[c] = bs[c] / acc_t(np);
    rows::cols_sum_sq_dev(x, np, s.C, bmean.data(), m2.data() + task * s.C);
  };
  auto combine = [&](int64_t n) {
    for (int64_t g = 0; g < s.G; ++g) {
      double t = 0;
      for (int64_t c = g * s.Cg; c < (g + 1) * s.Cg; ++c) {
        for (int64_t b = 0; b < s.nblk; ++b) t += double(sum[(n * s.nblk + b) * s.C + c]);
      }
      // 0 / 0 = NaN for an empty group, as the reference's mean of nothing.
      const double mu = t / double(s.M);
      // sum of (x - mu)^2 from each block's sum of squares about its own mean a:
      // m2 + 2 (a - mu)(S - n a) + n (a - mu)^2, exact whatever a was rounded to.
      double q = 0;
      for (int64_t c = g * s.Cg; c < (g + 1) * s.Cg; ++c) {
        for (int64_t b = 0; b < s.nblk; ++b) {
          const int64_t i = (n * s.nblk + b) * s.C + c;
          const double np = double(block_pixels(b)), a = double(sum[i] / acc_t(np)), d = a - mu;
          q += double(m2[i]) + 2.0 * d * (double(sum[i]) - np * a) + np * d * d;
        }
      }
      const acc_t mean = acc_t(mu), rstd = acc_t(1.0 / std::sqrt(q / double(s.M) + eps));
      MEAN[n * s.G + g] = mean;
      RSTD[n * s.G + g] = rstd;
      for (int64_t c = g * s.Cg; c < (g + 1) * s.Cg; ++c) {
        sc[n * s.C + c] = rstd * W[c];
        sh[n * s.C + c] = B[c] - mean * sc[n * s.C + c];
      }
    }
  };
  auto write = [&](int64_t, int64_t n, int64_t np, int64_t off) {
    thread_local std::vector<acc_t> xbuf, ybuf;
    const acc_t* x = load(X + off, np * s.C, xbuf);
    acc_t* y = out_buffer(Y + off, np * s.C, ybuf);
    rows::cols_affine(x, y, np, s.C, sc.data() + n * s.C, sh.data() + n * s.C, relu);
    store(y, Y + off, np * s.C);
  };
  nhwc_passes(s, sums, combine, write);
}

template <typename scalar_t>
void bwd_nhwc(const scalar_t* DY, const scalar_t* X, scalar_t* DX, const at::opmath_type<scalar_t>* MEAN,
              const at::opmath_type<scalar_t>* RSTD, const at::opmath_type<scalar_t>* W,
              const at::opmath_type<scalar_t>* B, double* DWN, double* DBN, const Shape& s, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t NC = s.N * s.C;
  std::vector<acc_t> pdy(s.N * s.nblk * s.C), pdyx(s.N * s.nblk * s.C);
  std::vector<acc_t> sc(NC), sh(NC), meanc(NC), a(NC), kx(NC), k0(NC);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t c = 0; c < s.C; ++c) {
      const int64_t g = c / s.Cg;
      const acc_t mean = MEAN[n * s.G + g], rstd = RSTD[n * s.G + g];
      sc[n * s.C + c] = rstd * W[c];
      sh[n * s.C + c] = B[c] - mean * sc[n * s.C + c];
      meanc[n * s.C + c] = mean;
    }
  }
  auto sums = [&](int64_t task, int64_t n, int64_t np, int64_t off) {
    thread_local std::vector<acc_t> xbuf, dybuf;
    const acc_t* x = load(X + off, np * s.C, xbuf);
    const acc_t* dy = load(DY + off, np * s.C, dybuf);
    rows::cols_bwd_sums(dy, x, np, s.C, sc.data() + n * s.C, sh.data() + n * s.C, meanc.data() + n * s.C, relu,
                        pdy.data() + task * s.C, pdyx.data() + task * s.C);
  };
  auto combine = [&](int64_t n) {
    for (int64_t g = 0; g < s.G; ++g) {
      const double mean = MEAN[n * s.G + g], r = RSTD[n * s.G + g];
      double sum_g = 0, sum_gx = 0;
      for (int64_t c = g * s.Cg; c < (g + 1) * s.Cg; ++c) {
        double db = 0, dwx = 0;
        for (int64_t b = 0; b < s.nblk; ++b) {
          db += double(pdy[(n * s.nblk + b) * s.C + c]);
          dwx += double(pdyx[(n * s.nblk + b) * s.C + c]);
        }
        const double dw = dwx * r;
        DBN[n * s.C + c] = db;
        DWN[n * s.C + c] = dw;
        sum_g += double(W[c]) * db;
        sum_gx += double(W[c]) * dw;
      }
      const double mg = sum_g / double(s.M), mgx = sum_gx / double(s.M);
      for (int64_t c = g * s.Cg; c < (g + 1) * s.Cg; ++c) {
        a[n * s.C + c] = acc_t(r * double(W[c]));
        kx[n * s.C + c] = acc_t(-r * r * mgx);
        k0[n * s.C + c] = acc_t(r * r * mgx * mean - r * mg);
      }
    }
  };
  auto write = [&](int64_t, int64_t n, int64_t np, int64_t off) {
    thread_local std::vector<acc_t> xbuf, dybuf, dxbuf;
    const acc_t* x = load(X + off, np * s.C, xbuf);
    const acc_t* dy = load(DY + off, np * s.C, dybuf);
    acc_t* dx = out_buffer(DX + off, np * s.C, dxbuf);
    const int64_t o = n * s.C;
    rows::cols_bwd_dx(dy, x, dx, np, s.C, sc.data() + o, sh.data() + o, a.data() + o, kx.data() + o, k0.data() + o,
                      relu);
    store(dx, DX + off, np * s.C);
  };
  nhwc_passes(s, sums, combine, write);
}

// grad_weight or grad_bias: the (N, C) per-sample sums added over the samples in order.
at::Tensor sum_over_samples(const std::vector<double>& per_sample, int64_t N, int64_t C, at::ScalarType dtype) {
  at::Tensor out = at::zeros({C}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) o[c] += per_sample[n * C + c];
  }
  return out.to(dtype);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_relu_fwd(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   int64_t num_groups, double eps, bool relu) {
  check_group_norm_relu_fwd(x, weight, bias, num_groups, c10::DeviceType::CPU);
  const bool cl = is_channels_last(x);
  const at::Tensor xc = x.contiguous(format_of(cl));
  const Shape s = shape_of(x, num_groups);
  const auto acc = stat_dtype(x.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(format_of(cl)));
  at::Tensor mean = at::empty({s.N, s.G}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({s.N, s.G}, x.options().dtype(acc));
  const at::Tensor w = channel_param(weight, s.C, acc, 1.0), b = channel_param(bias, s.C, acc, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "native_group_norm_relu_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = cl ? fwd_nhwc<scalar_t> : fwd_nchw<scalar_t>;
    run(xc.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
        w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), s, eps, relu);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_relu_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   int64_t num_groups, bool relu) {
  check_group_norm_relu_bwd(grad_y, x, weight, bias, mean, rstd, num_groups, c10::DeviceType::CPU);
  const bool cl = is_channels_last(x);
  const auto fmt = format_of(cl);
  const at::Tensor xc = x.contiguous(fmt), gc = grad_y.contiguous(fmt);
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const Shape s = shape_of(x, num_groups);
  const auto acc = stat_dtype(x.scalar_type());
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  const at::Tensor w = channel_param(weight, s.C, acc, 1.0), b = channel_param(bias, s.C, acc, 0.0);
  std::vector<double> dwn(s.N * s.C), dbn(s.N * s.C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "native_group_norm_relu_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = cl ? bwd_nhwc<scalar_t> : bwd_nchw<scalar_t>;
    run(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
        mc.const_data_ptr<acc_t>(), rc.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
        dwn.data(), dbn.data(), s, relu);
  });
  const auto pdtype = weight.has_value() && weight->defined() ? weight->scalar_type() : at::kFloat;
  return {dx, sum_over_samples(dwn, s.N, s.C, pdtype), sum_over_samples(dbn, s.N, s.C, pdtype)};
}

}  // namespace bitfast::cpu
