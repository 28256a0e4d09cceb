// See norm_rows.h. Plain loops the compiler vectorizes (OpenMP simd splits the sums into
// vector lanes), each entry point compiled for the baseline and for AVX2 (cpu/simd.h).
// at::vec::Vectorized is not used: inside an extension it is compiled for the baseline
// only (ATen picks its AVX2 and AVX-512 variants at build time of ATen itself), while a
// cloned plain loop gets AVX2 on every machine that has it.
#include "cpu/norm_rows.h"

#include "cpu/convert.h"
#include "cpu/simd.h"

#include <algorithm>
#include <cstdlib>
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

// Pairwise total of the kLanes partial sums of an array (a tree: its additions overlap).
constexpr int kLanes = 16;  // one AVX-512 vector of float

template <typename T>
BITFAST_INLINE T lanes16_total(const T* v) {
  T a[8];
  for (int l = 0; l < 8; ++l) a[l] = v[l] + v[l + 8];
  for (int l = 0; l < 4; ++l) a[l] += a[l + 4];
  return (a[0] + a[2]) + (a[1] + a[3]);
}

// Rows shorter than this are summed together by rows_lane_sum, not one at a time.
constexpr int64_t kShortRowSum = 256;

// sum of f(x) over R rows of L elements, rows `stride` apart. Long rows: each row's
// lane_sum, the rows added in double. Short rows (a BatchNorm channel in NCHW at 4x4 or
// 7x7: N rows of 16 or 49 elements; on CPUs with AVX2, rows of at least kLanes take
// short_rows_lane_sum instead): all rows go into one set of kLanes float lanes,
// element i of a row into lane i % kLanes, folded into double (lanes16_total) once at least
// kSumChunk elements have gone in. Summed row by row, each 16-element row cost a fold of
// four reductions, most of the work (BatchNorm's forward ran at a third of eager's speed).
template <typename T, typename In = T, typename F>
BITFAST_INLINE double rows_lane_sum(const In* __restrict x, int64_t R, int64_t L, int64_t stride, F f) {
  double total = 0;
  if (L >= kShortRowSum) {
    for (int64_t r = 0; r < R; ++r) total += lane_sum<T>(x + r * stride, L, f);
    return total;
  }
  T acc[kLanes] = {};
  int64_t pending = 0;
  for (int64_t r = 0; r < R; ++r) {
    const In* __restrict row = x + r * stride;
    int64_t i = 0;
    for (; i + kLanes <= L; i += kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += f(T(to_math(row[i + l])));
    }
    for (int64_t l = 0; i + l < L; ++l) acc[l] += f(T(to_math(row[i + l])));
    pending += L;
    if (pending >= kSumChunk) {
      total += double(lanes16_total(acc));
      std::fill(acc, acc + kLanes, T(0));
      pending = 0;
    }
  }
  return total + double(lanes16_total(acc));
}

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9)
// GCC/clang vector extensions: generic vectors, lowered to each clone's instruction set.
#define BITFAST_VECTOR_EXT 1
#if !defined(__clang__)
// The helpers below return 32-byte vectors by value; GCC warns that their calling convention
// differs with and without AVX. They are always inlined inside this file: no such call
// crosses a boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef float f8v __attribute__((vector_size(32)));
#if defined(__clang__) || __GNUC__ >= 12
#define BITFAST_SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t i32x8 __attribute__((vector_size(32)));
#define BITFAST_SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, i32x8{__VA_ARGS__})
#endif

// 16 bf16 values (bits) widened exactly into 16 floats, in registers, stored in one piece.
BITFAST_INLINE void widen16(const uint16_t* __restrict p, float* __restrict out) {
  u16x16 h;
  __builtin_memcpy(&h, p, sizeof(h));
  const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  __builtin_memcpy(out, &w, sizeof(w));
}
typedef int32_t i8v __attribute__((vector_size(32)));

// 16 float lanes as two 8-lane vectors: native in the AVX2 and AVX-512 clones (a 16-lane
// generic vector was kept in memory by the AVX2 clone).
struct f16v {
  f8v lo, hi;
};
BITFAST_INLINE f16v operator+(const f16v& a, const f16v& b) { return {a.lo + b.lo, a.hi + b.hi}; }
BITFAST_INLINE f16v operator*(const f16v& a, const f16v& b) { return {a.lo * b.lo, a.hi * b.hi}; }
BITFAST_INLINE f16v operator-(const f16v& a, float b) { return {a.lo - b, a.hi - b}; }
BITFAST_INLINE f16v& operator+=(f16v& a, const f16v& b) { return a = a + b; }

