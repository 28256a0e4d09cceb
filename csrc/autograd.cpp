// Autograd of bitfast's native forward ops, in C++ (built into bitfast._C).
//
// In plain eager execution the public ops of bitfast.ops call the native forward op
// directly (see bitfast/ops/_register.py, `eager`): the formulas below then record the
// backward node and run it without entering Python, as ATen's own operators do. A small
// GroupNorm of a late BiT stage takes 50-100 us of kernel time on a CPU, and a Python
// autograd layer around it cost as much again.
//
// Each function saves what the registered op's Python autograd saves and calls the same
// backward op through the dispatcher, so CPU and CUDA tensors (when bitfast._C_cuda is
// loaded) get the same gradients on either path. The statistics outputs are marked
// non-differentiable. Backward formulas are not themselves differentiable (no double
// backward), as with the registered ops.
//
// The schemas are defined in Python (bitfast/ops/_library.py); an Autograd kernel may be
// registered before its schema is, so loading this library first is fine.
#include "common/layout.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace bitfast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// The typed dispatcher handle of bitfast::<name>, looked up on first use.
template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// Whether autograd records a call with these inputs: grad mode on and an input that
// requires grad. When it does not, the forward kernel runs directly below autograd, as the
// Function would run it, without building and discarding the Function's node (about 3 us,
// a quarter of a small late-stage call under torch.no_grad).
bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
bool requires_grad(const OptTensor& t) { return t.has_value() && requires_grad(*t); }
template <typename... Ts>
bool records(const Ts&... ts) {
  return at::GradMode::is_enabled() && (requires_grad(ts) || ...);
}

// The typed handles of the native ops.
using GnFwdSig = Tensor3(const Tensor&, const OptTensor&, const OptTensor&, int64_t, double, bool);
using GnAddFwdSig = Tensor4(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t, double, bool);
using BnFwdSig = Tensor3(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool,
                         double, bool);
using WsFwdSig = Tensor3(const Tensor&, double);

const c10::TypedOperatorHandle<GnFwdSig>& gn_fwd_op() {
  static const auto op = handle<GnFwdSig>("bitfast::native_group_norm_relu_fwd");
  return op;
}
const c10::TypedOperatorHandle<GnAddFwdSig>& gn_add_fwd_op() {
  static const auto op = handle<GnAddFwdSig>("bitfast::native_group_norm_relu_add_fwd");
  return op;
}
const c10::TypedOperatorHandle<BnFwdSig>& bn_fwd_op() {
  static const auto op = handle<BnFwdSig>("bitfast::native_batch_norm_relu_fwd");
  return op;
}
const c10::TypedOperatorHandle<WsFwdSig>& ws_fwd_op() {
  static const auto op = handle<WsFwdSig>("bitfast::native_weight_standardize_fwd");
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

// --- BatchNorm + ReLU -------------------------------------------------------------------

struct BatchNormReLU : public torch::autograd::Function<BatchNormReLU> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& running_mean,
                               const OptTensor& running_var, const OptTensor& weight, const OptTensor& bias,
                               bool training, double eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, mean, var] = bn_fwd_op().call(x, running_mean, running_var, weight, bias, training, eps, relu);
    ctx->save_for_backward({x, value_or_undefined(weight), value_or_undefined(bias), mean, var});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = handle<Tensor3(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                     const Tensor&, bool, double, bool)>("bitfast::native_batch_norm_relu_bwd");
    if (!grads[0].defined()) return variable_list(8);
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const OptTensor weight = opt(saved[1]), bias = opt(saved[2]);
    const Tensor gy = grads[0].contiguous(format_of(x));
    auto [dx, dw, db] = bwd.call(gy, x, weight, bias, saved[3], saved[4], ctx->saved_data["training"].toBool(),
                                 ctx->saved_data["eps"].toDouble(), ctx->saved_data["relu"].toBool());
    return {dx, Tensor(), Tensor(), weight ? dw : Tensor(), bias ? db : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor3 batch_norm_relu_fwd(const Tensor& x, const OptTensor& running_mean, const OptTensor& running_var,
                            const OptTensor& weight, const OptTensor& bias, bool training, double eps, bool relu) {
  if (!records(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return bn_fwd_op().call(x, running_mean, running_var, weight, bias, training, eps, relu);
  }
  auto out = BatchNormReLU::apply(x, running_mean, running_var, weight, bias, training, eps, relu);
  return {out[0], out[1], out[2]};
}

// --- weight standardization -------------------------------------------------------------

struct WeightStandardize : public torch::autograd::Function<WeightStandardize> {
  static variable_list forward(AutogradContext* ctx, const Tensor& w, double eps) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, mean, rstd] = ws_fwd_op().call(w, eps);
    ctx->save_for_backward({w, mean, rstd});
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(
        "bitfast::native_weight_standardize_bwd");
    if (!grads[0].defined()) return variable_list(2);
    const auto saved = ctx->get_saved_variables();
    return {bwd.call(grads[0], saved[0], saved[1], saved[2]), Tensor()};
  }
};

Tensor3 weight_standardize_fwd(const Tensor& w, double eps) {
  if (!records(w)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return ws_fwd_op().call(w, eps);
  }
  auto out = WeightStandardize::apply(w, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace bitfast

TORCH_LIBRARY_IMPL(bitfast, Autograd, m) {
  m.impl("native_group_norm_relu_fwd", &bitfast::group_norm_relu_fwd);
  m.impl("native_group_norm_relu_add_fwd", &bitfast::group_norm_relu_add_fwd);
  m.impl("native_batch_norm_relu_fwd", &bitfast::batch_norm_relu_fwd);
  m.impl("native_weight_standardize_fwd", &bitfast::weight_standardize_fwd);
}
