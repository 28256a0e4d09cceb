// bitfast's BatchNorm+ReLU on CUDA tensors (bitfast::native_batch_norm_relu_* and
// bitfast::native_batch_norm_update_stats_).
//
// BatchNorm (Ioffe & Szegedy, 2015) followed by a ReLU: per channel c, over the
// N * H * W elements of the batch, xhat = (x - mean) * rstd with rstd = 1 / sqrt(var + eps),
// y = relu(xhat * weight + bias). Exactly bitfast.ops.reference.batch_norm_relu_forward,
// batch_norm_relu_backward and batch_norm_update_stats_.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace bitfast::cuda {

// The CUDA twin of bitfast::cpu::batch_norm_relu_fwd (csrc/cpu/batch_norm_relu.h): same
// arguments, results, dtypes and layouts. Returns (y, mean, var): y in x's dtype and
// memory format (NCHW or channels_last; other layouts are made contiguous); mean and var
// (C,) in float32 (float64 for float64 x): the batch mean and biased variance in training,
// copies of the running statistics otherwise. Nothing is updated in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_fwd(
    const at::Tensor& x,                            // (N, C, H, W); fp16, bf16, fp32 or fp64
    const std::optional<at::Tensor>& running_mean,  // (C,); required when !training
    const std::optional<at::Tensor>& running_var,   // (C,); required when !training
    const std::optional<at::Tensor>& weight,        // (C,) or None (ones)
    const std::optional<at::Tensor>& bias,          // (C,) or None (zeros)
    bool training,                                  // batch statistics instead of running ones
    double eps,                                     // added to the variance inside the square root
    bool relu);                                     // apply the ReLU

// The CUDA twin of bitfast::cpu::batch_norm_relu_bwd. Returns (grad_x, grad_weight,
// grad_bias): grad_x like y; grad_weight and grad_bias (C,) in weight's dtype (float32 when
// weight is None).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_bwd(
    const at::Tensor& grad_y,                 // like x
    const at::Tensor& x,                      // the forward's input
    const std::optional<at::Tensor>& weight,  // as in the forward
    const std::optional<at::Tensor>& bias,    // as in the forward (for the ReLU mask)
    const at::Tensor& mean,                   // (C,) returned by the forward
    const at::Tensor& var,                    // (C,) returned by the forward (biased)
    bool training,
    double eps,
    bool relu);

// PyTorch's running-statistics update, in place: r = (1 - momentum) * r + momentum * s,
// with the variance unbiased (var * count / (count - 1)) when count > 1. One launch, with
// the roundings of the reference's tensor arithmetic.
void batch_norm_update_stats_(at::Tensor& running_mean,  // (C,) updated in place
                              at::Tensor& running_var,   // (C,) updated in place
                              const at::Tensor& mean,    // (C,) batch mean
                              const at::Tensor& var,     // (C,) biased batch variance
                              double momentum,
                              int64_t count);            // elements each channel reduced (N * H * W)

}  // namespace bitfast::cuda
