// bitfast's fused SGD-with-momentum step on CPU tensors (bitfast::native_sgd_momentum_).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace bitfast::cpu {

// One in-place torch.optim.SGD step over lists of tensors, exactly
// bitfast.ops.reference.sgd_momentum_: per element, d = maximize ? -g : g;
// d += weight_decay * p; with momentum, m = is_first_step ? d : momentum * m +
// (1 - dampening) * d and d = nesterov ? d + momentum * m : m; finally p -= lr * d, where lr
// is *lr_tensor when lr_tensor is given. Then, when ema_params is not empty,
// e += (1 - ema_decay) * (p - e) with the updated p as stored.
// One pass per tensor (read p, g, m, e; write p, m, e), math in float32 for fp16/bf16/fp32
// and in float64 for fp64. momentum_buffers may be empty when momentum == 0. The averages
// are in the params' dtype, or float32 for fp16/bf16 params. Tensors of any layout are
// accepted; dense tensors with matching strides are updated without copies.
void sgd_momentum_(at::TensorList params,                         // updated in place; one dtype, CPU
                   at::TensorList grads,                          // same shapes, dtype and device as params
                   at::TensorList momentum_buffers,               // updated in place; empty when momentum == 0
                   double lr,                                     // learning rate, unless lr_tensor is given
                   double momentum,
                   double dampening,
                   double weight_decay,
                   bool nesterov,
                   bool maximize,
                   bool is_first_step,
                   const std::optional<at::Tensor>& lr_tensor,  // one float32 element on the CPU, or none
                   at::TensorList ema_params,                     // updated in place; empty: no average
                   double ema_decay);                             // 0 <= ema_decay < 1

}  // namespace bitfast::cpu
