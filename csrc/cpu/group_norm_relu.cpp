// GroupNorm+ReLU on CPU, NCHW and channels_last, without transposing either; also with the
// residual add before it (native_group_norm_relu_add_*): the forward's first read of a
// block computes and stores s = a + b, and the backward adds grad_sum to dx before storing.
//
// NCHW: a (sample, group) is one contiguous run of M = C / G * H * W elements, and one
// parallel task. The forward makes two passes over it for the statistics (the mean, then
// the variance about the mean: more accurate than one-pass sums of squares) and one that
// writes y; a group of BiT (at most 8 x 56 x 56 fp32, 100 KB) stays in L2 meanwhile, so x
// is read from memory once. The backward makes one pass for its sums and one for dx.
//
// channels_last: the channels of a pixel are contiguous, so the loops run across channels
// (vectorized over C) over blocks of pixels of one sample. Each pass writes per-block
// column sums; the blocks of a sample are then combined, in double and in a fixed order,
// into the per-(sample, group) statistics, and the next pass runs. A task is a whole
// sample, or, with fewer samples than threads, a range of whole groups of a sample (a
// slice of each pixel's channels: no thread waits for another), see nhwc_passes.
//
// Sums never race: each block owns its partial sums and every combination has a fixed
// order, so results are bitwise reproducible whatever the thread count. fp16 data are
// widened into float buffers per task; bf16 is read and written in place (converted in
// registers), except where the residual add's sum or gradient is formed in a buffer.
// Statistics are float32 (float64 for fp64 inputs).
#include "cpu/group_norm_relu.h"

#include "ops/group_norm_relu.h"
#include "cpu/norm_rows.h"
#include "cpu/norm_util.h"
#include "cpu/simd.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace bitfast::cpu {

// out = a + b elementwise (out may be a): the residual add, compiled for the baseline and
// for AVX2 like the loops of cpu/norm_rows.h (out of the anonymous namespace, as function
// multi-versioning needs).
BITFAST_TARGET_CLONES void residual_add(const float* a, const float* b, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

BITFAST_TARGET_CLONES void residual_add(const double* a, const double* b, double* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

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

// fp16/bf16 outputs are written through float buffers of about this many elements (8 KB),
// a few rows at a time, so that widening, the affine and narrowing all hit L1.
constexpr int64_t kStreamElems = 2048;

// Rows per streamed chunk of rows of `row` elements: all of them for float32/float64
// (written in place, nothing to stream), else about kStreamElems elements.
template <typename scalar_t>
int64_t stream_rows(int64_t row, int64_t rows) {
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) return rows;
  return std::max<int64_t>(1, kStreamElems / std::max<int64_t>(row, 1));
}

// An uninitialized array for per-call partial sums and coefficients, every element of
// which is written before it is read: zeroing them, as std::vector does, costs about as
// much as a pass over a late-stage sample.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : p_(new T[std::max<int64_t>(n, 1)]) {}
  T* data() { return p_.get(); }
  const T* data() const { return p_.get(); }
  T& operator[](int64_t i) { return p_[i]; }
  const T& operator[](int64_t i) const { return p_[i]; }

 private:
  std::unique_ptr<T[]> p_;
};

// The residual operands of native_group_norm_relu_add_fwd: the norm's input is then the
// sum a + b, written to `sum` as the forward reads it. All null for plain GroupNorm.
template <typename scalar_t>
struct Residual {
  const scalar_t* a = nullptr;
  const scalar_t* b = nullptr;
  scalar_t* sum = nullptr;
};

// n elements of the norm's input at element offset off, in the math type: those of X, or
// with a residual, sum = a + b rounded to scalar_t (stored) and read back rounded, so the
// statistics and y are those of the stored sum, as with an unfused a + b.
template <typename scalar_t>
const at::opmath_type<scalar_t>* load_input(const scalar_t* X, const Residual<scalar_t>& r, int64_t off, int64_t n,
                                            std::vector<at::opmath_type<scalar_t>>& buf,
                                            std::vector<at::opmath_type<scalar_t>>& tmp) {
  using acc_t = at::opmath_type<scalar_t>;
  if (r.a == nullptr) return load(X + off, n, buf);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    residual_add(r.a + off, r.b + off, r.sum + off, n);
    return r.sum + off;
  } else {
    if (int64_t(buf.size()) < n) buf.resize(n);
    if (int64_t(tmp.size()) < n) tmp.resize(n);
    acc_t* x = buf.data();
    widen(r.a + off, x, n);
    widen(r.b + off, tmp.data(), n);
    residual_add(x, tmp.data(), x, n);
    narrow(x, r.sum + off, n);
    widen(r.sum + off, x, n);
    return x;
  }
}

// dx[0..n) += the gradient that reached the sum directly (GS at element offset off), when
// there is one: added in the math type, before dx is rounded once.
template <typename scalar_t>
void add_grad_sum(const scalar_t* GS, int64_t off, int64_t n, at::opmath_type<scalar_t>* dx,
                  std::vector<at::opmath_type<scalar_t>>& buf) {
  if (GS == nullptr) return;
  residual_add(dx, load(GS + off, n, buf), dx, n);
}

