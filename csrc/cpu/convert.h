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

namespace bitfast::cpu {

void widen(const c10::BFloat16* src, float* dst, int64_t n);
void widen(const c10::Half* src, float* dst, int64_t n);
void narrow(const float* src, c10::BFloat16* dst, int64_t n);
void narrow(const float* src, c10::Half* dst, int64_t n);

// Whether fp16 conversions use the F16C instructions on this machine.
bool has_f16c();

}  // namespace bitfast::cpu
