// Fused SGD with momentum on CUDA: one pass over p, g and m (20 bytes per fp32 parameter,
// docs/performance.md), all tensors of a call in a few multi-tensor launches; with a moving average of
// the parameters, the same pass also reads and writes the average (28 bytes), p being read
// once.
//
// A launch covers up to kMaxTensors tensors, whose pointers and sizes travel in the
// kernel's arguments (no device-side table to allocate and copy). Each tensor is cut into
// chunks of kChunk elements, one block per chunk; a block finds its tensor by a binary
// search over the first chunk index of each tensor. Where p, g, m and the average are 16-byte
// aligned (the usual case: the caching allocator aligns to 512 bytes) a thread moves 16 bytes
// of parameters per load and store (32 bytes of a float32 average of fp16/bf16 params).
//
// A tensor learning rate stays on the device: every thread reads the same float (one cached
// load), so the host neither synchronizes nor bakes the value into a captured CUDA graph.
//
// Launch settings (cuda/launch_config.h), all 0 by default: threads per block, elements per
// block (the chunk) and packs per thread per loop step. Every element is updated by the same
// arithmetic whatever the launch, so the results do not depend on them.
#include "cuda/sgd_momentum.h"

#include "cuda/launch_config.h"
#include "ops/sgd_momentum.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace bitfast::cuda {
namespace {

constexpr int kThreads = 256;  // threads per block, unless the launch settings say otherwise
// Elements per block: 128 KiB of fp32 per stream; a BiT-R50x1 step is about 800 blocks.
constexpr int64_t kChunk = 32768;
// Tensors per launch: keeps the arguments (TensorTable + StepOptions) under the 4 KiB that
// every CUDA version accepts.
constexpr int kMaxTensors = 80;

template <typename scalar_t, typename ema_t>
struct TensorTable {
  scalar_t* p[kMaxTensors];        // parameters
  const scalar_t* g[kMaxTensors];  // gradients
  scalar_t* m[kMaxTensors];        // momentum buffers (null without momentum)
  ema_t* e[kMaxTensors];           // moving averages (null without)
  int64_t numel[kMaxTensors];      // elements of each tensor
  int first_chunk[kMaxTensors];    // index of each tensor's first chunk (block) in the launch
  int count;                       // tensors in this launch
};

template <typename acc_t>
struct StepOptions {
  acc_t lr, momentum, one_minus_dampening, weight_decay;
  acc_t ema_weight;      // 1 - ema_decay
  const float* lr_ptr;   // the learning rate on the device, replacing lr; or null
  int64_t chunk;         // elements per block
  bool use_momentum, nesterov, maximize, first, use_ema;
};

static_assert(sizeof(TensorTable<double, double>) + sizeof(StepOptions<double>) <= 4000,
              "kernel arguments must stay under 4 KiB");

// torch.optim.SGD's update of one element, in acc_t; m is read unless o.first and written.
template <typename acc_t>
__device__ __forceinline__ acc_t update(acc_t p, acc_t g, acc_t& m, acc_t lr, const StepOptions<acc_t>& o) {
  acc_t d = o.maximize ? -g : g;
  if (o.weight_decay != acc_t(0)) d = d + o.weight_decay * p;
  if (o.use_momentum) {
    const acc_t buf = o.first ? d : o.momentum * m + o.one_minus_dampening * d;
    m = buf;
    d = o.nesterov ? d + o.momentum * buf : buf;
  }
  return p - lr * d;
}

// The moving average of one element: e + w * (p - e), p as stored.
template <typename acc_t, typename scalar_t, typename ema_t>
__device__ __forceinline__ ema_t average(ema_t e, scalar_t p, acc_t w) {
  const acc_t a = static_cast<acc_t>(e);
  return static_cast<ema_t>(a + w * (static_cast<acc_t>(p) - a));
}

// N elements moved by one aligned load or store (16 bytes of scalar_t).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// __grid_constant__ keeps the table in the constant bank: a block indexes it with a
// run-time tensor index, which would otherwise copy the whole table to local memory.
// UNROLL: packs each thread loads before it computes (more loads in flight); BOUND: the
// most threads per block it is launched with.
template <typename scalar_t, typename ema_t, typename acc_t, int UNROLL, int BOUND>
__global__ void __launch_bounds__(BOUND)
    _sgd_momentum_kernel(const __grid_constant__ TensorTable<scalar_t, ema_t> T,  // the tensors of this launch
                         const StepOptions<acc_t> O) {                           // hyper-parameters
  const int chunk = blockIdx.x;
  // The last tensor whose first chunk is <= this block's chunk.
  int lo = 0, hi = T.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (T.first_chunk[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int t = lo;
  const int64_t begin = static_cast<int64_t>(chunk - T.first_chunk[t]) * O.chunk;
  const int64_t n = min(O.chunk, T.numel[t] - begin);
  scalar_t* __restrict__ p = T.p[t] + begin;
  const scalar_t* __restrict__ g = T.g[t] + begin;
  scalar_t* __restrict__ m = O.use_momentum ? T.m[t] + begin : nullptr;
  ema_t* __restrict__ e = O.use_ema ? T.e[t] + begin : nullptr;
  const bool read_m = O.use_momentum && !O.first;
  const acc_t lr = O.lr_ptr != nullptr ? static_cast<acc_t>(*O.lr_ptr) : O.lr;
  const int threads = blockDim.x;

  constexpr int N = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, N>;
  using E = Pack<ema_t, N>;
  // begin is a multiple of N, so a chunk is aligned when its tensor is.
  const auto addr = reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g) |
                    (m ? reinterpret_cast<uintptr_t>(m) : uintptr_t(0));
  const bool e_aligned = e == nullptr || reinterpret_cast<uintptr_t>(e) % sizeof(E) == 0;
  int64_t done = 0;
  if (addr % 16 == 0 && e_aligned) {
    const int64_t packs = n / N;
    for (int64_t k0 = threadIdx.x; k0 < packs; k0 += static_cast<int64_t>(threads) * UNROLL) {
      P pv[UNROLL], gv[UNROLL], mv[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int64_t k = k0 + static_cast<int64_t>(u) * threads;
        mv[u] = P{};
        if (k < packs) {
          pv[u] = reinterpret_cast<const P*>(p)[k];
          gv[u] = reinterpret_cast<const P*>(g)[k];
          if (read_m) mv[u] = reinterpret_cast<const P*>(m)[k];
        }
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int64_t k = k0 + static_cast<int64_t>(u) * threads;
        if (k >= packs) break;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          acc_t mj = static_cast<acc_t>(mv[u].v[j]);
          pv[u].v[j] =
              static_cast<scalar_t>(update(static_cast<acc_t>(pv[u].v[j]), static_cast<acc_t>(gv[u].v[j]), mj, lr, O));
          mv[u].v[j] = static_cast<scalar_t>(mj);
        }
        reinterpret_cast<P*>(p)[k] = pv[u];
        if (O.use_momentum) reinterpret_cast<P*>(m)[k] = mv[u];
        if (O.use_ema) {
          E ev = reinterpret_cast<const E*>(e)[k];
#pragma unroll
          for (int j = 0; j < N; ++j) ev.v[j] = average<acc_t>(ev.v[j], pv[u].v[j], O.ema_weight);
          reinterpret_cast<E*>(e)[k] = ev;
        }
      }
    }
    done = packs * N;
  }
  for (int64_t j = done + threadIdx.x; j < n; j += threads) {
    acc_t mj = read_m ? static_cast<acc_t>(m[j]) : acc_t(0);
    const scalar_t pj = static_cast<scalar_t>(update(static_cast<acc_t>(p[j]), static_cast<acc_t>(g[j]), mj, lr, O));
    p[j] = pj;
    if (O.use_momentum) m[j] = static_cast<scalar_t>(mj);
    if (O.use_ema) e[j] = average<acc_t>(e[j], pj, O.ema_weight);
  }
}

// The kernel instantiation for `threads` per block and `unroll` packs per thread.
template <typename scalar_t, typename ema_t, typename acc_t>
auto pick_kernel(int threads, int unroll) {
  if (threads <= kThreads) {
    if (unroll == 4) return &_sgd_momentum_kernel<scalar_t, ema_t, acc_t, 4, kThreads>;
    if (unroll == 2) return &_sgd_momentum_kernel<scalar_t, ema_t, acc_t, 2, kThreads>;
    return &_sgd_momentum_kernel<scalar_t, ema_t, acc_t, 1, kThreads>;
  }
  if (unroll == 4) return &_sgd_momentum_kernel<scalar_t, ema_t, acc_t, 4, 1024>;
  if (unroll == 2) return &_sgd_momentum_kernel<scalar_t, ema_t, acc_t, 2, 1024>;
  return &_sgd_momentum_kernel<scalar_t, ema_t, acc_t, 1, 1024>;
}

template <typename scalar_t, typename ema_t>
void launch_all(const std::vector<SgdOperands>& ops, const StepOptions<at::opmath_type<scalar_t>>& o,
                cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t threads_knob = launch_knob(Knob::kSgdThreads), unroll = launch_knob(Knob::kSgdUnroll);
  const int threads = threads_knob ? static_cast<int>(threads_knob) : kThreads;
  const int64_t chunk = o.chunk;
  const auto kernel = pick_kernel<scalar_t, ema_t, acc_t>(threads, static_cast<int>(unroll));
  TensorTable<scalar_t, ema_t> table{};
  int chunks = 0;
  auto flush = [&] {
    if (table.count == 0) return;
    kernel<<<chunks, threads, 0, stream>>>(table, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table.count = 0;
    chunks = 0;
  };
  // Keeps the block count of one launch far inside the grid's 2^31 - 1 limit.
  constexpr int64_t kMaxChunks = std::numeric_limits<int32_t>::max() / 2;
  for (const SgdOperands& op : ops) {
    const int64_t n = op.p.numel();
    if (n == 0) continue;
    const int64_t c = (n + chunk - 1) / chunk;
    TORCH_CHECK(c <= kMaxChunks, "native_sgd_momentum_: a tensor of ", n, " elements is too large for one launch");
    if (chunks + c > kMaxChunks) flush();
    const int i = table.count++;
    table.p[i] = op.p.data_ptr<scalar_t>();
    table.g[i] = op.g.const_data_ptr<scalar_t>();
    table.m[i] = o.use_momentum ? op.m.data_ptr<scalar_t>() : nullptr;
    table.e[i] = o.use_ema ? op.e.data_ptr<ema_t>() : nullptr;
    table.numel[i] = n;
    table.first_chunk[i] = chunks;
    chunks += static_cast<int>(c);
    if (table.count == kMaxTensors) flush();
  }
  flush();
}

}  // namespace

void sgd_momentum_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   bool is_first_step, const std::optional<at::Tensor>& lr_tensor, at::TensorList ema_params,
                   double ema_decay) {
  const bool use_momentum = momentum != 0.0;  // the buffers take part (arguments checked in cuda/register.cpp)
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const bool use_ema = !ema_params.empty();
  std::vector<SgdOperands> ops;
  ops.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    ops.push_back(sgd_operands(params[i], grads[i], use_momentum ? &momentum_buffers[i] : nullptr,
                               use_ema ? &ema_params[i] : nullptr));
  }
  const bool lr_from_tensor = lr_tensor.has_value() && lr_tensor->defined();
  const float* lr_ptr = lr_from_tensor ? lr_tensor->const_data_ptr<float>() : nullptr;
  const bool float_ema = use_ema && ema_params[0].scalar_type() == at::kFloat;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunk_knob = launch_knob(Knob::kSgdChunk);
  const int64_t chunk = chunk_knob ? chunk_knob : kChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "native_sgd_momentum_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const StepOptions<acc_t> o{static_cast<acc_t>(lr),
                               static_cast<acc_t>(momentum),
                               static_cast<acc_t>(1.0 - dampening),
                               static_cast<acc_t>(weight_decay),
                               static_cast<acc_t>(1.0 - ema_decay),
                               lr_ptr,
                               chunk,
                               use_momentum,
                               nesterov,
                               maximize,
                               is_first_step,
                               use_ema};
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      // half-precision params may keep their average in float32 (checked above)
      if (float_ema) {
        launch_all<scalar_t, float>(ops, o, stream);
        return;
      }
    }
    launch_all<scalar_t, scalar_t>(ops, o, stream);
  });
  sgd_finish(ops);
}

}  // namespace bitfast::cuda
