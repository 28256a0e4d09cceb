// Conversion of fp16/bf16 arrays to and from float32 for bitfast's CPU kernels.
//
// The kernels compute in float32 whatever the storage dtype: a block of fp16/bf16 elements
// is widened into a small float buffer, updated there, and rounded back. These converters
// are the fast part of that: bf16 is bit shifting that the compiler vectorizes; fp16 uses
// the F16C instructions where the CPU has them (every x86-64 CPU since 2013), else c10's
// portable conversion. Rounding is to nearest even, NaN stays NaN, exactly as c10::Half
// and c10::BFloat16 convert.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace bitfast::cpu {

// bf16 bits -> float: exact.
inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// float -> bf16 bits: round to nearest even; any NaN becomes the canonical quiet NaN (as
// c10::BFloat16 does). Written with a signed compare and masks, which vectorize to a few
// cheap instructions.
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t nan = 0u - uint32_t(int32_t(u & 0x7fffffffu) > int32_t(0x7f800000));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return uint16_t((nan & 0x7fc0u) | (~nan & rounded));
}

void widen(const c10::BFloat16* src, float* dst, int64_t n);
void widen(const c10::Half* src, float* dst, int64_t n);
void narrow(const float* src, c10::BFloat16* dst, int64_t n);
void narrow(const float* src, c10::Half* dst, int64_t n);

// Whether fp16 conversions use the F16C instructions on this machine.
bool has_f16c();

}  // namespace bitfast::cpu
