// The native GroupNorm+ReLU ops' argument checks (with and without the residual add).
//
// Called first by the op's CPU kernels (csrc/cpu/group_norm_relu.cpp) and by its CUDA registration
// (csrc/cuda/group_norm_relu_register.cpp), so a bad call of torch.ops.bitfast.native_* ends in a
// RuntimeError naming the op and the argument on either device.
#pragma once

#include "common/checks.h"

#include <vector>

namespace bitfast {

// The forward arguments of op (GroupNorm+ReLU of x, or of x + b with the residual add).
inline void check_group_norm_fwd_args(const char* op, const at::Tensor& x, const at::Tensor* b,
                                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                      int64_t num_groups, c10::DeviceType device) {
  check_nchw(op, x, device);
  if (b != nullptr) check_like_x(op, "b", *b, x);
  check_num_groups(op, x, num_groups);
  check_channel_vector(op, "weight", weight, x);
  check_channel_vector(op, "bias", bias, x);
}

inline void check_group_norm_relu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias, int64_t num_groups,
                                      c10::DeviceType device) {
  check_group_norm_fwd_args("native_group_norm_relu_fwd", x, nullptr, weight, bias, num_groups, device);
}

// The backward arguments of op (GroupNorm+ReLU, or with the residual add, where x is the
// saved sum and grad_sum the gradient that reached it directly, or none).
inline void check_group_norm_bwd_args(const char* op, const at::Tensor& grad_y, const at::Tensor* grad_sum,
                                      const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                      const at::Tensor& rstd, int64_t num_groups, c10::DeviceType device) {
  check_nchw(op, x, device);
  check_like_x(op, "grad_y", grad_y, x);
  if (grad_sum != nullptr) check_like_x(op, "grad_sum", *grad_sum, x);
  check_num_groups(op, x, num_groups);
  check_channel_vector(op, "weight", weight, x);
  check_channel_vector(op, "bias", bias, x);
  const std::vector<int64_t> shape = {x.size(0), num_groups};
  check_stat(op, "mean", mean, x, shape, "one value per (sample, group)");
  check_stat(op, "rstd", rstd, x, shape, "one value per (sample, group)");
}

inline void check_group_norm_relu_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
                                      c10::DeviceType device) {
  check_group_norm_bwd_args("native_group_norm_relu_bwd", grad_y, nullptr, x, weight, bias, mean, rstd, num_groups,
                            device);
}

inline void check_group_norm_relu_add_fwd(const at::Tensor& a, const at::Tensor& b,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias, int64_t num_groups,
                                          c10::DeviceType device) {
  check_group_norm_fwd_args("native_group_norm_relu_add_fwd", a, &b, weight, bias, num_groups, device);
}

inline void check_group_norm_relu_add_bwd(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_sum,
                                          const at::Tensor& sum, const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                          const at::Tensor& rstd, int64_t num_groups, c10::DeviceType device) {
  const bool has_gs = grad_sum.has_value() && grad_sum->defined();
  check_group_norm_bwd_args("native_group_norm_relu_add_bwd", grad_y, has_gs ? &*grad_sum : nullptr, sum, weight,
                            bias, mean, rstd, num_groups, device);
}

}  // namespace bitfast
