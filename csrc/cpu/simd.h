// Compiler help for bitfast's CPU kernels: function multi-versioning and forced inlining.
//
// bitfast._C is built once, for the baseline x86-64 (SSE2) instruction set, so that the same
// binary runs on every machine. The hot loops are plain C++ loops the compiler vectorizes;
// BITFAST_TARGET_CLONES compiles such a function three times, for the baseline, with AVX2
// and with AVX-512F, and the loader picks the widest the CPU has (ATen's own CPU kernels
// use AVX-512 on such CPUs too). (Features, not "arch=haswell": an arch clone is chosen
// only on that very CPU model, not on its successors.) The templates a cloned function
// calls must be BITFAST_INLINE so that they are compiled inside each clone, with its
// instruction set.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define BITFAST_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BITFAST_TARGET_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define BITFAST_INLINE inline __attribute__((always_inline))
#else
#define BITFAST_INLINE inline
#endif
