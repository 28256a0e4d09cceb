// See norm_rows.h. Plain loops the compiler vectorizes (OpenMP simd splits the sums into
// vector lanes), each entry point compiled for the baseline and for AVX2 (cpu/simd.h).
// at::vec::Vectorized is not used: inside an extension it is compiled for the baseline
// only (ATen picks its AVX2 and AVX-512 variants at build time of ATen itself), while a
// cloned plain loop gets AVX2 on every machine that has it.
#include "cpu/norm_rows.h"

#include "cpu/convert.h"
#include "cpu/simd.h"

#include <algorithm>
#include <type_traits>

namespace bitfast::cpu::rows {
namespace {

// Storage element -> math type: the identity for float and double, and for bf16 (raw
// bits, so that the loops vectorize) the exact widening. math_to<Out> rounds back.
template <typename T>
BITFAST_INLINE T to_math(T v) {
  return v;
}
BITFAST_INLINE float to_math(uint16_t bf16) { return bf16_bits_to_float(bf16); }

template <typename Out, typename T>
BITFAST_INLINE Out math_to(T v) {
  if constexpr (std::is_same_v<Out, uint16_t>) {
    return float_to_bf16_bits(v);
  } else {
    return v;
  }
}

// Elements summed in float lanes before the partial sum moves to double: 1024 elements in
// 4 streams of 8 lanes = 32 additions per lane, whose rounding error stays far below
// float32's output precision.
constexpr int64_t kSumChunk = 1024;

// sum of f(x[i]) over [0, n), a chunk at a time, the chunks added in double. A chunk is cut
// into four equal streams, each an OpenMP simd reduction with its own vector accumulator,
// so the additions of consecutive vectors do not wait on each other: with one accumulator a
// sum is latency-bound (one vector add every 4 cycles), slower than the affine pass after
// it. The streams are added in a fixed order, then the elements left over.
template <typename T, typename In = T, typename F>
BITFAST_INLINE double lane_sum(const In* __restrict x, int64_t n, F f) {
  double total = 0;
  for (int64_t b = 0; b < n; b += kSumChunk) {
    const int64_t len = std::min(n - b, kSumChunk), q = len / 4;
    const In* __restrict x0 = x + b;
    const In* __restrict x1 = x0 + q;
    const In* __restrict x2 = x1 + q;
    const In* __restrict x3 = x2 + q;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < q; ++i) {
      s0 += f(T(to_math(x0[i])));
      s1 += f(T(to_math(x1[i])));
      s2 += f(T(to_math(x2[i])));
      s3 += f(T(to_math(x3[i])));
    }
    T tail = 0;
    for (int64_t i = 4 * q; i < len; ++i) tail += f(T(to_math(x0[i])));
    total += double(((s0 + s1) + (s2 + s3)) + tail);
  }
  return total;
}

template <typename T, typename In = T>
BITFAST_INLINE double sum_impl(const In* __restrict x, int64_t n) {
  return lane_sum<T>(x, n, [](T v) { return v; });
}

template <typename T, typename In = T>
BITFAST_INLINE double sum_sq_dev_impl(const In* __restrict x, int64_t n, T m) {
  return lane_sum<T>(x, n, [m](T v) { return (v - m) * (v - m); });
}

// The output gradient masked by the forward's ReLU, the mask recomputed with exactly the
// forward's arithmetic (x * s + t > 0) so the two agree on every element. The callers read
// g unconditionally: a select, not a masked load.
template <typename T, bool RELU>
BITFAST_INLINE T relu_grad(T x, T g, T s, T t) {
  return RELU ? (x * s + t > T(0) ? g : T(0)) : g;
}

template <typename T, bool RELU, typename In = T>
BITFAST_INLINE void affine_row(const In* __restrict x, In* __restrict y, int64_t n, T s, T t) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T v = T(to_math(x[i])) * s + t;
    y[i] = math_to<In>(RELU ? (v < T(0) ? T(0) : v) : v);  // keeps NaN, as torch.relu does
  }
}