// 16 consecutive elements as floats, in registers (bf16 widened exactly).
BITFAST_INLINE f16v load16(const float* __restrict p) {
  f16v v;
  __builtin_memcpy(&v.lo, p, sizeof(v.lo));
  __builtin_memcpy(&v.hi, p + 8, sizeof(v.hi));
  return v;
}
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
BITFAST_INLINE f8v widen8(const uint16_t* __restrict p) {
  u16x8 h;
  __builtin_memcpy(&h, p, sizeof(h));
  return (f8v)(__builtin_convertvector(h, u32x8) << 16);
}
BITFAST_INLINE f16v load16(const uint16_t* __restrict p) { return {widen8(p), widen8(p + 8)}; }
BITFAST_INLINE void store16(float* __restrict p, const f16v& v) {
  __builtin_memcpy(p, &v.lo, sizeof(v.lo));
  __builtin_memcpy(p + 8, &v.hi, sizeof(v.hi));
}

// relu_grad on 16 lanes: g where x * s + t > 0, else +0 (the same arithmetic and result).
template <bool RELU>
BITFAST_INLINE f8v relu_grad8(const f8v& x, const f8v& g, float s, float t) {
  if constexpr (RELU) {
    const i8v keep = x * s + t > 0.0f;
    return (f8v)((i8v)g & keep);
  } else {
    return g;
  }
}
template <bool RELU>
BITFAST_INLINE f16v relu_grad16(const f16v& x, const f16v& g, float s, float t) {
  return {relu_grad8<RELU>(x.lo, g.lo, s, t), relu_grad8<RELU>(x.hi, g.hi, s, t)};
}

// float -> bf16 bits for 8 lanes, in the low 16 bits of each 32-bit lane:
// float_to_bf16_bits's arithmetic on each (round to nearest even, any NaN the canonical
// quiet NaN).
BITFAST_INLINE u32x8 bf16_bits8(const f8v& f) {
  const u32x8 u = (u32x8)f;
  const u32x8 nan = (u32x8)((i8v)(u & 0x7fffffffu) > int32_t(0x7f800000));
  const u32x8 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (nan & 0x7fc0u) | (~nan & rounded);
}

// 16 consecutive elements of a row as two 8-float vectors, and back. float: elements 0..7
// and 8..15. bf16: the even elements and the odd ones, from one 32-byte load read as eight
// 32-bit words (the even element is a word's low half, the odd one its high half), so that
// widening and narrowing are a shift and a mask per vector, without moving data across
// lanes (the compiler's widening of 8 bf16 into 8 floats took 6 instructions). pos_lo and
// pos_hi: the element each lane holds.
template <typename In>
struct Row16;
template <>
struct Row16<float> {
  static BITFAST_INLINE f16v load(const float* p) { return load16(p); }
  static BITFAST_INLINE void store(float* p, const f16v& v) { store16(p, v); }
  // the lanes in element order
  static BITFAST_INLINE f16v in_order(const f16v& v) { return v; }
  static constexpr i8v pos_lo = {0, 1, 2, 3, 4, 5, 6, 7}, pos_hi = {8, 9, 10, 11, 12, 13, 14, 15};
};
template <>
struct Row16<uint16_t> {
  static BITFAST_INLINE f16v load(const uint16_t* p) {
    u32x8 w;
    __builtin_memcpy(&w, p, sizeof(w));
    return {(f8v)(w << 16), (f8v)(w & 0xffff0000u)};
  }
  static BITFAST_INLINE void store(uint16_t* p, const f16v& v) {
    const u32x8 w = bf16_bits8(v.lo) | (bf16_bits8(v.hi) << 16);
    __builtin_memcpy(p, &w, sizeof(w));
  }
  static BITFAST_INLINE f16v in_order(const f16v& v) {
    return {BITFAST_SHUFFLE8(v.lo, v.hi, 0, 8, 1, 9, 2, 10, 3, 11), BITFAST_SHUFFLE8(v.lo, v.hi, 4, 12, 5, 13, 6, 14, 7, 15)};
  }
  static constexpr i8v pos_lo = {0, 2, 4, 6, 8, 10, 12, 14}, pos_hi = {1, 3, 5, 7, 9, 11, 13, 15};
};

