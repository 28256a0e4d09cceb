// Compiler help for bitfast's CPU kernels: function multi-versioning and forced inlining.
//
// bitfast._C is built once, for the baseline x86-64 (SSE2) instruction set, so that the same
// binary runs on every machine. The hot loops are plain C++ loops the compiler vectorizes;
// BITFAST_TARGET_CLONES compiles such a function three times, for the baseline, with AVX2
// and for the x86-64-v4 level (AVX-512 F, BW, DQ, VL, CD: every AVX-512 server CPU since
// 2017), and the loader picks the widest the CPU has (ATen's own CPU kernels use AVX-512
// on such CPUs too). AVX-512F alone left the loops that convert bf16 (16-bit lanes) at
// 256 bits; with BW they run 512 bits wide (GroupNorm bf16 1.4-2x faster in channels_last,
// measured on a 2-core Sapphire Rapids). (Features or ISA levels, not "arch=haswell": a
// CPU-model clone is chosen only on that very model.) The templates a cloned function
// calls must be BITFAST_INLINE so that they are compiled inside each clone, with its
// instruction set.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
// (ISA levels in target_clones need GCC 12; older compilers get the AVX-512F clone)
#define BITFAST_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define BITFAST_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BITFAST_TARGET_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define BITFAST_INLINE inline __attribute__((always_inline))
#else
#define BITFAST_INLINE inline
#endif
