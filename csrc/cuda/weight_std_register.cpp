// Attaches the CUDA kernels of the weight standardization to its native schemas (defined in
// bitfast/ops/weight_std.py); loading bitfast._C_cuda runs this registration. A .cpp file, so the
// host compiler, not nvcc, digests torch/library.h.
//
// Each native op checks its arguments here (csrc/ops/weight_std.h) before the launcher in
// csrc/cuda/weight_std.cu runs; the launchers assume checked arguments and keep only the
// launch-size limits that depend on their grids.
#include "cuda/weight_std.h"
#include "ops/weight_std.h"

#include <torch/library.h>

#include <cstdint>
#include <limits>

namespace {

constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;

// One block per output channel: at most 2^31 - 1 of them.
void check_rows(const char* op, const at::Tensor& w) {
  TORCH_CHECK(w.size(0) <= std::numeric_limits<int32_t>::max(), op, ": w has ", w.size(0),
              " output channels; this kernel launches one block per channel, at most 2^31 - 1");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_standardize_fwd(const at::Tensor& w, double eps) {
  bitfast::check_weight_standardize_fwd(w, kCUDA);
  check_rows("native_weight_standardize_fwd", w);
  return bitfast::cuda::weight_standardize_fwd(w, eps);
}

at::Tensor weight_standardize_bwd(const at::Tensor& grad_out, const at::Tensor& w, const at::Tensor& mean,
                                  const at::Tensor& rstd) {
  bitfast::check_weight_standardize_bwd(grad_out, w, mean, rstd, kCUDA);
  check_rows("native_weight_standardize_bwd", w);
  return bitfast::cuda::weight_standardize_bwd(grad_out, w, mean, rstd);
}

}  // namespace

TORCH_LIBRARY_IMPL(bitfast, CUDA, m) {
  m.impl("native_weight_standardize_fwd", &weight_standardize_fwd);
  m.impl("native_weight_standardize_bwd", &weight_standardize_bwd);
}