// ---------------------------------------------------------------------------------------
// Short rows, float math: a late stage's 4x4 or 7x7 maps, N rows of a BatchNorm channel or
// Cg rows of a GroupNorm group. A row is taken in whole vectors of kLanes, and when L is
// not a multiple of kLanes, one more vector that ends where the row ends and overlaps the
// last whole one (7x7: 0..15, 16..31, 32..47, then 33..48). Used by a BatchNorm channel's
// statistics (16 <= L < kShortRowSum, float and bf16), whose lanes rows_lane_sum kept in
// memory, each update waiting on the last one's store (most of a BatchNorm forward at 4x4
// and 7x7), by a GroupNorm group's statistics (one row of 16 to kSumChunk elements), and by
// the elementwise passes of bf16 rows (16 <= L < kShortRowElementwise), where the
// compiler's loops spent most of a row in their prologue and scalar epilogue. BatchNorm
// NCHW forward: 1.4-2.2x faster at 16x512x7x7 and 16x2048x4x4 (fp32 and bf16); GroupNorm
// NCHW forward 1.1-1.2x (fp32) at 4x4 and 7x7.
// ---------------------------------------------------------------------------------------

// A choice between two versions of a loop: $name = "1" or "0" when set so, else `otherwise`
// (the tests force each version in a child process).
inline bool env_choice(const char* name, bool otherwise) {
  const char* env = std::getenv(name);
  if (env != nullptr && (env[0] == '0' || env[0] == '1') && env[1] == '\0') return env[0] == '1';
  return otherwise;
}

// Whether the short-row loops below run: on x86 CPUs with AVX2. The baseline clone (CPUs
// without AVX2) would emulate their 256-bit vectors, 2-8x slower than the plain loops, and
// other architectures keep the plain loops, the ones measured there.
// $BITFAST_CPU_SHORT_ROWS_IN_VECTORS=1 or 0 (read once) overrides the choice, so that the
// tests can run both versions on any CPU.
inline bool short_rows_in_vectors() {
#if defined(BITFAST_FORCE_SHORT_ROWS_IN_VECTORS)  // (tools/rows_bench.cpp builds without clones)
  return BITFAST_FORCE_SHORT_ROWS_IN_VECTORS;
#else
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool vectors = env_choice("BITFAST_CPU_SHORT_ROWS_IN_VECTORS", __builtin_cpu_supports("avx2"));
#else
  static const bool vectors = env_choice("BITFAST_CPU_SHORT_ROWS_IN_VECTORS", false);
#endif
  return vectors;
#endif
}

// v (as Row16<In> loaded it) with the lanes of elements below kLanes - rem set to +0: of the
// overlapping last vector of a row, those the whole vectors already counted.
template <typename In>
BITFAST_INLINE f16v last_lanes(const f16v& v, int64_t rem) {
  const int32_t first = int32_t(kLanes - rem);
  return {(f8v)((i8v)v.lo & (Row16<In>::pos_lo >= first)), (f8v)((i8v)v.hi & (Row16<In>::pos_hi >= first))};
}

