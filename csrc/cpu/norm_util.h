// Helpers shared by bitfast's GroupNorm+ReLU and BatchNorm+ReLU CPU kernels: per-channel
// parameters in the math type, and widening of fp16/bf16 blocks into float buffers around
// the loops of cpu/norm_rows.h. (Memory formats: common/layout.h.)
#pragma once

#include "common/layout.h"
#include "cpu/convert.h"

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

namespace bitfast::cpu {

// A per-channel parameter as a contiguous (C,) tensor of dtype `acc`, `fill` when absent.
inline at::Tensor channel_param(const std::optional<at::Tensor>& t, int64_t c, at::ScalarType acc, double fill) {
  if (t.has_value() && t->defined()) return t->to(acc).contiguous();
  return at::full({c}, fill, at::TensorOptions().dtype(acc));
}

// n elements of p in the math type: p itself for fp32/fp64, else widened into buf.
template <typename scalar_t>
const at::opmath_type<scalar_t>* load(const scalar_t* p, int64_t n, std::vector<at::opmath_type<scalar_t>>& buf) {
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    return p;
  } else {
    if (int64_t(buf.size()) < n) buf.resize(n);
    widen(p, buf.data(), n);
    return buf.data();
  }
}

// Where the loops write n elements destined for p: p itself, or buf (then store() them).
template <typename scalar_t>
at::opmath_type<scalar_t>* out_buffer(scalar_t* p, int64_t n, std::vector<at::opmath_type<scalar_t>>& buf) {
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    return p;
  } else {
    if (int64_t(buf.size()) < n) buf.resize(n);
    return buf.data();
  }
}

template <typename scalar_t>
void store(const at::opmath_type<scalar_t>* src, scalar_t* p, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) narrow(src, p, n);
}

// R rows of L elements, `stride` apart, in the math type: p itself (*out_stride = stride)
// for fp32/fp64, else widened into buf as contiguous rows (*out_stride = L).
template <typename scalar_t>
const at::opmath_type<scalar_t>* load_rows(const scalar_t* p, int64_t R, int64_t L, int64_t stride,
                                           std::vector<at::opmath_type<scalar_t>>& buf, int64_t* out_stride) {
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    *out_stride = stride;
    return p;
  } else {
    if (int64_t(buf.size()) < R * L) buf.resize(R * L);
    for (int64_t r = 0; r < R; ++r) widen(p + r * stride, buf.data() + r * L, L);
    *out_stride = L;
    return buf.data();
  }
}

template <typename scalar_t>
void store_rows(const at::opmath_type<scalar_t>* src, scalar_t* p, int64_t R, int64_t L, int64_t stride) {
  if constexpr (!std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    for (int64_t r = 0; r < R; ++r) narrow(src + r * L, p + r * stride, L);
  }
}

// Whether the loops of cpu/norm_rows.h, planar and column, read and write scalar_t in place
// (bf16: they convert in registers, bitwise the float loops on widened copies) instead of
// through float buffers (fp16).
template <typename scalar_t>
constexpr bool direct_rows = std::is_same_v<scalar_t, c10::BFloat16>;

// n contiguous elements at p as the column loops take them: in place for direct_rows
// types, else widened into buf.
template <typename scalar_t>
auto cols_load(const scalar_t* p, int64_t n, std::vector<at::opmath_type<scalar_t>>& buf) {
  if constexpr (direct_rows<scalar_t>) {
    return p;
  } else {
    return load(p, n, buf);
  }
}

// R rows of L elements, `stride` apart, as the loops of cpu/norm_rows.h take them: in place
// for direct_rows types and fp32/fp64 (*ld = stride), else widened into buf (*ld = L).
template <typename scalar_t>
auto rows_input(const scalar_t* p, int64_t R, int64_t L, int64_t stride,
                std::vector<at::opmath_type<scalar_t>>& buf, int64_t* ld) {
  if constexpr (direct_rows<scalar_t>) {
    *ld = stride;
    return p;
  } else {
    return load_rows(p, R, L, stride, buf, ld);
  }
}

// Rows of C channels per block of a channels_last pass: about 64K elements (L2-resident
// while a block makes its two passes), at least 16 rows so that the per-block partial sums
// stay small next to the data they summarize, and at most 256 rows so that each float
// column sum adds few terms before the callers combine the blocks in double.
inline int64_t rows_per_block(int64_t c) {
  return std::max<int64_t>(16, std::min<int64_t>(256, 65536 / std::max<int64_t>(c, 1)));
}

}  // namespace bitfast::cpu
