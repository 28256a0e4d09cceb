// Fused SGD with momentum on CPU: one pass over p, g and m per step, where torch's foreach
// SGD makes four (docs/performance.md: 20 bytes per fp32 parameter instead of 44).
//
// The work is cut into fixed-size chunks across all tensors of the call and the chunks are
// shared among threads, so that a list of many small tensors (biases, norm scales) and a
// few large ones (conv weights) both keep every core busy. The update is a plain loop,
// specialized at compile time for the options of the step (no branch inside), which the
// compiler vectorizes; fp16/bf16 chunks are widened block by block into float buffers that
// stay in L1, so memory is still read and written once.
//
// The moving average of the parameters, when asked for, is updated block by block right
// after its parameters, from the block just written (still in L1), so p is read from memory
// once per step. A tensor learning rate is a CPU tensor: the kernel reads its one float.
#include "cpu/sgd_momentum.h"

#include "ops/sgd_momentum.h"
#include "cpu/convert.h"
#include "cpu/simd.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// fp16/bf16 elements widened at a time (four float buffers of 4 KiB, resident in L1); also
// the block of parameters whose average is updated right after them.
constexpr int64_t kBlock = 1024;

// Step options in the math type (float for fp16/bf16/fp32, double for fp64).
template <typename acc_t>
struct Options {
  acc_t lr, momentum, one_minus_dampening, weight_decay;
  acc_t ema_weight;  // 1 - ema_decay
  bool use_momentum, nesterov, maximize, first;
};

// torch.optim.SGD's update over n elements, for one combination of options.
template <typename T, bool WD, bool MOM, bool FIRST, bool NEST, bool MAX>
BITFAST_INLINE void update(T* __restrict p, const T* __restrict g, T* __restrict m, int64_t n, const Options<T>& o) {
  const T lr = o.lr, mom = o.momentum, omd = o.one_minus_dampening, wd = o.weight_decay;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T d = MAX ? -g[i] : g[i];
    if constexpr (WD) d = d + wd * p[i];
    if constexpr (MOM) {
      const T buf = FIRST ? d : mom * m[i] + omd * d;
      m[i] = buf;
      d = NEST ? d + mom * buf : buf;
    }
    p[i] = p[i] - lr * d;
  }
}

template <typename T, bool WD, bool MAX>
BITFAST_INLINE void update_momentum(T* p, const T* g, T* m, int64_t n, const Options<T>& o) {
  if (!o.use_momentum) {
    update<T, WD, false, false, false, MAX>(p, g, m, n, o);
  } else if (o.first) {
    if (o.nesterov) {
      update<T, WD, true, true, true, MAX>(p, g, m, n, o);
    } else {
      update<T, WD, true, true, false, MAX>(p, g, m, n, o);
    }
  } else {
    if (o.nesterov) {
      update<T, WD, true, false, true, MAX>(p, g, m, n, o);
    } else {
      update<T, WD, true, false, false, MAX>(p, g, m, n, o);
    }
  }
}

template <typename T>
BITFAST_INLINE void update_any(T* p, const T* g, T* m, int64_t n, const Options<T>& o) {
  if (o.weight_decay != T(0)) {
    o.maximize ? update_momentum<T, true, true>(p, g, m, n, o) : update_momentum<T, true, false>(p, g, m, n, o);
  } else {
    o.maximize ? update_momentum<T, false, true>(p, g, m, n, o) : update_momentum<T, false, false>(p, g, m, n, o);
  }
}

BITFAST_TARGET_CLONES void step_float(float* p, const float* g, float* m, int64_t n, const Options<float>& o) {
  update_any<float>(p, g, m, n, o);
}

BITFAST_TARGET_CLONES void step_double(double* p, const double* g, double* m, int64_t n, const Options<double>& o) {
  update_any<double>(p, g, m, n, o);
}

// e += w * (p - e): the moving average, with weights that sum to one exactly.
template <typename T>
BITFAST_INLINE void average(T* __restrict e, const T* __restrict p, int64_t n, T w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) e[i] = e[i] + w * (p[i] - e[i]);
}

BITFAST_TARGET_CLONES void average_float(float* e, const float* p, int64_t n, float w) { average<float>(e, p, n, w); }

BITFAST_TARGET_CLONES void average_double(double* e, const double* p, int64_t n, double w) {
  average<double>(e, p, n, w);
}

void step_acc(float* p, const float* g, float* m, int64_t n, const Options<float>& o) { step_float(p, g, m, n, o); }
void step_acc(double* p, const double* g, double* m, int64_t n, const Options<double>& o) {
  step_double(p, g, m, n, o);
}
void average_acc(float* e, const float* p, int64_t n, float w) { average_float(e, p, n, w); }
void average_acc(double* e, const double* p, int64_t n, double w) { average_double(e, p, n, w); }