template <typename T, typename In = T>
BITFAST_INLINE void planar_affine_impl(const In* x, In* y, int64_t R, int64_t L, int64_t stride, const T* s, const T* t,
                                       bool relu) {
  for (int64_t r = 0; r < R; ++r) {
    if (relu) {
      affine_row<T, true, In>(x + r * stride, y + r * stride, L, s[r], t[r]);
    } else {
      affine_row<T, false, In>(x + r * stride, y + r * stride, L, s[r], t[r]);
    }
  }
}

// Pairwise total of the kLanes partial sums of an array (a tree: its additions overlap).
constexpr int kLanes = 16;  // one AVX-512 vector of float

template <typename T>
BITFAST_INLINE T lanes16_total(const T* v) {
  T a[8];
  for (int l = 0; l < 8; ++l) a[l] = v[l] + v[l + 8];
  for (int l = 0; l < 4; ++l) a[l] += a[l + 4];
  return (a[0] + a[2]) + (a[1] + a[3]);
}

// K elements at p in the math type T: p itself when stored as T, else (bf16) widened into
// out. The sums below then run on T alone: a loop mixing 16-bit loads and float math was
// vectorized 256 bits wide (and spilled its accumulators), one on floats 512.
template <typename T, int64_t K, typename In>
BITFAST_INLINE const T* lanes_in(const In* __restrict p, T* __restrict out) {
  if constexpr (std::is_same_v<In, T>) {
    return p;
  } else {
#pragma omp simd
    for (int64_t l = 0; l < K; ++l) out[l] = T(to_math(p[l]));
    return out;
  }
}

// The backward sums of one row: kLanes-wide partial sums in two interleaved sets (four
// independent vector chains), folded by a tree once per chunk. A row of a late BiT stage
// is short (14 x 14 or 7 x 7 pixels), so the fold is a large part of the work: the
// compiler's own epilogue for a simd reduction added the lanes one by one.
template <typename T, bool RELU, typename In = T>
BITFAST_INLINE void bwd_sums_row(const In* __restrict dy, const In* __restrict x, int64_t n, T s, T t, T m,
                                 double* sum_dy, double* sum_dyx) {
  constexpr int64_t W = kLanes;
  double tot_d = 0, tot_dx = 0;
  for (int64_t b = 0; b < n; b += kSumChunk) {
    const int64_t len = std::min(n - b, kSumChunk), full = len / (2 * W) * (2 * W);
    const In* __restrict xb = x + b;
    const In* __restrict gb = dy + b;
    T d0[W] = {}, e0[W] = {}, d1[W] = {}, e1[W] = {};
    for (int64_t i = 0; i < full; i += 2 * W) {
      T xw[2 * W], gw[2 * W];  // bf16 widened first: see lanes_in
      const T* __restrict xp = lanes_in<T, 2 * W>(xb + i, xw);
      const T* __restrict gp = lanes_in<T, 2 * W>(gb + i, gw);
#pragma omp simd
      for (int64_t l = 0; l < W; ++l) {
        const T xa = xp[l], xc = xp[W + l], ga = gp[l], gc = gp[W + l];
        const T da = relu_grad<T, RELU>(xa, ga, s, t);
        const T dc = relu_grad<T, RELU>(xc, gc, s, t);
        d0[l] += da;
        e0[l] += da * (xa - m);
        d1[l] += dc;
        e1[l] += dc * (xc - m);
      }
    }
    int64_t rest = full;
    if (len - rest >= W) {  // one more vector step (a 7x7 row: 32 + 16 + 1)
      T xw[W], gw[W];
      const T* __restrict xp = lanes_in<T, W>(xb + rest, xw);
      const T* __restrict gp = lanes_in<T, W>(gb + rest, gw);
#pragma omp simd
      for (int64_t l = 0; l < W; ++l) {
        const T xa = xp[l], ga = gp[l];
        const T da = relu_grad<T, RELU>(xa, ga, s, t);
        d0[l] += da;
        e0[l] += da * (xa - m);
      }
      rest += W;
    }
    for (int64_t i = rest; i < len; ++i) {  // fewer than W left: one per lane
      const T g = T(to_math(gb[i])), xv = T(to_math(xb[i]));
      const T d = relu_grad<T, RELU>(xv, g, s, t);
      d1[i - rest] += d;
      e1[i - rest] += d * (xv - m);
    }
#pragma omp simd
    for (int64_t l = 0; l < W; ++l) {  // the two sets, lane by lane (a vector add)
      d0[l] += d1[l];
      e0[l] += e1[l];
    }
    tot_d += double(lanes16_total(d0));
    tot_dx += double(lanes16_total(e0));
  }
  *sum_dy = tot_d;
  *sum_dyx = tot_dx;
}

