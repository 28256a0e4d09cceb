// The native BatchNorm+ReLU ops' argument checks.
//
// Called first by the op's CPU kernels (csrc/cpu/batch_norm_relu.cpp) and by its CUDA registration
// (csrc/cuda/batch_norm_relu_register.cpp), so a bad call of torch.ops.bitfast.native_* ends in a
// RuntimeError naming the op and the argument on either device.
#pragma once

#include "common/checks.h"

#include <ATen/MemoryOverlap.h>

#include <utility>
#include <vector>

namespace bitfast {

inline void check_batch_norm_relu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                                      const std::optional<at::Tensor>& running_var,
                                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                      bool training, c10::DeviceType device) {
  constexpr const char* op = "native_batch_norm_relu_fwd";
  check_nchw(op, x, device);
  check_channel_vector(op, "running_mean", running_mean, x);
  check_channel_vector(op, "running_var", running_var, x);
  check_channel_vector(op, "weight", weight, x);
  check_channel_vector(op, "bias", bias, x);
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(training || (has_rm && has_rv), op,
              ": running_mean and running_var are required when training=False");
}

inline void check_batch_norm_relu_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& mean, const at::Tensor& var, c10::DeviceType device) {
  constexpr const char* op = "native_batch_norm_relu_bwd";
  check_nchw(op, x, device);
  check_like_x(op, "grad_y", grad_y, x);
  check_channel_vector(op, "weight", weight, x);
  check_channel_vector(op, "bias", bias, x);
  const std::vector<int64_t> shape = {x.size(1)};
  check_stat(op, "mean", mean, x, shape, "one value per channel");
  check_stat(op, "var", var, x, shape, "one value per channel");
}

inline void check_batch_norm_update_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                          const at::Tensor& mean, const at::Tensor& var, int64_t count,
                                          c10::DeviceType device) {
  constexpr const char* op = "native_batch_norm_update_stats_";
  check_kernel_tensor(op, "running_mean", running_mean, device);
  TORCH_CHECK(running_mean.dim() == 1, op, ": running_mean has shape ", running_mean.sizes(),
              "; expected (C,)");
  const int64_t c = running_mean.size(0);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"running_var", running_var},
                                {"mean", mean},
                                {"var", var}}) {
    check_kernel_tensor(op, name, t, device);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == c, op, ": ", name, " has shape ", t.sizes(), "; expected (", c,
                ",) like running_mean");
    TORCH_CHECK(t.device() == running_mean.device(), op, ": ", name, " is on ", t.device(),
                " but running_mean is on ", running_mean.device());
  }
  TORCH_CHECK(count >= 0, op, ": count is ", count, "; expected the number of elements per channel (>= 0)");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"running_mean", running_mean},
                                {"running_var", running_var}}) {
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
                " has elements that share memory; it cannot be updated in place");
  }
}

}  // namespace bitfast