// rows_lane_sum for short rows in registers: element i < L - L % kLanes of a row goes into
// lane i % kLanes; the overlapping last vector's new elements into the lanes they sit in
// there (lane 1 for element 48 of a 7x7 row). Two sets of lanes, the rows' roles
// alternating, so that consecutive additions do not wait on each other; both are folded
// (lanes16_total of their sum, in element order) into double once at least kSumChunk
// elements have gone in. The same additions in the same order for float and bf16 data.
template <typename In, typename F>
BITFAST_INLINE double short_rows_lane_sum(const In* x, int64_t R, int64_t L, int64_t stride, F f) {
  const int64_t full = L / kLanes * kLanes, rem = L - full;
  double total = 0;
  f16v a = {}, b = {};
  int64_t pending = 0;
  const auto row_into = [&](const In* row, f16v& p, f16v& q) {
    int64_t i = 0;
    for (; i + 2 * kLanes <= full; i += 2 * kLanes) {
      p += f(Row16<In>::load(row + i));
      q += f(Row16<In>::load(row + i + kLanes));
    }
    if (i < full) p += f(Row16<In>::load(row + i));
    if (rem != 0) q += last_lanes<In>(f(Row16<In>::load(row + L - kLanes)), rem);
  };
  const auto fold = [&] {
    alignas(64) float lanes[kLanes];
    Row16<float>::store(lanes, Row16<In>::in_order(a + b));
    total += double(lanes16_total(lanes));
    a = b = f16v{};
    pending = 0;
  };
  for (int64_t r = 0; r < R; ++r) {
    if (r % 2 == 0) {
      row_into(x + r * stride, a, b);
    } else {
      row_into(x + r * stride, b, a);
    }
    pending += L;
    if (pending >= kSumChunk) fold();
  }
  if (pending != 0) fold();
  return total;
}

// y = x * s + t (then the ReLU: max(y, 0), NaN kept) for 16 lanes, as affine_row computes
// each element.
template <bool RELU>
BITFAST_INLINE f8v affine8(const f8v& x, float s, float t) {
  const f8v v = x * s + t;
  if constexpr (RELU) {
    return (f8v)((i8v)v & ~(v < 0.0f));
  } else {
    return v;
  }
}
template <bool RELU>
BITFAST_INLINE f16v affine16(const f16v& x, float s, float t) {
  return {affine8<RELU>(x.lo, s, t), affine8<RELU>(x.hi, s, t)};
}

// The elementwise passes (y, dx) take the short-row loops for bf16 rows of fewer elements
// than this: 1.1-1.5x faster at 4x4 and 7x7 (tools/rows_bench.cpp, AVX-512 clone). The
// compiler's loops run 512 bits wide where these run 256, and measured faster on float rows
// and on bf16 rows from 64 elements (8x8) on (0.75-0.9x at 64 and 196 elements).
constexpr int64_t kShortRowElementwise = 64;

// out[i] = value(i) for a short row of L >= kLanes elements, a vector of kLanes at a time
// (value(i): the elements i..i + kLanes - 1, as Row16<In> holds them). The overlapping
// last vector is computed before anything is stored and stored last, so the row's inputs
// may be out.
template <typename In, typename F>
BITFAST_INLINE void short_row_map(In* out, int64_t L, F value) {
  const int64_t full = L / kLanes * kLanes, o = L - kLanes;
  f16v last = {};
  if (full < L) last = value(o);
  for (int64_t i = 0; i < full; i += kLanes) Row16<In>::store(out + i, value(i));
  if (full < L) Row16<In>::store(out + o, last);
}

// affine_row for a short row.
template <bool RELU, typename In>
BITFAST_INLINE void short_affine_row(const In* x, In* y, int64_t L, float s, float t) {
  short_row_map(y, L, [&](int64_t i) { return affine16<RELU>(Row16<In>::load(x + i), s, t); });
}

// bwd_dx_row for a short row: dx = a * d + kx * x + k0 for 16 lanes, d the output gradient
// masked by the forward's ReLU.
template <bool RELU>
BITFAST_INLINE f16v dx16(const f16v& g, const f16v& x, float s, float t, float a, float kx, float k0) {
  const f16v d = relu_grad16<RELU>(x, g, s, t);
  return {a * d.lo + kx * x.lo + k0, a * d.hi + kx * x.hi + k0};
}
template <bool RELU, typename In>
BITFAST_INLINE void short_dx_row(const In* dy, const In* x, In* dx, int64_t L, float s, float t, float a, float kx,
                                 float k0) {
  short_row_map(dx, L, [&](int64_t i) {
    return dx16<RELU>(Row16<In>::load(dy + i), Row16<In>::load(x + i), s, t, a, kx, k0);
  });
}
#endif

// The two sums of the norms' statistics, as generic functors: each serves the scalar loops
// (T) and the short-row ones (f16v).
BITFAST_INLINE auto identity_of() {
  return [](const auto& v) { return v; };
}
template <typename T>
BITFAST_INLINE auto sq_dev_of(T m) {
  return [m](const auto& v) {
    const auto d = v - m;
    return d * d;
  };
}

