// Argument-check helpers shared by bitfast's native ops (each op's own checks are in
// csrc/ops/<op>.h and call these).
//
// The Python wrappers (bitfast/ops) already validate what users pass; these checks guard
// the native ops themselves, which anyone can call through torch.ops.bitfast.native_*.
// Every message names the op, the argument, what it got and what it expected, so a bad
// call ends in a Python RuntimeError instead of a crash or a silent wrong answer.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace bitfast {

// fp16, bf16, fp32, fp64: the dtypes every bitfast kernel accepts.
inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Statistics are float32, or float64 for float64 inputs (bitfast/ops/reference/common.py).
inline at::ScalarType stat_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_kernel_tensor(const char* op, const char* name, const at::Tensor& t, c10::DeviceType device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().type() == device, op, ": ", name, " is on ", t.device(), "; this kernel serves ",
              c10::DeviceTypeName(device, /*lower_case=*/true), " tensors");
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), op, ": ", name, " has dtype ", t.scalar_type(),
              "; expected Half, BFloat16, Float or Double");
}


// ---------------------------------------------------------------------------------------
// the norms: GroupNorm + ReLU and BatchNorm + ReLU
// ---------------------------------------------------------------------------------------

// An optional per-channel tensor (weight, bias, running statistics): (C,), a kernel dtype,
// on x's device.
inline void check_channel_vector(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                 const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return;
  const int64_t c = x.size(1);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == c, op, ": ", name, " has shape ", t->sizes(), "; expected (", c,
              ",), one value per channel of x");
  TORCH_CHECK(is_kernel_dtype(t->scalar_type()), op, ": ", name, " has dtype ", t->scalar_type(),
              "; expected Half, BFloat16, Float or Double");
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
}

inline void check_nchw(const char* op, const at::Tensor& x, c10::DeviceType device) {
  check_kernel_tensor(op, "x", x, device);
  TORCH_CHECK(x.dim() == 4, op, ": x has ", x.dim(), " dims (shape ", x.sizes(), "); expected (N, C, H, W)");
}

// grad_y: x's shape, dtype and device.
inline void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " has shape ", t.sizes(), " but x has shape ", x.sizes(),
              "; expected equal shapes");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type(), "; expected equal dtypes");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

// Saved statistics: the given shape, the statistics dtype of x, x's device.
inline void check_stat(const char* op, const char* name, const at::Tensor& s, const at::Tensor& x,
                       at::IntArrayRef shape, const char* what) {
  TORCH_CHECK(s.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(s.sizes() == shape, op, ": ", name, " has shape ", s.sizes(), "; expected ", shape, ", ", what);
  const auto sd = stat_dtype(x.scalar_type());
  TORCH_CHECK(s.scalar_type() == sd, op, ": ", name, " has dtype ", s.scalar_type(), "; expected ", sd,
              " (the statistics dtype for ", x.scalar_type(), " inputs)");
  TORCH_CHECK(s.device() == x.device(), op, ": ", name, " is on ", s.device(), " but x is on ", x.device());
}

inline void check_num_groups(const char* op, const at::Tensor& x, int64_t num_groups) {
  TORCH_CHECK(num_groups >= 1, op, ": num_groups is ", num_groups, "; expected >= 1");
  TORCH_CHECK(x.size(1) % num_groups == 0, op, ": x has ", x.size(1), " channels, not divisible by num_groups=",
              num_groups);
}

}  // namespace bitfast