// The backward coefficients of one group of Cg channels (M elements) from its per-channel
// sums, sums(c) -> {sum of d, sum of d * (x - mean)}: grad_bias and grad_weight of the
// channels (DB[c], DW[c], per sample) and, with g = d * weight,
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) = a[c] * d + kx[c] * x + k0[c].
// W, DW, DB, a, kx and k0 point at the group's first channel.
template <typename acc_t, typename Sums>
BITFAST_INLINE void group_bwd_coefficients(Sums&& sums, int64_t Cg, int64_t M, double mean, double r, const acc_t* W,
                                           double* DW, double* DB, acc_t* a, acc_t* kx, acc_t* k0) {
  double sum_g = 0, sum_gx = 0;
  for (int64_t c = 0; c < Cg; ++c) {
    const auto [db, dwx] = sums(c);
    const double dw = dwx * r;
    DB[c] = db;
    DW[c] = dw;
    sum_g += double(W[c]) * db;
    sum_gx += double(W[c]) * dw;
  }
  const double mg = sum_g / double(M), mgx = sum_gx / double(M);
  // kx and k0 are the group's: the same for each of its channels
  const acc_t kxg = acc_t(-r * r * mgx), k0g = acc_t(r * r * mgx * mean - r * mg);
  for (int64_t c = 0; c < Cg; ++c) {
    a[c] = acc_t(r * double(W[c]));
    kx[c] = kxg;
    k0[c] = k0g;
  }
}

// ---------------------------------------------------------------------------------------
// NCHW
// ---------------------------------------------------------------------------------------

template <typename scalar_t>
void fwd_nchw(const scalar_t* X, scalar_t* Y, at::opmath_type<scalar_t>* MEAN, at::opmath_type<scalar_t>* RSTD,
              const at::opmath_type<scalar_t>* W, const at::opmath_type<scalar_t>* B, const Shape& s, double eps,
              bool relu, const Residual<scalar_t>& res) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, s.N * s.G, grain(s.M), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, tbuf, ybuf, sc(s.Cg), sh(s.Cg);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t c0 = (ng % s.G) * s.Cg;
      // the statistics of the group at x (the stored input, or its widened copy) and its
      // scale and shift per channel
      const auto stats = [&](const auto* x) {
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
      };
      if constexpr (direct_rows<scalar_t>) {
        if (res.a == nullptr) {  // bf16 read and written in place
          stats(X + ng * s.M);
          rows::planar_affine(X + ng * s.M, Y + ng * s.M, s.Cg, s.HW, s.HW, sc.data(), sh.data(), relu);
          continue;
        }
      }
      const acc_t* x = load_input(X, res, ng * s.M, s.M, xbuf, tbuf);
      stats(x);
      const int64_t step = stream_rows<scalar_t>(s.HW, s.Cg);
      for (int64_t r0 = 0; r0 < s.Cg; r0 += step) {
        const int64_t nr = std::min(step, s.Cg - r0), o = r0 * s.HW;
        acc_t* y = out_buffer(Y + ng * s.M + o, nr * s.HW, ybuf);
        rows::planar_affine(x + o, y, nr, s.HW, s.HW, sc.data() + r0, sh.data() + r0, relu);
        store(y, Y + ng * s.M + o, nr * s.HW);
      }
    }
  });
}

// DWN, DBN: (N, C) per-sample sums of d * xhat and d, for grad_weight and grad_bias.
// GS: the gradient reaching X directly, added to dx (null: none).
template <typename scalar_t>
void bwd_nchw(const scalar_t* DY, const scalar_t* X, scalar_t* DX, const at::opmath_type<scalar_t>* MEAN,
              const at::opmath_type<scalar_t>* RSTD, const at::opmath_type<scalar_t>* W,
              const at::opmath_type<scalar_t>* B, double* DWN, double* DBN, const Shape& s, bool relu,
              const scalar_t* GS) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, s.N * s.G, grain(2 * s.M), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, dybuf, dxbuf, gsbuf, sc(s.Cg), sh(s.Cg), mv(s.Cg), a(s.Cg), kx(s.Cg), k0(s.Cg);
    std::vector<double> sdy(s.Cg), sdyx(s.Cg);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / s.G, c0 = (ng % s.G) * s.Cg;
      const acc_t mean = MEAN[ng], rstd = RSTD[ng];
      for (int64_t c = 0; c < s.Cg; ++c) {
        sc[c] = rstd * W[c0 + c];
        sh[c] = B[c0 + c] - mean * sc[c];
        mv[c] = mean;
      }
      const auto coefficients = [&] {
        group_bwd_coefficients([&](int64_t c) { return std::pair<double, double>(sdy[c], sdyx[c]); }, s.Cg, s.M,
                               double(mean), double(rstd), W + c0, DWN + n * s.C + c0, DBN + n * s.C + c0, a.data(),
                               kx.data(), k0.data());
      };
      if constexpr (direct_rows<scalar_t>) {
        if (GS == nullptr) {  // bf16 read and written in place
          const scalar_t* x = X + ng * s.M;
          const scalar_t* dy = DY + ng * s.M;
          rows::planar_bwd_sums(dy, x, s.Cg, s.HW, s.HW, sc.data(), sh.data(), mv.data(), relu, sdy.data(),
                                sdyx.data());
          coefficients();
          rows::planar_bwd_dx(dy, x, DX + ng * s.M, s.Cg, s.HW, s.HW, sc.data(), sh.data(), a.data(), kx.data(),
                              k0.data(), relu);
          continue;
        }
      }
      const acc_t* x = load(X + ng * s.M, s.M, xbuf);
      const acc_t* dy = load(DY + ng * s.M, s.M, dybuf);
      rows::planar_bwd_sums(dy, x, s.Cg, s.HW, s.HW, sc.data(), sh.data(), mv.data(), relu, sdy.data(), sdyx.data());
      coefficients();
      const int64_t step = stream_rows<scalar_t>(s.HW, s.Cg);
      for (int64_t r0 = 0; r0 < s.Cg; r0 += step) {
        const int64_t nr = std::min(step, s.Cg - r0), o = r0 * s.HW, off = ng * s.M + o;
        acc_t* dx = out_buffer(DX + off, nr * s.HW, dxbuf);
        rows::planar_bwd_dx(dy + o, x + o, dx, nr, s.HW, s.HW, sc.data() + r0, sh.data() + r0, a.data() + r0,
                            kx.data() + r0, k0.data() + r0, relu);
        add_grad_sum(GS, off, nr * s.HW, dx, gsbuf);
        store(dx, DX + off, nr * s.HW);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// channels_last
// ---------------------------------------------------------------------------------------

// Fixed-order sum of v[0..n) in eight double lanes (two AVX2 vectors: a group of 64
// channels is folded in 8 vector adds instead of a 64-add dependency chain).
BITFAST_INLINE double lanes_total(const double* __restrict v, int64_t n) {
  double p[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) p[j] += v[i + j];
  }
  double t = 0;
  for (; i < n; ++i) t += v[i];
  return (((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))) + t;
}

