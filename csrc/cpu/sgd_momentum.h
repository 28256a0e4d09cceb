// bitfast's fused SGD-with-momentum step on CPU tensors (bitfast::native_sgd_momentum_).
#pragma once

#include <ATen/core/Tensor.h>

namespace bitfast::cpu {

// One in-place torch.optim.SGD step over lists of tensors, exactly
// bitfast.ops.reference.sgd_momentum_: per element, d = maximize ? -g : g;
// d += weight_decay * p; with momentum, m = is_first_step ? d : momentum * m +
// (1 - dampening) * d and d = nesterov ? d + momentum * m : m; finally p -= lr * d.
// One pass per tensor (read p, g, m; write p, m), math in float32 for fp16/bf16/fp32 and in
// float64 for fp64. momentum_buffers may be empty when momentum == 0. Tensors of any layout
// are accepted; dense tensors with matching strides are updated without copies.
void sgd_momentum_(at::TensorList params,            // updated in place; one dtype, CPU
                   at::TensorList grads,             // same shapes, dtype and device as params
                   at::TensorList momentum_buffers,  // updated in place; empty when momentum == 0
                   double lr,
                   double momentum,
                   double dampening,
                   double weight_decay,
                   bool nesterov,
                   bool maximize,
                   bool is_first_step);

}  // namespace bitfast::cpu
