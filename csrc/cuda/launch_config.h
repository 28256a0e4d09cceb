// Launch settings of bitfast's CUDA kernels that can be changed at run time, without a
// rebuild, so that one GPU session can time several launch configurations of a kernel
// (tools/kernel_sweep.py) and pick one. Every setting is 0 by default, which means "the
// built-in choice": with all settings at 0 every launch is exactly what it was before
// these settings existed (same grids, blocks and vector widths, so the same bits).
//
// Python reads and writes them through two C functions of the extension
// (bitfast._native.cuda_launch_knobs / set_cuda_launch_knob, over ctypes); they are
// process-wide and meant for benchmarks, not for concurrent use.
#pragma once

#include <cstdint>

namespace bitfast::cuda {

enum class Knob : int {
  kGnFwdThreads = 0,     // GroupNorm forward, one block per group in shared memory: threads (64, 128, 256, 512)
  kGnFwdVecBytes,        // ... bytes per load and store: 16, 8 or 1 (one element); 0: 16 where aligned
  kGnSplitTarget,        // GroupNorm partial reductions (backward, two-phase forward): the blocks
                         // (channels_last) or warps (NCHW) the pixel splits aim for (1 ... 2^20)
  kGnPointwiseThreads,   // GroupNorm pointwise passes (dx, two-phase y): threads per block (64, 128, 256)
  kGnPointwiseVectors,   // ... vectors per thread before the grid is capped at 2^16 blocks (1 ... 64)
  kSgdThreads,           // SGD step: threads per block (128, 256, 512, 1024)
  kSgdChunk,             // ... elements per block, a power of two (4096 ... 262144)
  kSgdUnroll,            // ... 16-byte packs each thread loads before computing (1, 2, 4)
  kCount
};

// The current value of a setting (0: the built-in choice).
int64_t launch_knob(Knob k);

}  // namespace bitfast::cuda

extern "C" {
// Sets the setting called `name` (see knob_names in launch_config.cpp) to `value`; 0 restores
// the built-in choice. Returns 0, or -1 for an unknown name, -2 for a value outside its range.
int bitfast_cuda_set_launch_knob(const char* name, int64_t value);
// Writes the value of `name` to *value; returns 0, or -1 for an unknown name.
int bitfast_cuda_get_launch_knob(const char* name, int64_t* value);
// The names of the settings, comma-separated, in Knob order.
const char* bitfast_cuda_launch_knob_names();
}