// The forward statistics of the groups [0, G) of a channel range of one channels_last
// sample (C = G * Cg channels) from its blocks' partial sums: sum[b * ld + c] (block b's
// sum of channel c) and m2[b * ld + c] (its sum of squares about the block's own channel
// mean a = sum / pixels, computed as here). Loops run across the channels, vectorized,
// block after block; each group is then folded from per-channel doubles. Every value
// depends on its own channel or group only, so a range of groups gets the bits it would
// get as part of the whole sample. tc, qc, muc: (C,) scratch.
template <typename T>
BITFAST_INLINE void nhwc_fold_stats_impl(const T* __restrict sum, const T* __restrict m2, int64_t ld, int64_t nblk,
                                         int64_t Rb, int64_t HW, int64_t C, int64_t G, double eps, T* __restrict mean,
                                         T* __restrict rstd, double* __restrict tc, double* __restrict qc,
                                         double* __restrict muc) {
  const int64_t Cg = C / G;
  const double M = double(Cg * HW);
  std::fill(tc, tc + C, 0.0);
  for (int64_t b = 0; b < nblk; ++b) {
    const T* __restrict sb = sum + b * ld;
    for (int64_t c = 0; c < C; ++c) tc[c] += double(sb[c]);
  }
  for (int64_t g = 0; g < G; ++g) {
    // 0 / 0 = NaN for an empty group, as the reference's mean of nothing.
    const double mu = lanes_total(tc + g * Cg, Cg) / M;
    std::fill(muc + g * Cg, muc + (g + 1) * Cg, mu);
  }
  // sum of (x - mu)^2 from each block's sum of squares about its own mean a:
  // m2 + 2 (a - mu)(S - n a) + n (a - mu)^2, exact whatever a was rounded to.
  std::fill(qc, qc + C, 0.0);
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t np = std::min(Rb, HW - b * Rb);
    const T npt = T(np);
    const double npd = double(np);
    const T* __restrict sb = sum + b * ld;
    const T* __restrict mb = m2 + b * ld;
    for (int64_t c = 0; c < C; ++c) {
      const T st = sb[c];
      const double a = double(st / npt), d = a - muc[c];
      qc[c] += double(mb[c]) + 2.0 * d * (double(st) - npd * a) + npd * d * d;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const double q = lanes_total(qc + g * Cg, Cg);
    mean[g] = T(muc[g * Cg]);
    rstd[g] = T(1.0 / std::sqrt(q / M + eps));
  }
}

BITFAST_TARGET_CLONES void nhwc_fold_stats(const float* sum, const float* m2, int64_t ld, int64_t nblk, int64_t Rb,
                                           int64_t HW, int64_t C, int64_t G, double eps, float* mean, float* rstd,
                                           double* tc, double* qc, double* muc) {
  nhwc_fold_stats_impl(sum, m2, ld, nblk, Rb, HW, C, G, eps, mean, rstd, tc, qc, muc);
}

BITFAST_TARGET_CLONES void nhwc_fold_stats(const double* sum, const double* m2, int64_t ld, int64_t nblk, int64_t Rb,
                                           int64_t HW, int64_t C, int64_t G, double eps, double* mean, double* rstd,
                                           double* tc, double* qc, double* muc) {
  nhwc_fold_stats_impl(sum, m2, ld, nblk, Rb, HW, C, G, eps, mean, rstd, tc, qc, muc);
}

// A block of a channels_last pass: `rows` pixels of sample n starting at element offset
// `off` (the pixel's first channel), channels [c0, c0 + nc) of each (rows C apart), and
// `task`, the block's index among all blocks (n * nblk + block), which owns the partial
// sums at task * C + c0.
struct Block {
  int64_t task, n, rows, off, c0, nc;
};

