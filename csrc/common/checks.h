// Argument checks shared by bitfast's CPU and CUDA kernels.
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

// Statistics are float32, or float64 for float64 inputs (bitfast/ops/reference.py).
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
// weight standardization
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// SGD with momentum
// ---------------------------------------------------------------------------------------

// Checks the arguments of native_sgd_momentum_ and returns whether the momentum buffers
// take part (momentum != 0). One dtype and one device per call: a multi-tensor launch walks
// all tensors with one kernel instantiation. lr_tensor, when given, is a one-element float32
// tensor on the params' device; ema_params is empty or holds one tensor per param, of its
// shape, on its device, in its dtype or (for fp16/bf16 params) in float32.
inline bool check_sgd_momentum(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                               double momentum, const std::optional<at::Tensor>& lr_tensor,
                               at::TensorList ema_params, double ema_decay, c10::DeviceType device) {
  constexpr const char* op = "native_sgd_momentum_";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": got ", n, " params but ", grads.size(), " grads; expected one grad per param");
  const bool use_buffers = momentum != 0.0;
  if (use_buffers) {
    TORCH_CHECK(momentum_buffers.size() == n, op, ": momentum=", momentum, " needs one buffer per param; got ", n,
                " params and ", momentum_buffers.size(), " momentum_buffers");
  } else {
    TORCH_CHECK(momentum_buffers.empty() || momentum_buffers.size() == n, op, ": got ", n, " params and ",
                momentum_buffers.size(), " momentum_buffers; expected none (momentum == 0) or one per param");
  }
  const bool use_ema = !ema_params.empty();
  TORCH_CHECK(!use_ema || ema_params.size() == n, op, ": got ", n, " params but ", ema_params.size(),
              " ema_params; expected none or one per param");
  TORCH_CHECK(ema_decay >= 0.0 && ema_decay < 1.0, op, ": ema_decay is ", ema_decay, "; expected 0 <= ema_decay < 1");
  if (n == 0) return use_buffers;
  const at::Tensor& p0 = params[0];
  check_kernel_tensor(op, "params[0]", p0, device);
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    const at::Tensor& lr = *lr_tensor;
    TORCH_CHECK(lr.numel() == 1 && lr.scalar_type() == at::kFloat && lr.device() == p0.device(), op,
                ": lr_tensor is ", lr.scalar_type(), " ", lr.sizes(), " on ", lr.device(),
                "; expected one Float element on ", p0.device(), " (the params' device)");
  }
  at::ScalarType ema_dtype = p0.scalar_type();
  if (use_ema) {
    ema_dtype = ema_params[0].defined() ? ema_params[0].scalar_type() : ema_dtype;
    const bool half = p0.scalar_type() == at::kHalf || p0.scalar_type() == at::kBFloat16;
    TORCH_CHECK(ema_dtype == p0.scalar_type() || (half && ema_dtype == at::kFloat), op, ": ema_params[0] is ",
                ema_dtype, "; expected ", p0.scalar_type(), half ? " or Float" : "", " for ", p0.scalar_type(),
                " params");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is an undefined tensor");
    TORCH_CHECK(p.device() == p0.device() && p.scalar_type() == p0.scalar_type(), op, ": params[", i, "] is ",
                p.scalar_type(), " on ", p.device(), "; expected ", p0.scalar_type(), " on ", p0.device(),
                " like params[0] (one dtype and device per call)");
    TORCH_CHECK(at::has_internal_overlap(p) != at::MemOverlap::Yes, op, ": params[", i,
                "] has elements that share memory (an expanded tensor?); it cannot be updated in place");
    for (int k = 0; k < (use_buffers ? 2 : 1); ++k) {
      const at::Tensor& t = k == 0 ? grads[i] : momentum_buffers[i];
      const char* name = k == 0 ? "grads" : "momentum_buffers";
      TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is an undefined tensor");
      TORCH_CHECK(t.sizes() == p.sizes() && t.scalar_type() == p.scalar_type() && t.device() == p.device(), op, ": ",
                  name, "[", i, "] is ", t.scalar_type(), " ", t.sizes(), " on ", t.device(), "; expected ",
                  p.scalar_type(), " ", p.sizes(), " on ", p.device(), " like params[", i, "]");
    }
    if (use_buffers) {
      TORCH_CHECK(at::has_internal_overlap(momentum_buffers[i]) != at::MemOverlap::Yes, op, ": momentum_buffers[",
                  i, "] has elements that share memory; it cannot be updated in place");
    }
    if (use_ema) {
      const at::Tensor& e = ema_params[i];
      TORCH_CHECK(e.defined(), op, ": ema_params[", i, "] is an undefined tensor");
      TORCH_CHECK(e.sizes() == p.sizes() && e.scalar_type() == ema_dtype && e.device() == p.device(), op,
                  ": ema_params[", i, "] is ", e.scalar_type(), " ", e.sizes(), " on ", e.device(), "; expected ",
                  ema_dtype, " ", p.sizes(), " on ", p.device(), " like params[", i, "] (and ema_params[0])");
      TORCH_CHECK(at::has_internal_overlap(e) != at::MemOverlap::Yes, op, ": ema_params[", i,
                  "] has elements that share memory; it cannot be updated in place");
      const auto overlap = at::get_overlap_status(p, e);
      TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
                  ": ema_params[", i,
                  "] shares memory with params[", i, "]; the average needs its own storage");
    }
  }
  return use_buffers;
}

