// The native weight-standardization ops' argument checks.
//
// Called first by the op's CPU kernels (csrc/cpu/weight_std.cpp) and by its CUDA registration
// (csrc/cuda/weight_std_register.cpp), so a bad call of torch.ops.bitfast.native_* ends in a
// RuntimeError naming the op and the argument on either device.
#pragma once

#include "common/checks.h"

#include <utility>

namespace bitfast {

inline void check_weight_standardize_fwd(const at::Tensor& w, c10::DeviceType device) {
  constexpr const char* op = "native_weight_standardize_fwd";
  check_kernel_tensor(op, "w", w, device);
  TORCH_CHECK(w.dim() >= 2, op, ": w has ", w.dim(), " dims (shape ", w.sizes(),
              "); expected (O, ...) with >= 2 dims");
}

inline void check_weight_standardize_bwd(const at::Tensor& grad_out, const at::Tensor& w, const at::Tensor& mean,
                                         const at::Tensor& rstd, c10::DeviceType device) {
  constexpr const char* op = "native_weight_standardize_bwd";
  check_kernel_tensor(op, "w", w, device);
  check_kernel_tensor(op, "grad_out", grad_out, device);
  TORCH_CHECK(w.dim() >= 2, op, ": w has ", w.dim(), " dims (shape ", w.sizes(),
              "); expected (O, ...) with >= 2 dims");
  TORCH_CHECK(grad_out.sizes() == w.sizes(), op, ": grad_out has shape ", grad_out.sizes(), " but w has shape ",
              w.sizes(), "; expected equal shapes");
  TORCH_CHECK(grad_out.scalar_type() == w.scalar_type(), op, ": grad_out has dtype ", grad_out.scalar_type(),
              " but w has dtype ", w.scalar_type(), "; expected equal dtypes");
  TORCH_CHECK(grad_out.device() == w.device(), op, ": grad_out is on ", grad_out.device(), " but w is on ",
              w.device());
  const auto sd = stat_dtype(w.scalar_type());
  const int64_t o = w.size(0);
  for (const auto& [name, s] : {std::pair<const char*, const at::Tensor&>{"mean", mean}, {"rstd", rstd}}) {
    TORCH_CHECK(s.defined(), op, ": ", name, " is an undefined tensor");
    TORCH_CHECK(s.dim() == 1 && s.size(0) == o, op, ": ", name, " has shape ", s.sizes(), "; expected (", o,
                ",), one value per output channel of w");
    TORCH_CHECK(s.scalar_type() == sd, op, ": ", name, " has dtype ", s.scalar_type(), "; expected ", sd,
                " (the statistics dtype for ", w.scalar_type(), " weights)");
    TORCH_CHECK(s.device() == w.device(), op, ": ", name, " is on ", s.device(), " but w is on ", w.device());
  }
}

}  // namespace bitfast
