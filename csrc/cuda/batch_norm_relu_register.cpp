// Attaches the CUDA kernels of the BatchNorm+ReLU to its native schemas (defined in
// bitfast/ops/batch_norm_relu.py); loading bitfast._C_cuda runs this registration. A .cpp file, so the
// host compiler, not nvcc, digests torch/library.h.
//
// Each native op checks its arguments here (csrc/ops/batch_norm_relu.h) before the launcher in
// csrc/cuda/batch_norm_relu.cu runs; the launchers assume checked arguments and keep only the
// launch-size limits that depend on their grids.
#include "cuda/batch_norm_relu.h"
#include "ops/batch_norm_relu.h"

#include <torch/library.h>

namespace {

constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_fwd(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& running_mean,
                                                                   const std::optional<at::Tensor>& running_var,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   bool training, double eps, bool relu) {
  bitfast::check_batch_norm_relu_fwd(x, running_mean, running_var, weight, bias, training, kCUDA);
  return bitfast::cuda::batch_norm_relu_fwd(x, running_mean, running_var, weight, bias, training, eps, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const at::Tensor& mean, const at::Tensor& var,
                                                                   bool training, double eps, bool relu) {
  bitfast::check_batch_norm_relu_bwd(grad_y, x, weight, bias, mean, var, kCUDA);
  return bitfast::cuda::batch_norm_relu_bwd(grad_y, x, weight, bias, mean, var, training, eps, relu);
}

void batch_norm_update_stats_(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                              const at::Tensor& var, double momentum, int64_t count) {
  bitfast::check_batch_norm_update_stats(running_mean, running_var, mean, var, count, kCUDA);
  bitfast::cuda::batch_norm_update_stats_(running_mean, running_var, mean, var, momentum, count);
}

}  // namespace

TORCH_LIBRARY_IMPL(bitfast, CUDA, m) {
  m.impl("native_batch_norm_relu_fwd", &batch_norm_relu_fwd);
  m.impl("native_batch_norm_relu_bwd", &batch_norm_relu_bwd);
  m.impl("native_batch_norm_update_stats_", &batch_norm_update_stats_);
}
