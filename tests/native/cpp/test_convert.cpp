// C++ unit test of bitfast::cpu::widen/narrow (csrc/cpu/convert.h) against c10's own
// conversions: every one of the 65536 fp16 and bf16 bit patterns widens exactly, and
// floats round to the same fp16/bf16 bits as c10::Half / c10::BFloat16 (ties, overflow,
// subnormals, infinities; NaN stays NaN), at array lengths around the vector widths.
#include "cpu/convert.h"

#include "check.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace {

int fails = 0;

template <typename H>
void check_widen(const char* name) {
  std::vector<H> src(65536);
  for (uint32_t b = 0; b < 65536; ++b) src[b] = H(uint16_t(b), H::from_bits());
  std::vector<float> dst(src.size());
  bitfast::cpu::widen(src.data(), dst.data(), int64_t(src.size()));
  for (uint32_t b = 0; b < 65536; ++b) {
    const float want = float(src[b]);
    const bool same = std::isnan(want) ? std::isnan(dst[b]) : std::memcmp(&want, &dst[b], 4) == 0;
    if (!same && fails++ < 10) std::printf("FAIL widen %s bits 0x%04x: %g, expected %g\n", name, b, dst[b], want);
  }
}

template <typename H>
void check_narrow(const char* name, const std::vector<float>& src) {
  for (int64_t n : {int64_t(src.size()), int64_t(1), int64_t(7), int64_t(8), int64_t(9), int64_t(17), int64_t(33)}) {
    std::vector<H> dst(n);
    bitfast::cpu::narrow(src.data(), dst.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      const H want(src[i]);
      const bool same = std::isnan(float(want)) ? std::isnan(float(dst[i])) : dst[i].x == want.x;
      if (!same && fails++ < 10) {
        std::printf("FAIL narrow %s (n=%lld) %.9g: bits 0x%04x, expected 0x%04x\n", name, static_cast<long long>(n),
                    src[i], dst[i].x, want.x);
      }
    }
  }
}

}  // namespace

int main() {
  check_widen<c10::Half>("fp16");
  check_widen<c10::BFloat16>("bf16");

  std::vector<float> src;
  const float inf = std::numeric_limits<float>::infinity();
  for (float v : {0.f, -0.f, 1.f, -1.f, 65504.f, 65520.f, 70000.f, 3.4e38f, -3.4e38f, inf, -inf, 1e-8f, 6e-8f, 3e-8f,
                  5.9604645e-08f, 1.17549435e-38f, 1e-40f, -1e-45f, std::numeric_limits<float>::quiet_NaN(),
                  -std::numeric_limits<float>::quiet_NaN()}) {
    src.push_back(v);
  }
  // exact ties between two bf16 (and fp16) neighbours, both parities
  for (uint32_t mant : {0x00008000u, 0x00018000u, 0x3f808000u, 0x3f818000u, 0x7f7f8000u}) {
    float f;
    std::memcpy(&f, &mant, 4);
    src.push_back(f);
  }
  // a signalling NaN with a payload that rounding would carry into the exponent
  const uint32_t snan = 0x7f800001u;
  float f;
  std::memcpy(&f, &snan, 4);
  src.push_back(f);
  std::mt19937 rng(0);
  std::uniform_int_distribution<uint32_t> bits;
  std::normal_distribution<float> normal(0.f, 100.f);
  for (int i = 0; i < 100000; ++i) {
    const uint32_t b = bits(rng);
    std::memcpy(&f, &b, 4);
    src.push_back(f);
    src.push_back(normal(rng));
  }
  check_narrow<c10::Half>("fp16", src);
  check_narrow<c10::BFloat16>("bf16", src);
  std::printf("fp16 conversions use F16C: %s\n", bitfast::cpu::has_f16c() ? "yes" : "no");
  bitfast::test::failures() += fails;
  return bitfast::test::finish("test_convert");
}
