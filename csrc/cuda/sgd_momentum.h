// bitfast's fused SGD-with-momentum step on CUDA tensors (bitfast::native_sgd_momentum_).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace bitfast::cuda {

// The CUDA twin of bitfast::cpu::sgd_momentum_ (csrc/cpu/sgd_momentum.h): same arguments,
// same math (float32 for fp16/bf16/fp32, float64 for fp64), one pass per tensor, the
// optional moving average updated from the stored parameter in the same pass. All tensors of
// a call go through a few multi-tensor launches on the current stream. A tensor learning rate
// is read by the kernel on the device: the host never waits, and the step can be captured in
// a CUDA graph and replayed while a schedule writes new values into that tensor.
void sgd_momentum_(at::TensorList params,                         // updated in place; one dtype, one CUDA device
                   at::TensorList grads,                          // same shapes, dtype and device as params
                   at::TensorList momentum_buffers,               // updated in place; empty when momentum == 0
                   double lr,                                     // learning rate, unless lr_tensor is given
                   double momentum,
                   double dampening,
                   double weight_decay,
                   bool nesterov,
                   bool maximize,
                   bool is_first_step,
                   const std::optional<at::Tensor>& lr_tensor,  // one float32 element on the params' GPU, or none
                   at::TensorList ema_params,                     // updated in place; empty: no average
                   double ema_decay);                             // 0 <= ema_decay < 1

}  // namespace bitfast::cuda