// One chunk of n elements; m is null without momentum, e null without an average.
template <typename scalar_t, typename ema_t>
void step(scalar_t* p, const scalar_t* g, scalar_t* m, ema_t* e, int64_t n,
          const Options<at::opmath_type<scalar_t>>& o) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    // fp32/fp64 (e has the params' type): in place, the average block by block after its params.
    if (e == nullptr) {
      step_acc(p, g, m, n, o);
      return;
    }
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t len = std::min(kBlock, n - b);
      step_acc(p + b, g + b, m ? m + b : nullptr, len, o);
      average_acc(e + b, p + b, len, o.ema_weight);
    }
  } else {
    // fp16/bf16: block by block through float buffers.
    float pb[kBlock], gb[kBlock], mb[kBlock], eb[kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t len = std::min(kBlock, n - b);
      widen(p + b, pb, len);
      widen(g + b, gb, len);
      if (o.use_momentum && !o.first) widen(m + b, mb, len);
      step_float(pb, gb, mb, len, o);
      narrow(pb, p + b, len);
      if (o.use_momentum) narrow(mb, m + b, len);
      if (e != nullptr) {
        widen(p + b, pb, len);  // the parameter as stored, rounded
        if constexpr (std::is_same_v<ema_t, float>) {
          average_float(e + b, pb, len, o.ema_weight);
        } else {
          widen(e + b, eb, len);
          average_float(eb, pb, len, o.ema_weight);
          narrow(eb, e + b, len);
        }
      }
    }
  }
}

template <typename scalar_t, typename ema_t>
void step_all(std::vector<SgdOperands>& ops, const Options<at::opmath_type<scalar_t>>& o) {
  // (tensor, first element) of every chunk, over all tensors
  std::vector<std::pair<int64_t, int64_t>> chunks;
  int64_t total = 0;
  for (size_t t = 0; t < ops.size(); ++t) {
    const int64_t n = ops[t].p.numel();
    total += n;
    for (int64_t b = 0; b < n; b += kChunk) chunks.emplace_back(int64_t(t), b);
  }
  const int64_t grain = total < kParallelMin ? int64_t(chunks.size()) : 1;
  at::parallel_for(0, int64_t(chunks.size()), std::max<int64_t>(grain, 1), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const auto [t, b] = chunks[c];
      const SgdOperands& op = ops[t];
      const int64_t n = std::min(kChunk, op.p.numel() - b);
      scalar_t* m = o.use_momentum ? op.m.data_ptr<scalar_t>() + b : nullptr;
      ema_t* e = op.e.defined() ? op.e.data_ptr<ema_t>() + b : nullptr;
      step<scalar_t, ema_t>(op.p.data_ptr<scalar_t>() + b, op.g.const_data_ptr<scalar_t>() + b, m, e, n, o);
    }
  });
}

}  // namespace

void sgd_momentum_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   bool is_first_step, const std::optional<at::Tensor>& lr_tensor, at::TensorList ema_params,
                   double ema_decay) {
  const bool use_momentum = check_sgd_momentum(params, grads, momentum_buffers, momentum, lr_tensor, ema_params,
                                               ema_decay, c10::DeviceType::CPU);
  if (params.empty()) return;
  const bool use_ema = !ema_params.empty();
  std::vector<SgdOperands> ops;
  ops.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    ops.push_back(sgd_operands(params[i], grads[i], use_momentum ? &momentum_buffers[i] : nullptr,
                               use_ema ? &ema_params[i] : nullptr));
  }
  // A CPU tensor: reading its element here is reading memory, no synchronization.
  const bool lr_from_tensor = lr_tensor.has_value() && lr_tensor->defined();
  const float lr_f32 = lr_from_tensor ? *lr_tensor->const_data_ptr<float>() : 0.0f;
  const bool float_ema = use_ema && ema_params[0].scalar_type() == at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "native_sgd_momentum_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Options<acc_t> o{lr_from_tensor ? acc_t(lr_f32) : acc_t(lr),
                           acc_t(momentum),
                           acc_t(1.0 - dampening),
                           acc_t(weight_decay),
                           acc_t(1.0 - ema_decay),
                           use_momentum,
                           nesterov,
                           maximize,
                           is_first_step};
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      // half-precision params may keep their average in float32 (checked above)
      if (float_ema) {
        step_all<scalar_t, float>(ops, o);
        return;
      }
    }
    step_all<scalar_t, scalar_t>(ops, o);
  });
  sgd_finish(ops);
}

}  // namespace bitfast::cpu

// The op's CPU kernels, attached to its native schemas (defined in bitfast/ops/sgd_momentum.py).
TORCH_LIBRARY_IMPL(bitfast, CPU, m) {
  m.impl("native_sgd_momentum_", &bitfast::cpu::sgd_momentum_);
}
