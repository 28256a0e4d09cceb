// bitfast's weight standardization on CPU tensors (bitfast::native_weight_standardize_*).
//
// Weight Standardization (Qiao et al., 2019), as BiT uses it: per output channel o, over the
// K = numel / O elements of w[o], w_hat = (w - mean) * rstd with the biased variance and
// rstd = 1 / sqrt(var + eps). Exactly bitfast.ops.reference.weight_standardize_forward and
// weight_standardize_backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace bitfast::cpu {

// Returns (out, mean, rstd): out is w_hat in w's dtype, shaped like w, channels_last when w
// is (common/layout.h), else contiguous; mean and rstd have shape (O,) and dtype float32
// (float64 for float64 w). Accepts any layout of w.
std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_standardize_fwd(
    const at::Tensor& w,  // (O, ...) with >= 2 dims; fp16, bf16, fp32 or fp64
    double eps);          // added to the biased variance inside the square root

// Gradient w.r.t. w, in w's dtype and memory format (as out above):
// dw = rstd * (g - mean(g) - w_hat * mean(g * w_hat)) per output channel.
at::Tensor weight_standardize_bwd(
    const at::Tensor& grad_out,  // like w: same shape and dtype
    const at::Tensor& w,         // the raw weight the forward standardized
    const at::Tensor& mean,      // (O,) statistics saved by the forward
    const at::Tensor& rstd);     // (O,)

// The same for a list of weights of one dtype, in one parallel region over all their rows:
// outs[i] is weight_standardize_fwd(ws[i])'s out, bit for bit (converted to out_dtype when
// given); mean and rstd hold every weight's statistics one after the other (sum of the O_i
// values).
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> weight_standardize_multi_fwd(
    at::TensorList ws, double eps, std::optional<at::ScalarType> out_dtype);

// The gradients of every weight, as weight_standardize_bwd per weight (a gradient of another
// floating dtype than its weight's, as after out_dtype, is converted first).
std::vector<at::Tensor> weight_standardize_multi_bwd(at::TensorList grad_outs, at::TensorList ws,
                                                     const at::Tensor& mean, const at::Tensor& rstd);

}  // namespace bitfast::cpu