// sum of f(x) over one contiguous run (a GroupNorm group in NCHW): runs of at most kSumChunk
// elements as one short row in registers (one fold at the end instead of lane_sum's four
// reductions, each with its own fold: most of the work of a 16-channel group of 4x4).
template <typename T, typename In, typename F>
BITFAST_INLINE double run_sum(const In* __restrict x, int64_t n, F f) {
#ifdef BITFAST_VECTOR_EXT
  if constexpr (std::is_same_v<T, float>) {
    if (n >= kLanes && n <= kSumChunk && short_rows_in_vectors()) return short_rows_lane_sum(x, 1, n, n, f);
  }
#endif
  return lane_sum<T>(x, n, f);
}

// sum of f(x) over R rows of L elements, `stride` apart (a BatchNorm channel in NCHW): rows
// of kLanes to kShortRowSum elements in registers.
template <typename T, typename In, typename F>
BITFAST_INLINE double rows_sum(const In* __restrict x, int64_t R, int64_t L, int64_t stride, F f) {
#ifdef BITFAST_VECTOR_EXT
  if constexpr (std::is_same_v<T, float>) {
    if (L >= kLanes && L < kShortRowSum && short_rows_in_vectors()) return short_rows_lane_sum(x, R, L, stride, f);
  }
#endif
  return rows_lane_sum<T>(x, R, L, stride, f);
}

template <typename T, typename In = T>
BITFAST_INLINE double sum_impl(const In* __restrict x, int64_t n) {
  return run_sum<T>(x, n, identity_of());
}

template <typename T, typename In = T>
BITFAST_INLINE double sum_sq_dev_impl(const In* __restrict x, int64_t n, T m) {
  return run_sum<T>(x, n, sq_dev_of(m));
}

template <typename T, typename In = T>
BITFAST_INLINE double sum_rows_impl(const In* __restrict x, int64_t R, int64_t L, int64_t stride) {
  return rows_sum<T>(x, R, L, stride, identity_of());
}

template <typename T, typename In = T>
BITFAST_INLINE double sum_sq_dev_rows_impl(const In* __restrict x, int64_t R, int64_t L, int64_t stride, T m) {
  return rows_sum<T>(x, R, L, stride, sq_dev_of(m));
}

template <typename T, typename In = T>
BITFAST_INLINE void planar_affine_impl(const In* x, In* y, int64_t R, int64_t L, int64_t stride, const T* s, const T* t,
                                       bool relu) {
#ifdef BITFAST_VECTOR_EXT
  if constexpr (std::is_same_v<T, float> && std::is_same_v<In, uint16_t>) {  // see kShortRowElementwise
    if (L >= kLanes && L < kShortRowElementwise && short_rows_in_vectors()) {
      for (int64_t r = 0; r < R; ++r) {
        if (relu) {
          short_affine_row<true, In>(x + r * stride, y + r * stride, L, s[r], t[r]);
        } else {
          short_affine_row<false, In>(x + r * stride, y + r * stride, L, s[r], t[r]);
        }
      }
      return;
    }
  }
#endif
  for (int64_t r = 0; r < R; ++r) {
    if (relu) {
      affine_row<T, true, In>(x + r * stride, y + r * stride, L, s[r], t[r]);
    } else {
      affine_row<T, false, In>(x + r * stride, y + r * stride, L, s[r], t[r]);
    }
  }
}

// K elements at p in the math type T: p itself when stored as T, else (bf16) widened into
// out. The sums below then run on T alone: a loop mixing 16-bit loads and float math was
// vectorized 256 bits wide (and spilled its accumulators), one on floats 512. A single
// vector is widened in registers and stored whole: written in two 256-bit halves and read
// back 512 bits wide, it stalled the load (no store forwarding across two stores). (For
// two vectors the compiler's own loop measured faster.)
template <typename T, int64_t K, typename In>
BITFAST_INLINE const T* lanes_in(const In* __restrict p, T* __restrict out) {
  if constexpr (std::is_same_v<In, T>) {
    return p;
  } else {
#ifdef BITFAST_VECTOR_EXT
    if constexpr (std::is_same_v<T, float> && std::is_same_v<In, uint16_t> && K == 16) {
      widen16(p, out);
      return out;
    }
#endif
#pragma omp simd
    for (int64_t l = 0; l < K; ++l) out[l] = T(to_math(p[l]));
    return out;
  }
}

