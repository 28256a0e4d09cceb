// The memory layout bitfast's kernels take an operand in, and give their outputs in.
//
// A 4-d tensor laid out channels_last (and not also plainly contiguous, as a (N, C, 1, 1)
// tensor is) is taken as channels_last; anything else as contiguous. This is the rule of
// bitfast.ops.reference.memory_format, which the ops' fake kernels follow, so real and fake
// outputs have the same strides.
#pragma once

#include <ATen/core/Tensor.h>

namespace bitfast {

// Whether x is taken as channels_last.
inline bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The memory format x is taken in (and outputs made from it are given in).
inline at::MemoryFormat format_of(const at::Tensor& x) { return format_of(is_channels_last(x)); }

}  // namespace bitfast
