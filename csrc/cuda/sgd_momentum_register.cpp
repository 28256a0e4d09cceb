// Attaches the CUDA kernels of the SGD step to its native schemas (defined in
// bitfast/ops/sgd_momentum.py); loading bitfast._C_cuda runs this registration. A .cpp file, so the
// host compiler, not nvcc, digests torch/library.h.
//
// Each native op checks its arguments here (csrc/ops/sgd_momentum.h) before the launcher in
// csrc/cuda/sgd_momentum.cu runs; the launchers assume checked arguments and keep only the
// launch-size limits that depend on their grids.
#include "cuda/sgd_momentum.h"
#include "ops/sgd_momentum.h"

#include <torch/library.h>

namespace {

constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;

void sgd_momentum_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   bool is_first_step, const std::optional<at::Tensor>& lr_tensor, at::TensorList ema_params,
                   double ema_decay) {
  bitfast::check_sgd_momentum(params, grads, momentum_buffers, momentum, lr_tensor, ema_params, ema_decay, kCUDA);
  bitfast::cuda::sgd_momentum_(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
                               maximize, is_first_step, lr_tensor, ema_params, ema_decay);
}

}  // namespace

TORCH_LIBRARY_IMPL(bitfast, CUDA, m) {
  m.impl("native_sgd_momentum_", &sgd_momentum_);
}