// The backward sums of kLanes rows of at most kShortRow elements at once, one row per
// vector lane (strided loads): no reduction across lanes at all. A row of BiT's last stage
// in NCHW is 16 (4x4) or 49 (7x7) pixels: folding a vector per row cost more than the row.
constexpr int64_t kShortRow = 32;

template <typename T, bool RELU, typename In = T>
BITFAST_INLINE void bwd_sums_rows_across(const In* __restrict dy, const In* __restrict x, int64_t L, int64_t stride,
                                         const T* __restrict s, const T* __restrict t, const T* __restrict m,
                                         double* sum_dy, double* sum_dyx) {
  constexpr int64_t B = kLanes;
  T ad[B] = {}, ax[B] = {};
  for (int64_t i = 0; i < L; ++i) {
#pragma omp simd
    for (int64_t r = 0; r < B; ++r) {
      const T xv = T(to_math(x[r * stride + i])), g = T(to_math(dy[r * stride + i]));
      const T d = relu_grad<T, RELU>(xv, g, s[r], t[r]);
      ad[r] += d;
      ax[r] += d * (xv - m[r]);
    }
  }
  for (int64_t r = 0; r < B; ++r) {
    sum_dy[r] = double(ad[r]);
    sum_dyx[r] = double(ax[r]);
  }
}

template <typename T, typename In = T>
BITFAST_INLINE void planar_bwd_sums_impl(const In* dy, const In* x, int64_t R, int64_t L, int64_t stride, const T* s,
                                         const T* t, const T* m, bool relu, double* sum_dy, double* sum_dyx) {
  int64_t r0 = 0;
  if (L <= kShortRow) {
    for (; r0 + kLanes <= R; r0 += kLanes) {
      const int64_t o = r0 * stride;
      if (relu) {
        bwd_sums_rows_across<T, true, In>(dy + o, x + o, L, stride, s + r0, t + r0, m + r0, sum_dy + r0, sum_dyx + r0);
      } else {
        bwd_sums_rows_across<T, false, In>(dy + o, x + o, L, stride, s + r0, t + r0, m + r0, sum_dy + r0, sum_dyx + r0);
      }
    }
  }
  for (int64_t r = r0; r < R; ++r) {
    if (relu) {
      bwd_sums_row<T, true, In>(dy + r * stride, x + r * stride, L, s[r], t[r], m[r], sum_dy + r, sum_dyx + r);
    } else {
      bwd_sums_row<T, false, In>(dy + r * stride, x + r * stride, L, s[r], t[r], m[r], sum_dy + r, sum_dyx + r);
    }
  }
}

template <typename T, bool RELU, typename In = T>
BITFAST_INLINE void bwd_dx_row(const In* __restrict dy, const In* __restrict x, In* __restrict dx, int64_t n, T s, T t,
                               T a, T kx, T k0) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T g = T(to_math(dy[i])), xv = T(to_math(x[i]));
    const T d = relu_grad<T, RELU>(xv, g, s, t);
    dx[i] = math_to<In>(a * d + kx * xv + k0);
  }
}

template <typename T, typename In = T>
BITFAST_INLINE void planar_bwd_dx_impl(const In* dy, const In* x, In* dx, int64_t R, int64_t L, int64_t stride,
                                       const T* s, const T* t, const T* a, const T* kx, const T* k0, bool relu) {
  for (int64_t r = 0; r < R; ++r) {
    const int64_t o = r * stride;
    if (relu) {
      bwd_dx_row<T, true, In>(dy + o, x + o, dx + o, L, s[r], t[r], a[r], kx[r], k0[r]);
    } else {
      bwd_dx_row<T, false, In>(dy + o, x + o, dx + o, L, s[r], t[r], a[r], kx[r], k0[r]);
    }
  }
}

