// The C++ autograd of the native weight-standardization forward op: the formula of
// bitfast/ops/weight_std.py, recorded without entering Python (see csrc/autograd/common.h).
#include "autograd/common.h"

#include <torch/library.h>

namespace bitfast::autograd {
namespace {

using WsFwdSig = Tensor3(const Tensor&, double);

const c10::TypedOperatorHandle<WsFwdSig>& ws_fwd_op() {
  static const auto op = handle<WsFwdSig>("bitfast::native_weight_standardize_fwd");
  return op;
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
}  // namespace bitfast::autograd

TORCH_LIBRARY_IMPL(bitfast, Autograd, m) {
  m.impl("native_weight_standardize_fwd", &bitfast::autograd::weight_standardize_fwd);
}