// Runs the channels_last passes of a call in one of three ways; all compute the same
// partial sums per (block, channel) and the same fixed-order combinations, so the results
// are bitwise identical whichever runs (and whatever the thread count):
//
//  * at least as many samples as threads: a task is a whole sample; its blocks are summed,
//    combined and then written by one thread, so the sample (1 MB for 256 x 32 x 32 fp32)
//    is still in L2 when the last pass reads it again;
//  * fewer samples, several groups: a task is a range of whole groups of one sample, all
//    its pixels: the same three steps on a slice of each pixel's channels, no
//    synchronization between them (a late-stage sample of batch 1 on two threads: half the
//    groups each);
//  * fewer samples, one group: each pass is spread over all blocks of all samples and the
//    combinations run between them.
//
//   prepare(n, c0, nc)      per-channel inputs of sample n's channels [c0, c0 + nc), before
//                           the first sums of those channels
//   sums(block)             fills the partial sums of one block's channels
//   combine(n, g0, g1)      turns sample n's partial sums of groups [g0, g1) into coefficients
//   write(block)            writes the output of one block's channels
// The prepare step of a pass without per-channel inputs (the forward).
struct NoPrepare {
  void operator()(int64_t, int64_t, int64_t) const {}
};

template <typename Prepare, typename Sums, typename Combine, typename Write>
void nhwc_passes(const Shape& s, Prepare&& prepare, Sums&& sums, Combine&& combine, Write&& write) {
  const int64_t threads = at::get_num_threads();
  auto blocks = [&](int64_t n, int64_t c0, int64_t nc, auto&& f) {
    for (int64_t b = 0; b < s.nblk; ++b) {
      const int64_t p0 = b * s.Rb;
      f(Block{n * s.nblk + b, n, std::min(s.Rb, s.HW - p0), (n * s.HW + p0) * s.C, c0, nc});
    }
  };
  if (s.N >= threads) {
    at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        prepare(n, int64_t(0), s.C);
        blocks(n, 0, s.C, sums);
        combine(n, 0, s.G);
        blocks(n, 0, s.C, write);
      }
    });
    return;
  }
  if (s.G > 1) {
    const int64_t parts = std::min(s.G, (threads + s.N - 1) / s.N);
    const int64_t per = (s.G + parts - 1) / parts;
    at::parallel_for(0, s.N * parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / parts, g0 = (t % parts) * per, g1 = std::min(s.G, g0 + per);
        if (g0 >= g1) continue;
        prepare(n, g0 * s.Cg, (g1 - g0) * s.Cg);
        blocks(n, g0 * s.Cg, (g1 - g0) * s.Cg, sums);
        combine(n, g0, g1);
        blocks(n, g0 * s.Cg, (g1 - g0) * s.Cg, write);
      }
    });
    return;
  }
  auto block = [&](int64_t t, auto&& f) {
    const int64_t n = t / s.nblk, p0 = (t % s.nblk) * s.Rb;
    f(Block{t, n, std::min(s.Rb, s.HW - p0), (n * s.HW + p0) * s.C, 0, s.C});
  };
  if constexpr (!std::is_same_v<std::decay_t<Prepare>, NoPrepare>) {  // no empty parallel region
    at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) prepare(n, int64_t(0), s.C);
    });
  }
  const int64_t g = grain(s.Rb * s.C);
  at::parallel_for(0, s.N * s.nblk, g, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) block(t, sums);
  });
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) combine(n, 0, s.G);
  });
  at::parallel_for(0, s.N * s.nblk, g, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) block(t, write);
  });
}

// Where the loops write R rows of L elements destined for p, rows `stride` apart: p itself
// (*ld = stride) for float32/float64, else buf as contiguous rows (*ld = L; store_rows them).
template <typename scalar_t>
at::opmath_type<scalar_t>* out_rows(scalar_t* p, int64_t R, int64_t L, int64_t stride,
                                    std::vector<at::opmath_type<scalar_t>>& buf, int64_t* ld) {
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    *ld = stride;
    return p;
  } else {
    if (int64_t(buf.size()) < R * L) buf.resize(R * L);
    *ld = L;
    return buf.data();
  }
}

// Small groups of wide channel ranges (BiT's last stage: 64 channels per group at 4x4 or
// 7x7) and small groups of a single sample are taken whole, one (sample, group) per task,
// as in NCHW: a group is HW rows of Cg contiguous channels (rows C apart), small enough for
// L1 (at most 8192 elements over at most 256 rows, float column sums of at most 256
// terms). No per-channel partial sums, no fold across blocks: with few pixels per channel
// that bookkeeping cost as much as the passes over the data. Rows narrower than 64
// channels are slower this way than in the blocks of a whole sample (measured at
// 16x1024x8x8 and 16x512x4x4), except when a single sample leaves nothing else to run in
// parallel (1x768x14x14); a task then takes several such groups (groups_per_task), up to
// 128 channels, L2-resident. The choice depends on the shape only, so results do not
// depend on the thread count.
bool group_major(const Shape& s) {
  return s.Cg >= 16 && s.HW <= 256 && s.Cg * s.HW <= 8192 && (s.Cg >= 64 || s.N == 1);
}

// Groups per task of the group-major path: the fewest consecutive groups (dividing G)
// whose channels fill whole vectors of 32 lanes (the width of the AVX-512 loops that
// convert bf16), else 1. A task of BiT-R101x3's 24-channel groups takes 4 groups, 96
// channels, instead of leaving a third of each row to a vector remainder. Each channel's
// column sums, and so every result, are the same whatever the task's width.
int64_t groups_per_task(const Shape& s) {
  for (int64_t k = 1; k <= s.G && k * s.Cg <= 128; ++k) {
    if (s.G % k == 0 && (k * s.Cg) % 32 == 0) return k;
  }
  return 1;
}