// The column loops take their data in the storage type In (T, or bf16 bits) and compute in
// T: the same arithmetic on the same values as on a widened copy, so both give the same
// bits.

// Column sums take four rows per update of acc: a quarter of the loads and stores of acc,
// which otherwise bound these loops (acc is re-read and re-written for every row).
template <typename T, typename In = T>
BITFAST_INLINE void cols_sum_impl(const In* __restrict x, int64_t R, int64_t C, int64_t ld, T* __restrict acc) {
  std::fill(acc, acc + C, T(0));
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    const In* __restrict x0 = x + r * ld;
    const In* __restrict x1 = x0 + ld;
    const In* __restrict x2 = x1 + ld;
    const In* __restrict x3 = x2 + ld;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      acc[c] += (T(to_math(x0[c])) + T(to_math(x1[c]))) + (T(to_math(x2[c])) + T(to_math(x3[c])));
    }
  }
  for (; r < R; ++r) {
    const In* __restrict xr = x + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += T(to_math(xr[c]));
  }
}

template <typename T>
BITFAST_INLINE T sq(T v) {
  return v * v;
}

template <typename T, typename In = T>
BITFAST_INLINE void cols_sum_sq_dev_impl(const In* __restrict x, int64_t R, int64_t C, int64_t ld,
                                         const T* __restrict m, T* __restrict acc) {
  std::fill(acc, acc + C, T(0));
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    const In* __restrict x0 = x + r * ld;
    const In* __restrict x1 = x0 + ld;
    const In* __restrict x2 = x1 + ld;
    const In* __restrict x3 = x2 + ld;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T mc = m[c];
      acc[c] += (sq(T(to_math(x0[c])) - mc) + sq(T(to_math(x1[c])) - mc)) +
                (sq(T(to_math(x2[c])) - mc) + sq(T(to_math(x3[c])) - mc));
    }
  }
  for (; r < R; ++r) {
    const In* __restrict xr = x + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += sq(T(to_math(xr[c])) - m[c]);
  }
}

template <typename T, bool RELU, typename In = T>
BITFAST_INLINE void cols_affine_impl(const In* __restrict x, In* __restrict y, int64_t R, int64_t C, int64_t ld,
                                     const T* __restrict s, const T* __restrict t) {
  for (int64_t r = 0; r < R; ++r) {
    const In* __restrict xr = x + r * ld;
    In* __restrict yr = y + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T v = T(to_math(xr[c])) * s[c] + t[c];
      yr[c] = math_to<In>(RELU ? (v < T(0) ? T(0) : v) : v);  // keeps NaN, as torch.relu does
    }
  }
}

template <typename T, bool RELU, typename In = T>
BITFAST_INLINE void cols_bwd_sums_impl(const In* __restrict dy, const In* __restrict x, int64_t R, int64_t C,
                                       int64_t ld, const T* __restrict s, const T* __restrict t,
                                       const T* __restrict m, T* __restrict sum_dy, T* __restrict sum_dyx) {
  std::fill(sum_dy, sum_dy + C, T(0));
  std::fill(sum_dyx, sum_dyx + C, T(0));
  for (int64_t r = 0; r < R; ++r) {
    const In* __restrict dyr = dy + r * ld;
    const In* __restrict xr = x + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T g = T(to_math(dyr[c])), xv = T(to_math(xr[c]));
      const T d = relu_grad<T, RELU>(xv, g, s[c], t[c]);
      sum_dy[c] += d;
      sum_dyx[c] += d * (xv - m[c]);
    }
  }
}

template <typename T, bool RELU, typename In = T>
BITFAST_INLINE void cols_bwd_dx_impl(const In* __restrict dy, const In* __restrict x, In* __restrict dx, int64_t R,
                                     int64_t C, int64_t ld, const T* __restrict s, const T* __restrict t,
                                     const T* __restrict a, const T* __restrict kx, const T* __restrict k0) {
  for (int64_t r = 0; r < R; ++r) {
    const In* __restrict dyr = dy + r * ld;
    const In* __restrict xr = x + r * ld;
    In* __restrict dxr = dx + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T g = T(to_math(dyr[c])), xv = T(to_math(xr[c]));
      const T d = relu_grad<T, RELU>(xv, g, s[c], t[c]);
      dxr[c] = math_to<In>(a[c] * d + kx[c] * xv + k0[c]);
    }
  }
}

}  // namespace

