// The C++ autograd of the native BatchNorm+ReLU forward op: the formula of
// bitfast/ops/batch_norm_relu.py, recorded without entering Python (see csrc/autograd/common.h).
#include "autograd/common.h"

#include <torch/library.h>

namespace bitfast::autograd {
namespace {

using BnFwdSig = Tensor3(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool,
                         double, bool);

const c10::TypedOperatorHandle<BnFwdSig>& bn_fwd_op() {
  static const auto op = handle<BnFwdSig>("bitfast::native_batch_norm_relu_fwd");
  return op;
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

}  // namespace
}  // namespace bitfast::autograd

TORCH_LIBRARY_IMPL(bitfast, Autograd, m) {
  m.impl("native_batch_norm_relu_fwd", &bitfast::autograd::batch_norm_relu_fwd);
}