template <typename scalar_t>
void fwd_nhwc_groups(const scalar_t* X, scalar_t* Y, at::opmath_type<scalar_t>* MEAN, at::opmath_type<scalar_t>* RSTD,
                     const at::opmath_type<scalar_t>* W, const at::opmath_type<scalar_t>* B, const Shape& s,
                     double eps, bool relu, const Residual<scalar_t>& res) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* XS = res.a != nullptr ? res.sum : X;
  const int64_t k = groups_per_task(s), Ck = k * s.Cg;  // groups and channels of a task
  at::parallel_for(0, s.N * s.G / k, grain(k * s.M), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, tbuf, ybuf, colsum(Ck), colsq(Ck), mv(Ck), sc(Ck), sh(Ck);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ng0 = task * k, n = ng0 / s.G, c0 = (ng0 % s.G) * s.Cg, off = n * s.HW * s.C + c0;
      if (res.a != nullptr) {
        for (int64_t r = 0; r < s.HW; ++r) load_input(X, res, off + r * s.C, Ck, xbuf, tbuf);
      }
      // bf16 is read in place by the column loops; fp16 is widened into xbuf
      int64_t ld;
      const auto* x = rows_input(XS + off, s.HW, Ck, s.C, xbuf, &ld);
      rows::cols_sum(x, s.HW, Ck, ld, colsum.data());
      for (int64_t j = 0; j < k; ++j) {
        double total = 0;
        for (int64_t c = j * s.Cg; c < (j + 1) * s.Cg; ++c) total += double(colsum[c]);
        // 0 / 0 = NaN for an empty group, as the reference's mean of nothing.
        const acc_t mean = acc_t(total / double(s.M));
        std::fill(mv.begin() + j * s.Cg, mv.begin() + (j + 1) * s.Cg, mean);
      }
      rows::cols_sum_sq_dev(x, s.HW, Ck, ld, mv.data(), colsq.data());
      for (int64_t j = 0; j < k; ++j) {
        double q = 0;
        for (int64_t c = j * s.Cg; c < (j + 1) * s.Cg; ++c) q += double(colsq[c]);
        const acc_t mean = mv[j * s.Cg], rstd = acc_t(1.0 / std::sqrt(q / double(s.M) + eps));
        MEAN[ng0 + j] = mean;
        RSTD[ng0 + j] = rstd;
        for (int64_t c = j * s.Cg; c < (j + 1) * s.Cg; ++c) {
          sc[c] = rstd * W[c0 + c];
          sh[c] = B[c0 + c] - mean * sc[c];
        }
      }
      if constexpr (direct_rows<scalar_t>) {
        rows::cols_affine(x, Y + off, s.HW, Ck, ld, sc.data(), sh.data(), relu);
      } else {
        int64_t ldy;
        acc_t* y = out_rows(Y + off, s.HW, Ck, s.C, ybuf, &ldy);
        rows::cols_affine(x, y, s.HW, Ck, ld, sc.data(), sh.data(), relu);
        store_rows(y, Y + off, s.HW, Ck, s.C);
      }
    }
  });
}

template <typename scalar_t>
void bwd_nhwc_groups(const scalar_t* DY, const scalar_t* X, scalar_t* DX, const at::opmath_type<scalar_t>* MEAN,
                     const at::opmath_type<scalar_t>* RSTD, const at::opmath_type<scalar_t>* W,
                     const at::opmath_type<scalar_t>* B, double* DWN, double* DBN, const Shape& s, bool relu,
                     const scalar_t* GS) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = groups_per_task(s), Ck = k * s.Cg;  // groups and channels of a task
  at::parallel_for(0, s.N * s.G / k, grain(2 * k * s.M), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, dybuf, dxbuf, gsbuf, sc(Ck), sh(Ck), mv(Ck), sdy(Ck), sdyx(Ck), a(Ck), kx(Ck), k0(Ck);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ng0 = task * k, n = ng0 / s.G, c0 = (ng0 % s.G) * s.Cg, off = n * s.HW * s.C + c0;
      for (int64_t j = 0; j < k; ++j) {
        const acc_t mean = MEAN[ng0 + j], rstd = RSTD[ng0 + j];
        for (int64_t c = j * s.Cg; c < (j + 1) * s.Cg; ++c) {
          sc[c] = rstd * W[c0 + c];
          sh[c] = B[c0 + c] - mean * sc[c];
          mv[c] = mean;
        }
      }
      int64_t ld, ld2, ld3;  // equal: rows of the same width and type
      const auto* xs = rows_input(X + off, s.HW, Ck, s.C, xbuf, &ld);
      const auto* dys = rows_input(DY + off, s.HW, Ck, s.C, dybuf, &ld2);
      rows::cols_bwd_sums(dys, xs, s.HW, Ck, ld, sc.data(), sh.data(), mv.data(), relu, sdy.data(), sdyx.data());
      for (int64_t j = 0; j < k; ++j) {
        const int64_t cj = j * s.Cg;
        group_bwd_coefficients(
            [&](int64_t c) { return std::pair<double, double>(sdy[cj + c], sdyx[cj + c]); }, s.Cg, s.M,
            double(MEAN[ng0 + j]), double(RSTD[ng0 + j]), W + c0 + cj, DWN + n * s.C + c0 + cj,
            DBN + n * s.C + c0 + cj, a.data() + cj, kx.data() + cj, k0.data() + cj);
      }
      const acc_t* x;
      const acc_t* dy;
      if constexpr (direct_rows<scalar_t>) {
        if (GS == nullptr) {
          rows::cols_bwd_dx(DY + off, X + off, DX + off, s.HW, Ck, s.C, sc.data(), sh.data(), a.data(), kx.data(),
                            k0.data(), relu);
          continue;
        }
        // with grad_sum, dx is formed in a float buffer, where the gradient is added
        x = load_rows(X + off, s.HW, Ck, s.C, xbuf, &ld);
        dy = load_rows(DY + off, s.HW, Ck, s.C, dybuf, &ld2);
      } else {
        x = xs;
        dy = dys;
      }
      acc_t* dx = out_rows(DX + off, s.HW, Ck, s.C, dxbuf, &ld3);
      rows::cols_bwd_dx(dy, x, dx, s.HW, Ck, ld, sc.data(), sh.data(), a.data(), kx.data(), k0.data(), relu);
      if (GS != nullptr) {
        for (int64_t row = 0; row < s.HW; ++row) add_grad_sum(GS, off + row * s.C, Ck, dx + row * ld, gsbuf);
      }
      store_rows(dx, DX + off, s.HW, Ck, s.C);
    }
  });
}