// One cloned entry point per loop and type; the templates above are inlined into each clone.
#define BITFAST_NORM_ROWS(T)                                                                                         \
  BITFAST_TARGET_CLONES double sum(const T* x, int64_t n) { return sum_impl<T>(x, n); }                              \
  BITFAST_TARGET_CLONES double sum_sq_dev(const T* x, int64_t n, T m) { return sum_sq_dev_impl<T>(x, n, m); }        \
  BITFAST_TARGET_CLONES void planar_affine(const T* x, T* y, int64_t R, int64_t L, int64_t stride, const T* s,       \
                                           const T* t, bool relu) {                                                  \
    planar_affine_impl<T>(x, y, R, L, stride, s, t, relu);                                                           \
  }                                                                                                                  \
  BITFAST_TARGET_CLONES void planar_bwd_sums(const T* dy, const T* x, int64_t R, int64_t L, int64_t stride,          \
                                             const T* s, const T* t, const T* m, bool relu, double* sum_dy,          \
                                             double* sum_dyx) {                                                      \
    planar_bwd_sums_impl<T>(dy, x, R, L, stride, s, t, m, relu, sum_dy, sum_dyx);                                    \
  }                                                                                                                  \
  BITFAST_TARGET_CLONES void planar_bwd_dx(const T* dy, const T* x, T* dx, int64_t R, int64_t L, int64_t stride,     \
                                           const T* s, const T* t, const T* a, const T* kx, const T* k0, bool relu) { \
    planar_bwd_dx_impl<T>(dy, x, dx, R, L, stride, s, t, a, kx, k0, relu);                                           \
  }                                                                                                                  \
  BITFAST_TARGET_CLONES void cols_sum(const T* x, int64_t R, int64_t C, int64_t ld, T* acc) {                     \
    cols_sum_impl<T>(x, R, C, ld, acc);                                                                              \
  }                                                                                                                  \
  BITFAST_TARGET_CLONES void cols_sum_sq_dev(const T* x, int64_t R, int64_t C, int64_t ld, const T* m, T* acc) {     \
    cols_sum_sq_dev_impl<T>(x, R, C, ld, m, acc);                                                                    \
  }                                                                                                                  \
  BITFAST_TARGET_CLONES void cols_affine(const T* x, T* y, int64_t R, int64_t C, int64_t ld, const T* s, const T* t, \
                                         bool relu) {                                                                \
    relu ? cols_affine_impl<T, true>(x, y, R, C, ld, s, t) : cols_affine_impl<T, false>(x, y, R, C, ld, s, t);       \
  }                                                                                                                  \
  BITFAST_TARGET_CLONES void cols_bwd_sums(const T* dy, const T* x, int64_t R, int64_t C, int64_t ld, const T* s,    \
                                           const T* t, const T* m, bool relu, T* sum_dy, T* sum_dyx) {               \
    relu ? cols_bwd_sums_impl<T, true>(dy, x, R, C, ld, s, t, m, sum_dy, sum_dyx)                                    \
         : cols_bwd_sums_impl<T, false>(dy, x, R, C, ld, s, t, m, sum_dy, sum_dyx);                                  \
  }                                                                                                                  \
  BITFAST_TARGET_CLONES void cols_bwd_dx(const T* dy, const T* x, T* dx, int64_t R, int64_t C, int64_t ld,           \
                                         const T* s, const T* t, const T* a, const T* kx, const T* k0, bool relu) {  \
    relu ? cols_bwd_dx_impl<T, true>(dy, x, dx, R, C, ld, s, t, a, kx, k0)                                           \
         : cols_bwd_dx_impl<T, false>(dy, x, dx, R, C, ld, s, t, a, kx, k0);                                         \
  }

BITFAST_NORM_ROWS(float)
BITFAST_NORM_ROWS(double)

#undef BITFAST_NORM_ROWS

