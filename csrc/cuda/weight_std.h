// bitfast's weight standardization on CUDA tensors (bitfast::native_weight_standardize_*).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace bitfast::cuda {

// The CUDA twins of bitfast::cpu::weight_standardize_fwd/bwd (csrc/cpu/weight_std.h): same
// arguments, results, dtypes and layouts; one launch per call on the current stream.
std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_standardize_fwd(
    const at::Tensor& w,  // (O, ...) with >= 2 dims; fp16, bf16, fp32 or fp64
    double eps);          // added to the biased variance inside the square root

at::Tensor weight_standardize_bwd(
    const at::Tensor& grad_out,  // like w: same shape and dtype
    const at::Tensor& w,         // the raw weight the forward standardized
    const at::Tensor& mean,      // (O,) statistics saved by the forward
    const at::Tensor& rstd);     // (O,)

}  // namespace bitfast::cuda
