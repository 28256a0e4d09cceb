// Device helpers shared by bitfast's CUDA kernels: 16-byte vector access, block-wide sums
// and Welford merges.
//
// Every reduction here combines its terms in a fixed order (shuffle trees, then warps in
// index order): the same inputs and launch shape give the same bits on every run, with no
// atomics.
#pragma once

namespace bitfast::cuda {

// VEC values of T moved as one access (16 bytes for VEC = 16 / sizeof(T)); the address
// must be aligned to the pack's size.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

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

// Running statistics of a set of values (Welford, 1962): their count, mean and sum of
// squared deviations from the mean (m2). The empty set is {0, 0, 0}.
template <typename T>
struct Welford {
  T mean;
  T m2;
  T count;
};

// Adds one value (Welford's update). inv_count is 1 / (count + 1), passed in so that a
// thread updating several channels with the same count divides once.
template <typename T>
__device__ __forceinline__ void welford_add(T& mean, T& m2, T x, T inv_count) {
  const T d = x - mean;
  mean += d * inv_count;
  m2 += d * (x - mean);
}

// The statistics of the union of two disjoint sets (Chan, Golub & LeVeque, 1979): exact
// whatever the sizes, with no E[x^2] - E[x]^2 cancellation. Empty sets merge to the other.
template <typename T>
__device__ __forceinline__ Welford<T> welford_merge(const Welford<T>& a, const Welford<T>& b) {
  const T n = a.count + b.count;
  if (n == T(0)) return a;
  const T d = b.mean - a.mean;
  const T fb = b.count / n;
  return {a.mean + d * fb, a.m2 + b.m2 + d * d * a.count * fb, n};
}

// The merge of w over the warp, valid in lane 0 (a fixed tree: deterministic).
template <typename T>
__device__ __forceinline__ Welford<T> warp_welford(Welford<T> w) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Welford<T> o{__shfl_down_sync(0xffffffffu, w.mean, offset), __shfl_down_sync(0xffffffffu, w.m2, offset),
                       __shfl_down_sync(0xffffffffu, w.count, offset)};
    w = welford_merge(w, o);
  }
  return w;
}

// 1 / sqrt(x) in the math type.
__device__ __forceinline__ float inv_sqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double inv_sqrt(double x) { return rsqrt(x); }

}  // namespace bitfast::cuda
