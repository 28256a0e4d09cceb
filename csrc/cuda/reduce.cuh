// Block-wide sums shared by bitfast's CUDA kernels.
#pragma once

namespace bitfast::cuda {

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The sum of v over the block, returned to every thread. blockDim.x must be a multiple of
// 32 (full warps, for the shuffles); smem holds 32 values. Every thread adds the per-warp
// partials in the same order, so all threads see the same, deterministic result. The
// leading barrier lets callers reuse smem for consecutive sums.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  v = warp_sum(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  T total = T(0);
  const int warps = blockDim.x >> 5;
  for (int i = 0; i < warps; ++i) total += smem[i];
  return total;
}

}  // namespace bitfast::cuda