template <typename scalar_t>
void fwd_nhwc(const scalar_t* X, scalar_t* Y, at::opmath_type<scalar_t>* MEAN, at::opmath_type<scalar_t>* RSTD,
              const at::opmath_type<scalar_t>* W, const at::opmath_type<scalar_t>* B, const Shape& s, double eps,
              bool relu, const Residual<scalar_t>& res) {
  if (group_major(s)) return fwd_nhwc_groups(X, Y, MEAN, RSTD, W, B, s, eps, relu, res);
  using acc_t = at::opmath_type<scalar_t>;
  // With a residual, the sums pass writes the sum block by block and everything reads it.
  const scalar_t* XS = res.a != nullptr ? res.sum : X;
  // per block and channel: the sum, and the sum of squares about the block's own channel
  // mean, both from one read of the block (the second pass hits L1)
  Scratch<acc_t> sum(s.N * s.nblk * s.C), m2(s.N * s.nblk * s.C), sc(s.N * s.C), sh(s.N * s.C);
  auto sums = [&](const Block& k) {
    thread_local std::vector<acc_t> xbuf, tbuf, bmean;
    if (res.a != nullptr) {
      for (int64_t r = 0; r < k.rows; ++r) load_input(X, res, k.off + r * s.C + k.c0, k.nc, xbuf, tbuf);
    }
    int64_t ld;
    const auto* x = rows_input(XS + k.off + k.c0, k.rows, k.nc, s.C, xbuf, &ld);
    acc_t* bs = sum.data() + k.task * s.C + k.c0;
    rows::cols_sum(x, k.rows, k.nc, ld, bs);
    bmean.resize(k.nc);
    for (int64_t c = 0; c < k.nc; ++c) bmean[c] = bs[c] / acc_t(k.rows);
    rows::cols_sum_sq_dev(x, k.rows, k.nc, ld, bmean.data(), m2.data() + k.task * s.C + k.c0);
  };
  auto combine = [&](int64_t n, int64_t g0, int64_t g1) {
    thread_local std::vector<double> scratch;
    const int64_t c0 = g0 * s.Cg, nc = (g1 - g0) * s.Cg, first = n * s.nblk * s.C + c0;
    scratch.resize(3 * nc);
    acc_t* mean = MEAN + n * s.G;
    acc_t* rstd = RSTD + n * s.G;
    nhwc_fold_stats(sum.data() + first, m2.data() + first, s.C, s.nblk, s.Rb, s.HW, nc, g1 - g0, eps, mean + g0,
                    rstd + g0, scratch.data(), scratch.data() + nc, scratch.data() + 2 * nc);
    acc_t* __restrict scn = sc.data() + n * s.C;
    acc_t* __restrict shn = sh.data() + n * s.C;
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t c = g * s.Cg; c < (g + 1) * s.Cg; ++c) {
        scn[c] = rstd[g] * W[c];
        shn[c] = B[c] - mean[g] * scn[c];
      }
    }
  };
  auto write = [&](const Block& k) {
    thread_local std::vector<acc_t> xbuf, ybuf;
    const int64_t step = stream_rows<scalar_t>(k.nc, k.rows), pc = k.n * s.C + k.c0;
    if constexpr (direct_rows<scalar_t>) {
      const int64_t o = k.off + k.c0;
      rows::cols_affine(XS + o, Y + o, k.rows, k.nc, s.C, sc.data() + pc, sh.data() + pc, relu);
      return;
    }
    for (int64_t r0 = 0; r0 < k.rows; r0 += step) {
      const int64_t nr = std::min(step, k.rows - r0), o = k.off + r0 * s.C + k.c0;
      int64_t ldx, ldy;
      const acc_t* x = load_rows(XS + o, nr, k.nc, s.C, xbuf, &ldx);
      acc_t* y = out_rows(Y + o, nr, k.nc, s.C, ybuf, &ldy);
      rows::cols_affine(x, y, nr, k.nc, ldx, sc.data() + pc, sh.data() + pc, relu);
      store_rows(y, Y + o, nr, k.nc, s.C);
    }
  };
  nhwc_passes(s, NoPrepare{}, sums, combine, write);
}

