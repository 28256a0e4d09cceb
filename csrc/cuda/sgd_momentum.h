// bitfast's fused SGD-with-momentum step on CUDA tensors (bitfast::native_sgd_momentum_).
#pragma once

#include <ATen/core/Tensor.h>

namespace bitfast::cuda {

// The CUDA twin of bitfast::cpu::sgd_momentum_ (csrc/cpu/sgd_momentum.h): same arguments,
// same math (float32 for fp16/bf16/fp32, float64 for fp64), one pass per tensor. All tensors
// of a call go through a few multi-tensor launches on the current stream.
void sgd_momentum_(at::TensorList params,            // updated in place; one dtype, one CUDA device
                   at::TensorList grads,             // same shapes, dtype and device as params
                   at::TensorList momentum_buffers,  // updated in place; empty when momentum == 0
                   double lr,
                   double momentum,
                   double dampening,
                   double weight_decay,
                   bool nesterov,
                   bool maximize,
                   bool is_first_step);

}  // namespace bitfast::cuda