// The lane partial sums of the backward over one chunk of a row (at most kSumChunk
// elements): d[l] and e[l], the sums of d and of d * (x - m) over the elements of lane l.
// Accumulated in two interleaved sets (four independent vector chains), added lane by lane
// at the end.
template <typename T, bool RELU, typename In = T>
BITFAST_INLINE void bwd_chunk_lanes(const In* __restrict gb, const In* __restrict xb, int64_t len, T s, T t, T m,
                                    T* __restrict d, T* __restrict e) {
  constexpr int64_t W = kLanes;
  const int64_t full = len / (2 * W) * (2 * W);
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
    const T dv = relu_grad<T, RELU>(xv, g, s, t);
    d1[i - rest] += dv;
    e1[i - rest] += dv * (xv - m);
  }
#pragma omp simd
  for (int64_t l = 0; l < W; ++l) {  // the two sets, lane by lane (a vector add)
    d[l] = d0[l] + d1[l];
    e[l] = e0[l] + e1[l];
  }
}

#ifdef BITFAST_VECTOR_EXT
// bwd_chunk_lanes for float math with its accumulators in vector registers: the same
// operations on each lane in the same order, so the same bits (up to the sign of a zero
// sum). For the AVX2 clone, in which the accumulator arrays of the version above stayed in
// memory, each update a load waiting on a store (4x4 rows of 16 at a time: 1.3x slower than
// before the 16-row blocks, 2x slower than this). The AVX-512 clone keeps the arrays in
// registers and ran them faster, and the baseline clone has no 256-bit registers. So the
// 16-row blocks pick this version on CPUs with AVX2 but not AVX-512, those whose clone is
// the AVX2 one (regs_for_sums); rows longer than a chunk keep the arrays everywhere.
// $BITFAST_CPU_SUMS_IN_REGISTERS=1 or 0 (read once) overrides the choice, so that the tests
// can run both versions on any CPU.
inline bool regs_for_sums() {
#if defined(BITFAST_FORCE_REGS_FOR_SUMS)  // (tools/rows_bench.cpp: one clone's code on another CPU)
  return BITFAST_FORCE_REGS_FOR_SUMS;
#else
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool regs = env_choice("BITFAST_CPU_SUMS_IN_REGISTERS",
                                      __builtin_cpu_supports("avx2") && !__builtin_cpu_supports("avx512bw"));
#else
  static const bool regs = env_choice("BITFAST_CPU_SUMS_IN_REGISTERS", false);
#endif
  return regs;
#endif
}

template <bool RELU, typename In>
BITFAST_INLINE void bwd_chunk_lanes_regs(const In* __restrict gb, const In* __restrict xb, int64_t len, float s,
                                         float t, float m, float* __restrict d, float* __restrict e) {
  constexpr int64_t W = kLanes;
  const int64_t full = len / (2 * W) * (2 * W);
  f16v d0 = {}, e0 = {}, d1 = {}, e1 = {};
  for (int64_t i = 0; i < full; i += 2 * W) {
    const f16v xa = load16(xb + i), xc = load16(xb + i + W), ga = load16(gb + i), gc = load16(gb + i + W);
    const f16v da = relu_grad16<RELU>(xa, ga, s, t), dc = relu_grad16<RELU>(xc, gc, s, t);
    d0 += da;
    e0 += da * (xa - m);
    d1 += dc;
    e1 += dc * (xc - m);
  }
  int64_t rest = full;
  if (len - rest >= W) {
    const f16v xa = load16(xb + rest), ga = load16(gb + rest);
    const f16v da = relu_grad16<RELU>(xa, ga, s, t);
    d0 += da;
    e0 += da * (xa - m);
    rest += W;
  }
  if (rest < len) {  // fewer than W left: one per lane of the second set
    alignas(64) float dt[W] = {}, et[W] = {};
    for (int64_t i = rest; i < len; ++i) {
      const float g = to_math(gb[i]), xv = to_math(xb[i]);
      const float dv = relu_grad<float, RELU>(xv, g, s, t);
      dt[i - rest] = dv;
      et[i - rest] = dv * (xv - m);
    }
    d1 += load16(dt);
    e1 += load16(et);
  }
  store16(d, d0 + d1);
  store16(e, e0 + e1);
}
#endif

