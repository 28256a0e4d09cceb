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

// The multi-tensor op: every weight checked as above, all of one dtype and device.
inline void check_weight_standardize_multi_fwd(at::TensorList ws, c10::DeviceType device,
                                               std::optional<at::ScalarType> out_dtype = std::nullopt) {
  constexpr const char* op = "native_weight_standardize_multi_fwd";
  TORCH_CHECK(!ws.empty(), op, ": ws is an empty list; expected at least one weight");
  TORCH_CHECK(!out_dtype.has_value() || at::isFloatingType(*out_dtype), op, ": out_dtype is ",
              out_dtype.value_or(at::kFloat), "; expected a floating dtype");
  for (size_t i = 0; i < ws.size(); ++i) {
    check_kernel_tensor(op, "ws[i]", ws[i], device);
    TORCH_CHECK(ws[i].dim() >= 2, op, ": ws[", i, "] has ", ws[i].dim(), " dims (shape ", ws[i].sizes(),
                "); expected (O, ...) with >= 2 dims");
    TORCH_CHECK(ws[i].scalar_type() == ws[0].scalar_type(), op, ": ws[", i, "] has dtype ", ws[i].scalar_type(),
                " but ws[0] has ", ws[0].scalar_type(), "; expected one dtype");
    TORCH_CHECK(ws[i].device() == ws[0].device(), op, ": ws[", i, "] is on ", ws[i].device(), " but ws[0] is on ",
                ws[0].device());
  }
}

inline void check_weight_standardize_multi_bwd(at::TensorList grad_outs, at::TensorList ws, const at::Tensor& mean,
                                               const at::Tensor& rstd, c10::DeviceType device) {
  constexpr const char* op = "native_weight_standardize_multi_bwd";
  check_weight_standardize_multi_fwd(ws, device);
  TORCH_CHECK(grad_outs.size() == ws.size(), op, ": ", grad_outs.size(), " grad_outs for ", ws.size(),
              " weights; expected one each");
  int64_t rows = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    check_kernel_tensor(op, "grad_outs[i]", grad_outs[i], device);
    TORCH_CHECK(grad_outs[i].sizes() == ws[i].sizes() && at::isFloatingType(grad_outs[i].scalar_type()) &&
                    grad_outs[i].device() == ws[i].device(),
                op, ": grad_outs[", i, "] (", grad_outs[i].sizes(), ", ", grad_outs[i].scalar_type(),
                ") must match ws[", i, "] (", ws[i].sizes(), ", ", ws[i].scalar_type(),
                ") in shape and device, with a floating dtype");
    rows += ws[i].size(0);
  }
  const auto sd = stat_dtype(ws[0].scalar_type());
  for (const auto& [name, s] : {std::pair<const char*, const at::Tensor&>{"mean", mean}, {"rstd", rstd}}) {
    TORCH_CHECK(s.defined(), op, ": ", name, " is an undefined tensor");
    TORCH_CHECK(s.dim() == 1 && s.size(0) == rows, op, ": ", name, " has shape ", s.sizes(), "; expected (", rows,
                ",), one value per output channel of every weight");
    TORCH_CHECK(s.scalar_type() == sd, op, ": ", name, " has dtype ", s.scalar_type(), "; expected ", sd);
    TORCH_CHECK(s.device() == ws[0].device(), op, ": ", name, " is on ", s.device(), " but ws is on ",
                ws[0].device());
  }
}

}  // namespace bitfast