// The column loops on bf16 storage, computing in float (see norm_rows.h).
namespace {
BITFAST_INLINE const uint16_t* bits(const c10::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }
BITFAST_INLINE uint16_t* bits(c10::BFloat16* p) { return reinterpret_cast<uint16_t*>(p); }
}  // namespace

BITFAST_TARGET_CLONES void cols_sum(const c10::BFloat16* x, int64_t R, int64_t C, int64_t ld, float* acc) {
  cols_sum_impl<float, uint16_t>(bits(x), R, C, ld, acc);
}

BITFAST_TARGET_CLONES void cols_sum_sq_dev(const c10::BFloat16* x, int64_t R, int64_t C, int64_t ld, const float* m,
                                           float* acc) {
  cols_sum_sq_dev_impl<float, uint16_t>(bits(x), R, C, ld, m, acc);
}

BITFAST_TARGET_CLONES void cols_affine(const c10::BFloat16* x, c10::BFloat16* y, int64_t R, int64_t C, int64_t ld,
                                       const float* s, const float* t, bool relu) {
  relu ? cols_affine_impl<float, true, uint16_t>(bits(x), bits(y), R, C, ld, s, t)
       : cols_affine_impl<float, false, uint16_t>(bits(x), bits(y), R, C, ld, s, t);
}

BITFAST_TARGET_CLONES void cols_bwd_sums(const c10::BFloat16* dy, const c10::BFloat16* x, int64_t R, int64_t C,
                                         int64_t ld, const float* s, const float* t, const float* m, bool relu,
                                         float* sum_dy, float* sum_dyx) {
  relu ? cols_bwd_sums_impl<float, true, uint16_t>(bits(dy), bits(x), R, C, ld, s, t, m, sum_dy, sum_dyx)
       : cols_bwd_sums_impl<float, false, uint16_t>(bits(dy), bits(x), R, C, ld, s, t, m, sum_dy, sum_dyx);
}

BITFAST_TARGET_CLONES double sum(const c10::BFloat16* x, int64_t n) { return sum_impl<float, uint16_t>(bits(x), n); }

BITFAST_TARGET_CLONES double sum_sq_dev(const c10::BFloat16* x, int64_t n, float m) {
  return sum_sq_dev_impl<float, uint16_t>(bits(x), n, m);
}

BITFAST_TARGET_CLONES void planar_affine(const c10::BFloat16* x, c10::BFloat16* y, int64_t R, int64_t L, int64_t stride,
                                         const float* s, const float* t, bool relu) {
  planar_affine_impl<float, uint16_t>(bits(x), bits(y), R, L, stride, s, t, relu);
}

BITFAST_TARGET_CLONES void planar_bwd_sums(const c10::BFloat16* dy, const c10::BFloat16* x, int64_t R, int64_t L,
                                           int64_t stride, const float* s, const float* t, const float* m, bool relu,
                                           double* sum_dy, double* sum_dyx) {
  planar_bwd_sums_impl<float, uint16_t>(bits(dy), bits(x), R, L, stride, s, t, m, relu, sum_dy, sum_dyx);
}

BITFAST_TARGET_CLONES void planar_bwd_dx(const c10::BFloat16* dy, const c10::BFloat16* x, c10::BFloat16* dx, int64_t R,
                                         int64_t L, int64_t stride, const float* s, const float* t, const float* a,
                                         const float* kx, const float* k0, bool relu) {
  planar_bwd_dx_impl<float, uint16_t>(bits(dy), bits(x), bits(dx), R, L, stride, s, t, a, kx, k0, relu);
}

BITFAST_TARGET_CLONES void cols_bwd_dx(const c10::BFloat16* dy, const c10::BFloat16* x, c10::BFloat16* dx, int64_t R,
                                       int64_t C, int64_t ld, const float* s, const float* t, const float* a,
                                       const float* kx, const float* k0, bool relu) {
  relu ? cols_bwd_dx_impl<float, true, uint16_t>(bits(dy), bits(x), bits(dx), R, C, ld, s, t, a, kx, k0)
       : cols_bwd_dx_impl<float, false, uint16_t>(bits(dy), bits(x), bits(dx), R, C, ld, s, t, a, kx, k0);
}

}  // namespace bitfast::cpu::rows