// The backward sums of one row, a chunk at a time: each chunk's lanes folded by a tree
// (lanes16_total), the chunks added in double. A row of a late BiT stage is short (14 x 14
// or 7 x 7 pixels), so the fold is a large part of the work: the compiler's own epilogue for
// a simd reduction added the lanes one by one. Rows of at most a chunk are summed 16 at a
// time instead (rows_block_bwd_sums), with the same bits.
template <typename T, bool RELU, typename In = T>
BITFAST_INLINE void bwd_sums_row(const In* __restrict dy, const In* __restrict x, int64_t n, T s, T t, T m,
                                 double* sum_dy, double* sum_dyx) {
  double tot_d = 0, tot_dx = 0;
  for (int64_t b = 0; b < n; b += kSumChunk) {
    alignas(64) T d[kLanes], e[kLanes];
    bwd_chunk_lanes<T, RELU, In>(dy + b, x + b, std::min(n - b, kSumChunk), s, t, m, d, e);
    tot_d += double(lanes16_total(d));
    tot_dx += double(lanes16_total(e));
  }
  *sum_dy = tot_d;
  *sum_dyx = tot_dx;
}

#ifdef BITFAST_VECTOR_EXT
// Rows of at most one chunk are summed 16 at a time and folded together: v[r] holds row
// r's kLanes lane sums, and lanes16_totals(v, out) sets out[r] = lanes16_total(v[r]) for
// r < 16 (the same tree, so the same bits) with vector shuffles, about 4 operations a row
// instead of about 15 (the fold of one row's lanes was most of the work of a 4x4 or 7x7
// row). In 8-float vectors, which the AVX2 and baseline clones handle as well.

