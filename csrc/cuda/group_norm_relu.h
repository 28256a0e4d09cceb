// bitfast's GroupNorm+ReLU on CUDA tensors (bitfast::native_group_norm_relu_*).
//
// GroupNorm (Wu & He, 2018) followed by the ReLU of every BiT unit: per (sample, group) of
// M = C / G * H * W elements, xhat = (x - mean) * rstd with the biased variance and
// rstd = 1 / sqrt(var + eps), y = relu(xhat * weight + bias). Exactly
// bitfast.ops.reference.group_norm_relu_forward and group_norm_relu_backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace bitfast::cuda {

// The CUDA twin of bitfast::cpu::group_norm_relu_fwd (csrc/cpu/group_norm_relu.h): same
// arguments, results, dtypes and layouts. Returns (y, mean, rstd): y in x's dtype and
// memory format (NCHW or channels_last; other layouts are made contiguous); mean and rstd
// (N, G) in float32 (float64 for float64 x). Launches on the current stream.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_relu_fwd(
    const at::Tensor& x,                      // (N, C, H, W); fp16, bf16, fp32 or fp64
    const std::optional<at::Tensor>& weight,  // (C,) or None (ones); any float dtype
    const std::optional<at::Tensor>& bias,    // (C,) or None (zeros)
    int64_t num_groups,                       // G, divides C
    double eps,                               // added to the variance inside the square root
    bool relu);                               // apply the ReLU

// The CUDA twin of bitfast::cpu::group_norm_relu_bwd. Returns (grad_x, grad_weight,
// grad_bias): grad_x like y; grad_weight and grad_bias (C,) in weight's dtype (float32 when
// weight is None). xhat and the ReLU mask are recomputed from x and the saved statistics.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_relu_bwd(
    const at::Tensor& grad_y,                 // like x
    const at::Tensor& x,                      // the forward's input
    const std::optional<at::Tensor>& weight,  // as in the forward
    const std::optional<at::Tensor>& bias,    // as in the forward (for the ReLU mask)
    const at::Tensor& mean,                   // (N, G) saved by the forward
    const at::Tensor& rstd,                   // (N, G)
    int64_t num_groups,
    bool relu);

// The residual sum s = a + b (ATen's add, laid out like a) and GroupNorm+ReLU of it:
// (sum, y, mean, rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_relu_add_fwd(
    const at::Tensor& a,                      // (N, C, H, W)
    const at::Tensor& b,                      // like a
    const std::optional<at::Tensor>& weight,  // (C,) or None
    const std::optional<at::Tensor>& bias,    // (C,) or None
    int64_t num_groups,
    double eps,
    bool relu);

// (grad_input, grad_weight, grad_bias); grad_input = grad_sum (None: zero) + the gradient
// of y through the sum, added in the math type and rounded once.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_relu_add_bwd(
    const at::Tensor& grad_y,                   // like sum
    const std::optional<at::Tensor>& grad_sum,  // like sum, or None
    const at::Tensor& sum,                      // the forward's sum
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& mean,                     // (N, G) saved by the forward
    const at::Tensor& rstd,                     // (N, G)
    int64_t num_groups,
    bool relu);

}  // namespace bitfast::cuda
