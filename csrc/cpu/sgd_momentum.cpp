// Fused SGD with momentum on CPU: one pass over p, g and m per step, where torch's foreach
// SGD makes four (PERF.md: 20 bytes per fp32 parameter instead of 44).
//
// The work is cut into fixed-size chunks across all tensors of the call and the chunks are
// shared among threads, so that a list of many small tensors (biases, norm scales) and a
// few large ones (conv weights) both keep every core busy.
#include "cpu/sgd_momentum.h"

#include "common/checks.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace bitfast::cpu {
namespace {

// Elements per unit of parallel work: 64 KiB of fp32 per stream, small enough to balance
// threads, large enough to amortize the scheduling.
constexpr int64_t kChunk = 16384;

// Steps of fewer elements than this run on the calling thread: waking the thread pool
// costs more than the update itself.
constexpr int64_t kParallelMin = 131072;

// Step options in the math type (float for fp16/bf16/fp32, double for fp64).
template <typename acc_t>
struct Options {
  acc_t lr, momentum, one_minus_dampening, weight_decay;
  bool use_momentum, nesterov, maximize, first;
};

inline float negate(float v) { return -v; }
inline double negate(double v) { return -v; }
template <typename acc_t>
inline at::vec::Vectorized<acc_t> negate(const at::vec::Vectorized<acc_t>& v) {
  return v.neg();
}

// The update of one element or one vector of elements; T is acc_t or Vectorized<acc_t>.
// Kept in one place so the vector body and the scalar tail compute the same thing.
template <typename T, typename acc_t>
inline T update(T p, T g, T* m, const Options<acc_t>& o) {
  T d = o.maximize ? negate(g) : g;
  if (o.weight_decay != acc_t(0)) d = d + T(o.weight_decay) * p;
  if (o.use_momentum) {
    const T buf = o.first ? d : T(o.momentum) * (*m) + T(o.one_minus_dampening) * d;
    *m = buf;
    d = o.nesterov ? d + T(o.momentum) * buf : buf;
  }
  return p - T(o.lr) * d;
}

// Updates n elements of one tensor (float or double storage).
template <typename scalar_t>
void step_full(scalar_t* p, const scalar_t* g, scalar_t* m, int64_t n, const Options<scalar_t>& o) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    Vec mv = o.use_momentum && !o.first ? Vec::loadu(m + i) : Vec(scalar_t(0));
    const Vec pv = update<Vec, scalar_t>(Vec::loadu(p + i), Vec::loadu(g + i), &mv, o);
    pv.store(p + i);
    if (o.use_momentum) mv.store(m + i);
  }
  for (; i < n; ++i) {
    scalar_t mv = o.use_momentum && !o.first ? m[i] : scalar_t(0);
    p[i] = update<scalar_t, scalar_t>(p[i], g[i], &mv, o);
    if (o.use_momentum) m[i] = mv;
  }
}

// Updates n elements of one fp16/bf16 tensor: loads widen to float, stores round back.
template <typename scalar_t>
void step_reduced(scalar_t* p, const scalar_t* g, scalar_t* m, int64_t n, const Options<float>& o) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using FVec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();  // == 2 * FVec::size()
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    auto [p0, p1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(p + i));
    auto [g0, g1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(g + i));
    FVec m0(0.f), m1(0.f);
    if (o.use_momentum && !o.first) std::tie(m0, m1) = at::vec::convert_to_float<scalar_t>(Vec::loadu(m + i));
    p0 = update<FVec, float>(p0, g0, &m0, o);
    p1 = update<FVec, float>(p1, g1, &m1, o);
    at::vec::convert_from_float<scalar_t>(p0, p1).store(p + i);
    if (o.use_momentum) at::vec::convert_from_float<scalar_t>(m0, m1).store(m + i);
  }
  for (; i < n; ++i) {
    float mv = o.use_momentum && !o.first ? float(m[i]) : 0.f;
    p[i] = scalar_t(update<float, float>(float(p[i]), float(g[i]), &mv, o));
    if (o.use_momentum) m[i] = scalar_t(mv);
  }
}

template <typename scalar_t>
void step_all(std::vector<SgdOperands>& ops, const Options<at::opmath_type<scalar_t>>& o) {
  // (tensor, first element) of every chunk, over all tensors
  std::vector<std::pair<int64_t, int64_t>> chunks;
  int64_t total = 0;
  for (size_t t = 0; t < ops.size(); ++t) {
    const int64_t n = ops[t].p.numel();
    total += n;
    for (int64_t b = 0; b < n; b += kChunk) chunks.emplace_back(int64_t(t), b);
  }
  // Below a few chunks the threads cost more than they save.
  const int64_t grain = total < kParallelMin ? int64_t(chunks.size()) : 1;
  at::parallel_for(0, int64_t(chunks.size()), std::max<int64_t>(grain, 1), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const auto [t, b] = chunks[c];
      const SgdOperands& op = ops[t];
      const int64_t n = std::min(kChunk, op.p.numel() - b);
      scalar_t* p = op.p.data_ptr<scalar_t>() + b;
      const scalar_t* g = op.g.const_data_ptr<scalar_t>() + b;
      scalar_t* m = o.use_momentum ? op.m.data_ptr<scalar_t>() + b : nullptr;
      if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
        step_full<scalar_t>(p, g, m, n, o);
      } else {
        step_reduced<scalar_t>(p, g, m, n, o);
      }
    }
  });
}

}  // namespace

void sgd_momentum_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   bool is_first_step) {
  const bool use_momentum = check_sgd_momentum(params, grads, momentum_buffers, momentum, c10::DeviceType::CPU);
  if (params.empty()) return;
  std::vector<SgdOperands> ops;
  ops.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    ops.push_back(sgd_operands(params[i], grads[i], use_momentum ? &momentum_buffers[i] : nullptr));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "native_sgd_momentum_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Options<acc_t> o{acc_t(lr),        acc_t(momentum), acc_t(1.0 - dampening), acc_t(weight_decay),
                           use_momentum,     nesterov,        maximize,               is_first_step};
    step_all<scalar_t>(ops, o);
  });
  sgd_finish(ops);
}

}  // namespace bitfast::cpu
