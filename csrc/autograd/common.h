// Helpers of bitfast's C++ autograd (csrc/autograd/<op>.cpp, built into bitfast._C).
//
// In plain eager execution the public ops of bitfast.ops call the native forward op
// directly (bitfast/ops/_register.py, OpFamily): the C++ autograd of each op then records
// the backward node and runs it without entering Python, as ATen's own operators do. A small
// GroupNorm of a late BiT stage takes 50-100 us of kernel time on a CPU, and a Python
// autograd layer around it costs a quarter to a third as much again (benchmarks/results/).
//
// Each op's Function saves what the op's Python formula saves and calls the same backward op
// through the dispatcher, so CPU and CUDA tensors (when bitfast._C_cuda is loaded) get the
// same gradients on either path. Statistics outputs are marked non-differentiable; backward
// formulas are not themselves differentiable (no double backward), as with the registered
// ops. An Autograd kernel may be registered before its schema is defined.
#pragma once

#include "common/layout.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <optional>
#include <tuple>

namespace bitfast::autograd {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// The typed dispatcher handle of bitfast::<name>, looked up on first use.
template <typename Sig>
inline c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

inline Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// Whether autograd records a call with these inputs: grad mode on and an input that
// requires grad. When it does not, the forward kernel runs directly below autograd, as the
// Function would run it, without building and discarding the Function's node (about 3 us,
// a quarter of a small late-stage call under torch.no_grad).
inline bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const OptTensor& t) { return t.has_value() && requires_grad(*t); }
template <typename... Ts>
bool records(const Ts&... ts) {
  return at::GradMode::is_enabled() && (requires_grad(ts) || ...);
}

}  // namespace bitfast::autograd