template <typename scalar_t>
void bwd_nhwc(const scalar_t* DY, const scalar_t* X, scalar_t* DX, const at::opmath_type<scalar_t>* MEAN,
              const at::opmath_type<scalar_t>* RSTD, const at::opmath_type<scalar_t>* W,
              const at::opmath_type<scalar_t>* B, double* DWN, double* DBN, const Shape& s, bool relu,
              const scalar_t* GS) {
  if (group_major(s)) return bwd_nhwc_groups(DY, X, DX, MEAN, RSTD, W, B, DWN, DBN, s, relu, GS);
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t NC = s.N * s.C;
  Scratch<acc_t> pdy(s.N * s.nblk * s.C), pdyx(s.N * s.nblk * s.C);
  Scratch<acc_t> sc(NC), sh(NC), meanc(NC), a(NC), kx(NC), k0(NC);
  auto prepare = [&](int64_t n, int64_t c0, int64_t nc) {  // c0 and nc: whole groups
    acc_t* __restrict scn = sc.data() + n * s.C;
    acc_t* __restrict shn = sh.data() + n * s.C;
    acc_t* __restrict mn = meanc.data() + n * s.C;
    for (int64_t g = c0 / s.Cg; g < (c0 + nc) / s.Cg; ++g) {
      const acc_t mean = MEAN[n * s.G + g], rstd = RSTD[n * s.G + g];
      for (int64_t c = g * s.Cg; c < (g + 1) * s.Cg; ++c) {
        scn[c] = rstd * W[c];
        shn[c] = B[c] - mean * scn[c];
        mn[c] = mean;
      }
    }
  };
  auto sums = [&](const Block& k) {
    thread_local std::vector<acc_t> xbuf, dybuf;
    int64_t ld, ld2;  // equal: rows of the same width and type
    const auto* x = rows_input(X + k.off + k.c0, k.rows, k.nc, s.C, xbuf, &ld);
    const auto* dy = rows_input(DY + k.off + k.c0, k.rows, k.nc, s.C, dybuf, &ld2);
    const int64_t pc = k.n * s.C + k.c0;
    rows::cols_bwd_sums(dy, x, k.rows, k.nc, ld, sc.data() + pc, sh.data() + pc, meanc.data() + pc, relu,
                        pdy.data() + k.task * s.C + k.c0, pdyx.data() + k.task * s.C + k.c0);
  };
  auto combine = [&](int64_t n, int64_t g0, int64_t g1) {
    // each channel's partial sums over the sample's blocks, added in block order (from
    // +0, as a running sum), block by block across the channels
    thread_local std::vector<double> tdy, tdyx;
    const int64_t c0 = g0 * s.Cg, nc = (g1 - g0) * s.Cg;
    tdy.assign(nc, 0.0);
    tdyx.assign(nc, 0.0);
    for (int64_t b = 0; b < s.nblk; ++b) {
      const acc_t* __restrict py = pdy.data() + (n * s.nblk + b) * s.C + c0;
      const acc_t* __restrict pyx = pdyx.data() + (n * s.nblk + b) * s.C + c0;
      double* __restrict ty = tdy.data();
      double* __restrict tyx = tdyx.data();
      for (int64_t c = 0; c < nc; ++c) {
        ty[c] += double(py[c]);
        tyx[c] += double(pyx[c]);
      }
    }
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t cg = (g - g0) * s.Cg, o = n * s.C + g * s.Cg;
      auto sums = [&](int64_t c) { return std::pair<double, double>(tdy[cg + c], tdyx[cg + c]); };
      group_bwd_coefficients(sums, s.Cg, s.M, double(MEAN[n * s.G + g]), double(RSTD[n * s.G + g]), W + g * s.Cg,
                             DWN + o, DBN + o, a.data() + o, kx.data() + o, k0.data() + o);
    }
  };
  auto write = [&](const Block& k) {
    // with grad_sum (the residual add's backward) dx goes through a buffer, where it is added
    thread_local std::vector<acc_t> xbuf, dybuf, dxbuf, gsbuf;
    const int64_t pc = k.n * s.C + k.c0, step = stream_rows<scalar_t>(k.nc, k.rows);
    if constexpr (direct_rows<scalar_t>) {
      if (GS == nullptr) {
        const int64_t e = k.off + k.c0;
        rows::cols_bwd_dx(DY + e, X + e, DX + e, k.rows, k.nc, s.C, sc.data() + pc, sh.data() + pc, a.data() + pc,
                          kx.data() + pc, k0.data() + pc, relu);
        return;
      }
    }
    for (int64_t r0 = 0; r0 < k.rows; r0 += step) {
      const int64_t nr = std::min(step, k.rows - r0), e = k.off + r0 * s.C + k.c0;
      int64_t ld, ld2, ld3;  // equal: rows of the same width and type
      const acc_t* x = load_rows(X + e, nr, k.nc, s.C, xbuf, &ld);
      const acc_t* dy = load_rows(DY + e, nr, k.nc, s.C, dybuf, &ld2);
      acc_t* dx = out_rows(DX + e, nr, k.nc, s.C, dxbuf, &ld3);
      rows::cols_bwd_dx(dy, x, dx, nr, k.nc, ld, sc.data() + pc, sh.data() + pc, a.data() + pc, kx.data() + pc,
                        k0.data() + pc, relu);
      if (GS != nullptr) {
        for (int64_t r = 0; r < nr; ++r) add_grad_sum(GS, e + r * s.C, k.nc, dx + r * ld, gsbuf);
      }
      store_rows(dx, DX + e, nr, k.nc, s.C);
    }
  };
  nhwc_passes(s, prepare, sums, combine, write);
}

