// Attaches bitfast's CUDA kernels to the native op schemas defined in
// bitfast/ops/_library.py. Loading bitfast._C_cuda runs this registration. It lives in a
// .cpp file so the host compiler, not nvcc, digests torch/library.h.
//
// Each op's arguments are checked here (common/checks.h), before the launcher in the .cu
// file runs, so the .cu files hold kernels and launches only. The launchers assume checked
// arguments; they keep only the launch-size limits that depend on the kernels' grids.
#include "common/checks.h"
#include "cuda/batch_norm_relu.h"
#include "cuda/group_norm_relu.h"
#include "cuda/sgd_momentum.h"
#include "cuda/weight_std.h"

#include <torch/library.h>

#include <cstdint>
#include <limits>

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

void sgd_momentum_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   bool is_first_step, const std::optional<at::Tensor>& lr_tensor, at::TensorList ema_params,
                   double ema_decay) {
  bitfast::check_sgd_momentum(params, grads, momentum_buffers, momentum, lr_tensor, ema_params, ema_decay, kCUDA);
  bitfast::cuda::sgd_momentum_(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
                               maximize, is_first_step, lr_tensor, ema_params, ema_decay);
}

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
  m.impl("native_batch_norm_relu_fwd", &batch_norm_relu_fwd);
  m.impl("native_batch_norm_relu_bwd", &batch_norm_relu_bwd);
  m.impl("native_batch_norm_update_stats_", &batch_norm_update_stats_);
  m.impl("native_group_norm_relu_fwd", &group_norm_relu_fwd);
  m.impl("native_group_norm_relu_bwd", &group_norm_relu_bwd);
  m.impl("native_group_norm_relu_add_fwd", &group_norm_relu_add_fwd);
  m.impl("native_group_norm_relu_add_bwd", &group_norm_relu_add_bwd);
  m.impl("native_sgd_momentum_", &sgd_momentum_);
  m.impl("native_weight_standardize_fwd", &weight_standardize_fwd);
  m.impl("native_weight_standardize_bwd", &weight_standardize_bwd);
}
