// Attaches the CUDA kernels of the GroupNorm+ReLU (with and without the residual add) to its native schemas (defined in
// bitfast/ops/group_norm_relu.py); loading bitfast._C_cuda runs this registration. A .cpp file, so the
// host compiler, not nvcc, digests torch/library.h.
//
// Each native op checks its arguments here (csrc/ops/group_norm_relu.h) before the launcher in
// csrc/cuda/group_norm_relu.cu runs; the launchers assume checked arguments and keep only the
// launch-size limits that depend on their grids.
#include "cuda/group_norm_relu.h"
#include "ops/group_norm_relu.h"

#include <torch/library.h>

namespace {

constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_relu_fwd(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   int64_t num_groups, double eps, bool relu) {
  bitfast::check_group_norm_relu_fwd(x, weight, bias, num_groups, kCUDA);
  return bitfast::cuda::group_norm_relu_fwd(x, weight, bias, num_groups, eps, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_relu_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   int64_t num_groups, bool relu) {
  bitfast::check_group_norm_relu_bwd(grad_y, x, weight, bias, mean, rstd, num_groups, kCUDA);
  return bitfast::cuda::group_norm_relu_bwd(grad_y, x, weight, bias, mean, rstd, num_groups, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_relu_add_fwd(
    const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t num_groups, double eps, bool relu) {
  bitfast::check_group_norm_relu_add_fwd(a, b, weight, bias, num_groups, kCUDA);
  return bitfast::cuda::group_norm_relu_add_fwd(a, b, weight, bias, num_groups, eps, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_relu_add_bwd(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_sum, const at::Tensor& sum,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool relu) {
  bitfast::check_group_norm_relu_add_bwd(grad_y, grad_sum, sum, weight, bias, mean, rstd, num_groups, kCUDA);
  return bitfast::cuda::group_norm_relu_add_bwd(grad_y, grad_sum, sum, weight, bias, mean, rstd, num_groups, relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(bitfast, CUDA, m) {
  m.impl("native_group_norm_relu_fwd", &group_norm_relu_fwd);
  m.impl("native_group_norm_relu_bwd", &group_norm_relu_bwd);
  m.impl("native_group_norm_relu_add_fwd", &group_norm_relu_add_fwd);
  m.impl("native_group_norm_relu_add_bwd", &group_norm_relu_add_bwd);
}
