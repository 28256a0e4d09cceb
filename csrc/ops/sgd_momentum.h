// The native SGD step's argument checks, and the operands its CPU and CUDA kernels walk.
//
// Called first by the op's CPU kernels (csrc/cpu/sgd_momentum.cpp) and by its CUDA registration
// (csrc/cuda/sgd_momentum_register.cpp), so a bad call of torch.ops.bitfast.native_* ends in a
// RuntimeError naming the op and the argument on either device.
#pragma once

#include "common/checks.h"

#include <ATen/ops/empty_like.h>

#include <vector>

namespace bitfast {

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

}  // namespace bitfast
