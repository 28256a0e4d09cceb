// See convert.h.
#include "cpu/convert.h"

#include "cpu/simd.h"

#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define BITFAST_HAVE_F16C_PATH 1
#endif

namespace bitfast::cpu {
namespace {

#ifdef BITFAST_HAVE_F16C_PATH
// Eight elements per instruction; the target attribute enables F16C for these functions
// only, so the rest of the library stays baseline x86-64.
__attribute__((target("avx,f16c"))) void widen_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

__attribute__((target("avx,f16c"))) void narrow_f16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

const bool kF16C = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
#else
const bool kF16C = false;
#endif

}  // namespace

bool has_f16c() { return kF16C; }

// On raw bits: element-wise stores of c10::BFloat16 objects keep the loop from vectorizing.
BITFAST_TARGET_CLONES void widen(const c10::BFloat16* src, float* dst, int64_t n) {
  const auto* __restrict bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(bits[i]);
}

BITFAST_TARGET_CLONES void narrow(const float* src, c10::BFloat16* dst, int64_t n) {
  auto* __restrict bits = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) bits[i] = float_to_bf16_bits(src[i]);
}

void widen(const c10::Half* src, float* dst, int64_t n) {
#ifdef BITFAST_HAVE_F16C_PATH
  if (kF16C) return widen_f16c(reinterpret_cast<const uint16_t*>(src), dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = float(src[i]);
}

void narrow(const float* src, c10::Half* dst, int64_t n) {
#ifdef BITFAST_HAVE_F16C_PATH
  if (kF16C) return narrow_f16c(src, reinterpret_cast<uint16_t*>(dst), n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

}  // namespace bitfast::cpu