BITFAST_INLINE f8v f8_load(const float* p) {
  f8v v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// [a0..a3, b0..b3] + [a4..a7, b4..b7] -> [a0+a4, .., a3+a7, b0+b4, .., b3+b7], and so on for
// pairs, then for single lanes.
BITFAST_INLINE f8v fold_quads(const f8v& a, const f8v& b) {
  return BITFAST_SHUFFLE8(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
         BITFAST_SHUFFLE8(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
}
BITFAST_INLINE f8v fold_pairs(const f8v& a, const f8v& b) {
  return BITFAST_SHUFFLE8(a, b, 0, 1, 4, 5, 8, 9, 12, 13) +
         BITFAST_SHUFFLE8(a, b, 2, 3, 6, 7, 10, 11, 14, 15);
}
BITFAST_INLINE f8v fold_singles(const f8v& a, const f8v& b) {
  return BITFAST_SHUFFLE8(a, b, 0, 2, 4, 6, 8, 10, 12, 14) +
         BITFAST_SHUFFLE8(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
}

BITFAST_INLINE void lanes16_totals(const float (*__restrict v)[kLanes], float* __restrict out) {
  f8v h[16], q[8], p[4];
  for (int r = 0; r < 16; ++r) h[r] = f8_load(v[r]) + f8_load(v[r] + 8);  // lanes l + l + 8
  for (int r = 0; r < 8; ++r) q[r] = fold_quads(h[2 * r], h[2 * r + 1]);  // rows 2r, 2r+1: 4 sums each
  for (int r = 0; r < 4; ++r) p[r] = fold_pairs(q[2 * r], q[2 * r + 1]);  // rows 4r..4r+3: 2 sums each
  const f8v lo = fold_singles(p[0], p[1]), hi = fold_singles(p[2], p[3]);  // rows 0..7, 8..15
  __builtin_memcpy(out, &lo, sizeof(lo));
  __builtin_memcpy(out + 8, &hi, sizeof(hi));
}

// The backward sums of 16 rows of at most kSumChunk elements (rows `stride` apart): what
// bwd_sums_row gives each, bit for bit (up to the sign of a zero sum).
template <bool RELU, typename In>
BITFAST_INLINE void rows_block_bwd_sums(const In* __restrict dy, const In* __restrict x, int64_t L, int64_t stride,
                                        const float* __restrict s, const float* __restrict t,
                                        const float* __restrict m, double* sum_dy, double* sum_dyx) {
  alignas(64) float d[16][kLanes], e[16][kLanes];
  const bool regs = regs_for_sums();
  if (L == kLanes && !regs) {
    // 4x4 maps: one vector per row, whose lanes are the row's lane sums (what the chunk
    // loop gives, adding them to zeros), without its set-up
    for (int64_t r = 0; r < 16; ++r) {
      alignas(64) float xw[kLanes], gw[kLanes];
      const float* __restrict xp = lanes_in<float, kLanes>(x + r * stride, xw);
      const float* __restrict gp = lanes_in<float, kLanes>(dy + r * stride, gw);
      const float sr = s[r], tr = t[r], mr = m[r];
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const float da = relu_grad<float, RELU>(xp[l], gp[l], sr, tr);
        d[r][l] = da;
        e[r][l] = da * (xp[l] - mr);
      }
    }
  } else if (regs) {
    for (int64_t r = 0; r < 16; ++r) {
      bwd_chunk_lanes_regs<RELU, In>(dy + r * stride, x + r * stride, L, s[r], t[r], m[r], d[r], e[r]);
    }
  } else {
    for (int64_t r = 0; r < 16; ++r) {
      bwd_chunk_lanes<float, RELU, In>(dy + r * stride, x + r * stride, L, s[r], t[r], m[r], d[r], e[r]);
    }
  }
  float td[16], te[16];
  lanes16_totals(d, td);
  lanes16_totals(e, te);
  for (int64_t r = 0; r < 16; ++r) {
    sum_dy[r] = double(td[r]);
    sum_dyx[r] = double(te[r]);
  }
}
#endif

template <typename T, typename In = T>
BITFAST_INLINE void planar_bwd_sums_impl(const In* dy, const In* x, int64_t R, int64_t L, int64_t stride, const T* s,
                                         const T* t, const T* m, bool relu, double* sum_dy, double* sum_dyx) {
  int64_t r0 = 0;
#ifdef BITFAST_VECTOR_EXT
  if constexpr (std::is_same_v<T, float>) {
    if (L <= kSumChunk) {
      for (; r0 + 16 <= R; r0 += 16) {
        const int64_t o = r0 * stride;
        if (relu) {
          rows_block_bwd_sums<true, In>(dy + o, x + o, L, stride, s + r0, t + r0, m + r0, sum_dy + r0, sum_dyx + r0);
        } else {
          rows_block_bwd_sums<false, In>(dy + o, x + o, L, stride, s + r0, t + r0, m + r0, sum_dy + r0,
                                         sum_dyx + r0);
        }
      }
    }
  }
#endif
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
#ifdef BITFAST_VECTOR_EXT
  if constexpr (std::is_same_v<T, float> && std::is_same_v<In, uint16_t>) {  // see kShortRowElementwise
    if (L >= kLanes && L < kShortRowElementwise && short_rows_in_vectors()) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t o = r * stride;
        if (relu) {
          short_dx_row<true, In>(dy + o, x + o, dx + o, L, s[r], t[r], a[r], kx[r], k0[r]);
        } else {
          short_dx_row<false, In>(dy + o, x + o, dx + o, L, s[r], t[r], a[r], kx[r], k0[r]);
        }
      }
      return;
    }
  }
#endif
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
  BITFAST_TARGET_CLONES double sum_rows(const T* x, int64_t R, int64_t L, int64_t stride) {                          \
    return sum_rows_impl<T>(x, R, L, stride);                                                                        \
  }                                                                                                                  \
  BITFAST_TARGET_CLONES double sum_sq_dev_rows(const T* x, int64_t R, int64_t L, int64_t stride, T m) {              \
    return sum_sq_dev_rows_impl<T>(x, R, L, stride, m);                                                              \
  }                                                                                                                  \
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

BITFAST_TARGET_CLONES double sum_rows(const c10::BFloat16* x, int64_t R, int64_t L, int64_t stride) {
  return sum_rows_impl<float, uint16_t>(bits(x), R, L, stride);
}
BITFAST_TARGET_CLONES double sum_sq_dev_rows(const c10::BFloat16* x, int64_t R, int64_t L, int64_t stride, float m) {
  return sum_sq_dev_rows_impl<float, uint16_t>(bits(x), R, L, stride, m);
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
