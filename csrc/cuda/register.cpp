// Attaches bitfast's CUDA kernels to the native op schemas defined in
// bitfast/ops/_library.py. Loading bitfast._C_cuda runs this registration. It lives in a
// .cpp file so the host compiler, not nvcc, digests torch/library.h.
#include "cuda/sgd_momentum.h"
#include "cuda/weight_std.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(bitfast, CUDA, m) {
  m.impl("native_sgd_momentum_", &bitfast::cuda::sgd_momentum_);
  m.impl("native_weight_standardize_fwd", &bitfast::cuda::weight_standardize_fwd);
  m.impl("native_weight_standardize_bwd", &bitfast::cuda::weight_standardize_bwd);
}