// The tensors one SGD kernel reads and writes for params[i]. A kernel walks p, g, m and e as
// flat arrays, which is right when they are dense with identical strides (contiguous,
// channels_last, ...): element k of one sits at element k of the others. Otherwise g, m and e
// get working copies laid out like p (or all of them contiguous copies when p itself is not
// dense), and sgd_finish() copies the results back into the caller's tensors.
struct SgdOperands {
  at::Tensor p, g, m, e;           // what the kernel walks (m, e undefined when unused)
  at::Tensor p_out, m_out, e_out;  // the caller's tensors, when p, m or e are working copies
};

inline bool same_dense_layout(const at::Tensor& ref, const at::Tensor& t) {
  return t.strides() == ref.strides() && t.is_non_overlapping_and_dense();
}

// t, or a copy of it laid out like the dense ref (in t's dtype).
inline at::Tensor like_layout(const at::Tensor& ref, const at::Tensor& t) {
  // empty_like keeps the exact strides of a dense tensor, so the copy matches ref.
  return same_dense_layout(ref, t) ? t : at::empty_like(ref, ref.options().dtype(t.scalar_type())).copy_(t);
}

inline SgdOperands sgd_operands(const at::Tensor& p, const at::Tensor& g, const at::Tensor* m,
                                const at::Tensor* e = nullptr) {
  SgdOperands o;
  if (p.is_non_overlapping_and_dense()) {
    o.p = p;
    o.g = like_layout(p, g);
    if (m) o.m = like_layout(p, *m);
    if (e) o.e = like_layout(p, *e);
  } else {
    o.p = p.contiguous();
    o.p_out = p;
    o.g = g.contiguous();
    if (m) o.m = m->contiguous();
    if (e) o.e = e->contiguous();
  }
  if (m && !o.m.is_same(*m)) o.m_out = *m;
  if (e && !o.e.is_same(*e)) o.e_out = *e;
  return o;
}

// Writes the results of working copies back into the caller's tensors.
inline void sgd_finish(std::vector<SgdOperands>& ops) {
  for (auto& o : ops) {
    if (o.p_out.defined()) o.p_out.copy_(o.p);
    if (o.m_out.defined()) o.m_out.copy_(o.m);
    if (o.e_out.defined()) o.e_out.copy_(o.e);
  }
}

// ---------------------------------------------------------------------------------------
// GroupNorm + ReLU and BatchNorm + ReLU
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
