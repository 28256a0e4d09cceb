// Attaches bitfast's CUDA kernels to the native op schemas defined in
// bitfast/ops/_library.py. Loading bitfast._C_cuda runs this registration. It lives in a
// .cpp file so the host compiler, not nvcc, digests torch/library.h.
#include "cuda/batch_norm_relu.h"
#include "cuda/group_norm_relu.h"
#include "cuda/sgd_momentum.h"
#include "cuda/weight_std.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(bitfast, CUDA, m) {
  m.impl("native_batch_norm_relu_fwd", &bitfast::cuda::batch_norm_relu_fwd);
  m.impl("native_batch_norm_relu_bwd", &bitfast::cuda::batch_norm_relu_bwd);
  m.impl("native_batch_norm_update_stats_", &bitfast::cuda::batch_norm_update_stats_);
  m.impl("native_group_norm_relu_fwd", &bitfast::cuda::group_norm_relu_fwd);
  m.impl("native_group_norm_relu_bwd", &bitfast::cuda::group_norm_relu_bwd);
  m.impl("native_sgd_momentum_", &bitfast::cuda::sgd_momentum_);
  m.impl("native_weight_standardize_fwd", &bitfast::cuda::weight_standardize_fwd);
  m.impl("native_weight_standardize_bwd", &bitfast::cuda::weight_standardize_bwd);
}
