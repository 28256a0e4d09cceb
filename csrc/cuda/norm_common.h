// The passes shared by bitfast's GroupNorm+ReLU and BatchNorm+ReLU CUDA kernels
// (csrc/cuda/group_norm_relu.cu, batch_norm_relu.cu), compiled once in norm_common.cu.
//
// An activation x is (N, C, H, W) in NCHW or channels_last memory, never transposed. Both
// norms reduce per channel over pixels and then apply a per-channel affine map; they differ
// only in how the per-channel partial results are combined (over the channels of a group
// of one sample, or over the samples of one channel) and in whether the coefficients of the
// affine map depend on the sample. So these passes take:
//
//   * per-channel coefficient arrays indexed by k = n * kn + c: kn = C for coefficients per
//     (sample, channel) (GroupNorm), kn = 0 for coefficients per channel (BatchNorm);
//   * partial results indexed by (n, j, c) in an (N, S, C) array: the reduction of channel c
//     over the pixels [j * rps, (j + 1) * rps) of sample n (a "split" of the sample's H * W
//     pixels, so that a few samples with many pixels still make enough blocks).
//
// All launches go to the current stream; every reduction has a fixed order (no atomics).
//
// Final merges: the kernels that combine the partials of one (sample, group) or one channel
// (one thread each, in a fixed order) do so in float64 whatever the math type, then round
// the results to it. A float32 running merge of thousands of partials (12544 for one
// 64-channel group of 112 x 112 pixels in channels_last) lost digits: relative errors of
// 3.5e-6 in the mean and 2.6e-6 in rstd against 1e-7 from PyTorch (H100, 2026-11-26).
#pragma once

#include "common/layout.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace bitfast::cuda {

struct NormShape {
  int64_t N, C, HW;     // samples, channels, pixels per sample
  bool channels_last;   // memory layout of every (N, C, H, W) operand
  int64_t S, rps;       // splits per sample and pixels per split (S * rps >= HW)
};

// The shape of x (in the layout the caller made it contiguous in) and its splits. The
// channels_last reductions below take at most 65535 samples (they check). split_target,
// when not 0, replaces the blocks (channels_last) or warps (NCHW) the splits aim for
// (512 and 4096 by default).
NormShape norm_shape(const at::Tensor& x, bool channels_last, int64_t split_target = 0);

// How a pointwise pass is launched: threads per block (64 ... 256; 0: 256) and vectors per
// thread before the grid is capped at 2^16 blocks (0: 1).
struct PointwiseLaunch {
  int threads = 0;
  int vectors = 0;
};

// Welford partials of every channel over every split: part is (3, N, S, C) in the math type
// (mean, m2, count).
void channel_stats_partials(const at::Tensor& x, const NormShape& s, at::Tensor& part);

// Backward partials: part is (2, N, S, C): the sums of d and of d * (x - mu[k]), where
// d = dy masked by the forward's ReLU (x * sc[k] + sh[k] > 0) when relu.
void channel_bwd_partials(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& sc, const at::Tensor& sh,
                          const at::Tensor& mu, int64_t kn, bool relu, const NormShape& s, at::Tensor& part);

// y = x * sc[k] + sh[k], then max(y, 0) when relu; y is preallocated like x.
void affine_relu(const at::Tensor& x, const at::Tensor& sc, const at::Tensor& sh, int64_t kn, bool relu,
                 const NormShape& s, at::Tensor& y, const PointwiseLaunch& launch = {});

// dx = a[k] * d + kx[k] * x + k0[k] (+ gs), d as in channel_bwd_partials; dx is
// preallocated like x. gs, when defined (laid out like x), is added in the math type before
// dx is rounded: the gradient that reached a residual sum directly.
void bwd_dx(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& sc, const at::Tensor& sh,
            const at::Tensor& a, const at::Tensor& kx, const at::Tensor& k0, int64_t kn, bool relu,
            const NormShape& s, at::Tensor& dx, const at::Tensor& gs = at::Tensor(),
            const PointwiseLaunch& launch = {});

// A per-channel parameter (weight, bias) as a contiguous (C,) tensor of dtype acc, or an
// undefined tensor when absent (the kernels then use 1 or 0).
inline at::Tensor param_as(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() && t->defined() ? t->to(acc).contiguous() : at::Tensor();
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

// Blocks of `threads` threads covering n items (at least one).
inline unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

}  // namespace bitfast::cuda
