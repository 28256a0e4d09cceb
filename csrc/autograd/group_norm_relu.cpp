// The C++ autograd of the native GroupNorm+ReLU ops (with and without the residual add): the formula of
// bitfast/ops/group_norm_relu.py, recorded without entering Python (see csrc/autograd/common.h).
#include "autograd/common.h"

#include <torch/library.h>

namespace bitfast::autograd {
namespace {

using GnFwdSig = Tensor3(const Tensor&, const OptTensor&, const OptTensor&, int64_t, double, bool);
using GnAddFwdSig = Tensor4(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t, double, bool);

const c10::TypedOperatorHandle<GnFwdSig>& gn_fwd_op() {
  static const auto op = handle<GnFwdSig>("bitfast::native_group_norm_relu_fwd");
  return op;
}
const c10::TypedOperatorHandle<GnAddFwdSig>& gn_add_fwd_op() {
  static const auto op = handle<GnAddFwdSig>("bitfast::native_group_norm_relu_add_fwd");
  return op;
}

// --- GroupNorm + ReLU -------------------------------------------------------------------

struct GroupNormReLU : public torch::autograd::Function<GroupNormReLU> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               int64_t num_groups, double eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, mean, rstd] = gn_fwd_op().call(x, weight, bias, num_groups, eps, relu);
    ctx->save_for_backward({x, value_or_undefined(weight), value_or_undefined(bias), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["relu"] = relu;
    ctx->mark_non_differentiable({mean, rstd});
    // no tensors of zeros for the statistics' (always absent) gradients
    ctx->set_materialize_grads(false);
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = handle<Tensor3(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                     const Tensor&, int64_t, bool)>("bitfast::native_group_norm_relu_bwd");
    if (!grads[0].defined()) return variable_list(6);  // y unused: no gradient flows
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const OptTensor weight = opt(saved[1]), bias = opt(saved[2]);
    const Tensor gy = grads[0].contiguous(format_of(x));
    auto [dx, dw, db] = bwd.call(gy, x, weight, bias, saved[3], saved[4], ctx->saved_data["num_groups"].toInt(),
                                 ctx->saved_data["relu"].toBool());
    return {dx, weight ? dw : Tensor(), bias ? db : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor3 group_norm_relu_fwd(const Tensor& x, const OptTensor& weight, const OptTensor& bias, int64_t num_groups,
                            double eps, bool relu) {
  if (!records(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return gn_fwd_op().call(x, weight, bias, num_groups, eps, relu);
  }
  auto out = GroupNormReLU::apply(x, weight, bias, num_groups, eps, relu);
  return {out[0], out[1], out[2]};
}

// --- residual add + GroupNorm + ReLU ----------------------------------------------------

struct GroupNormReLUAdd : public torch::autograd::Function<GroupNormReLUAdd> {
  static variable_list forward(AutogradContext* ctx, const Tensor& a, const Tensor& b, const OptTensor& weight,
                               const OptTensor& bias, int64_t num_groups, double eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [sum, y, mean, rstd] = gn_add_fwd_op().call(a, b, weight, bias, num_groups, eps, relu);
    ctx->save_for_backward({sum, value_or_undefined(weight), value_or_undefined(bias), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["relu"] = relu;
    ctx->mark_non_differentiable({mean, rstd});
    // An unused output gets an undefined gradient instead of a tensor of zeros.
    ctx->set_materialize_grads(false);
    return {sum, y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = handle<Tensor3(const Tensor&, const OptTensor&, const Tensor&, const OptTensor&,
                                     const OptTensor&, const Tensor&, const Tensor&, int64_t, bool)>(
        "bitfast::native_group_norm_relu_add_bwd");
    if (!grads[0].defined() && !grads[1].defined()) return variable_list(7);
    const auto saved = ctx->get_saved_variables();
    const Tensor& sum = saved[0];
    const OptTensor weight = opt(saved[1]), bias = opt(saved[2]);
    const auto fmt = format_of(sum);
    const OptTensor grad_sum = grads[0].defined() ? OptTensor(grads[0].contiguous(fmt)) : std::nullopt;
    // y unused: its gradient is zero (the sum's gradient still flows)
    const Tensor gy = grads[1].defined() ? grads[1].contiguous(fmt) : at::zeros_like(sum, fmt);
    auto [gin, dw, db] = bwd.call(gy, grad_sum, sum, weight, bias, saved[3], saved[4],
                                  ctx->saved_data["num_groups"].toInt(), ctx->saved_data["relu"].toBool());
    return {gin, gin, weight ? dw : Tensor(), bias ? db : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor4 group_norm_relu_add_fwd(const Tensor& a, const Tensor& b, const OptTensor& weight, const OptTensor& bias,
                                int64_t num_groups, double eps, bool relu) {
  if (!records(a, b, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return gn_add_fwd_op().call(a, b, weight, bias, num_groups, eps, relu);
  }
  auto out = GroupNormReLUAdd::apply(a, b, weight, bias, num_groups, eps, relu);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace bitfast::autograd

TORCH_LIBRARY_IMPL(bitfast, Autograd, m) {
  m.impl("native_group_norm_relu_fwd", &bitfast::autograd::group_norm_relu_fwd);
  m.impl("native_group_norm_relu_add_fwd", &bitfast::autograd::group_norm_relu_add_fwd);
}