// grad_weight or grad_bias: the (N, C) per-sample sums added over the samples in order,
// in double, written once in the parameters' dtype.
at::Tensor sum_over_samples(const double* per_sample, int64_t N, int64_t C, at::ScalarType dtype) {
  std::vector<double> total(per_sample, per_sample + C);
  for (int64_t n = 1; n < N; ++n) {
    const double* p = per_sample + n * C;
    for (int64_t c = 0; c < C; ++c) total[c] += p[c];
  }
  at::Tensor out = at::empty({C}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sum_over_samples", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) o[c] = scalar_t(total[c]);
  });
  return out;
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
        w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), s, eps, relu, Residual<scalar_t>{});
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
  Scratch<double> dwn(s.N * s.C), dbn(s.N * s.C);  // every element written by the kernels
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "native_group_norm_relu_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = cl ? bwd_nhwc<scalar_t> : bwd_nchw<scalar_t>;
    run(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
        mc.const_data_ptr<acc_t>(), rc.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
        dwn.data(), dbn.data(), s, relu, nullptr);
  });
  const auto pdtype = weight.has_value() && weight->defined() ? weight->scalar_type() : at::kFloat;
  return {dx, sum_over_samples(dwn.data(), s.N, s.C, pdtype), sum_over_samples(dbn.data(), s.N, s.C, pdtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_relu_add_fwd(
    const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t num_groups, double eps, bool relu) {
  constexpr const char* op = "native_group_norm_relu_add_fwd";
  check_group_norm_relu_add_fwd(a, b, weight, bias, num_groups, c10::DeviceType::CPU);
  const bool cl = is_channels_last(a);
  const auto fmt = format_of(cl);
  const at::Tensor ac = a.contiguous(fmt), bc = b.contiguous(fmt);
  const Shape s = shape_of(a, num_groups);
  const auto acc = stat_dtype(a.scalar_type());
  at::Tensor sum = at::empty(a.sizes(), a.options().memory_format(fmt));
  at::Tensor y = at::empty(a.sizes(), a.options().memory_format(fmt));
  at::Tensor mean = at::empty({s.N, s.G}, a.options().dtype(acc));
  at::Tensor rstd = at::empty({s.N, s.G}, a.options().dtype(acc));
  const at::Tensor w = channel_param(weight, s.C, acc, 1.0), bb = channel_param(bias, s.C, acc, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = cl ? fwd_nhwc<scalar_t> : fwd_nchw<scalar_t>;
    const Residual<scalar_t> res{ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
                                 sum.data_ptr<scalar_t>()};
    run(sum.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
        w.const_data_ptr<acc_t>(), bb.const_data_ptr<acc_t>(), s, eps, relu, res);
  });
  return {sum, y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_relu_add_bwd(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_sum, const at::Tensor& sum,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool relu) {
  constexpr const char* op = "native_group_norm_relu_add_bwd";
  check_group_norm_relu_add_bwd(grad_y, grad_sum, sum, weight, bias, mean, rstd, num_groups, c10::DeviceType::CPU);
  const bool has_gs = grad_sum.has_value() && grad_sum->defined();
  const bool cl = is_channels_last(sum);
  const auto fmt = format_of(cl);
  const at::Tensor xc = sum.contiguous(fmt), gc = grad_y.contiguous(fmt);
  const at::Tensor gsc = has_gs ? grad_sum->contiguous(fmt) : at::Tensor();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const Shape s = shape_of(sum, num_groups);
  const auto acc = stat_dtype(sum.scalar_type());
  at::Tensor dx = at::empty(sum.sizes(), sum.options().memory_format(fmt));
  const at::Tensor w = channel_param(weight, s.C, acc, 1.0), b = channel_param(bias, s.C, acc, 0.0);
  Scratch<double> dwn(s.N * s.C), dbn(s.N * s.C);  // every element written by the kernels
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sum.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = cl ? bwd_nhwc<scalar_t> : bwd_nchw<scalar_t>;
    run(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
        mc.const_data_ptr<acc_t>(), rc.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
        dwn.data(), dbn.data(), s, relu, has_gs ? gsc.const_data_ptr<scalar_t>() : nullptr);
  });
  const auto pdtype = weight.has_value() && weight->defined() ? weight->scalar_type() : at::kFloat;
  return {dx, sum_over_samples(dwn.data(), s.N, s.C, pdtype), sum_over_samples(dbn.data(), s.N, s.C, pdtype)};
}

}  // namespace bitfast::cpu

// The op's CPU kernels, attached to its native schemas (defined in bitfast/ops/group_norm_relu.py).
TORCH_LIBRARY_IMPL(bitfast, CPU, m) {
  m.impl("native_group_norm_relu_fwd", &bitfast::cpu::group_norm_relu_fwd);
  m.impl("native_group_norm_relu_bwd", &bitfast::cpu::group_norm_relu_bwd);
  m.impl("native_group_norm_relu_add_fwd", &bitfast::cpu::group_norm_relu_add_fwd);
  m.impl("native_group_norm_relu_add_bwd", &bitfast::cpu::group_norm_relu_add_bwd);
}
