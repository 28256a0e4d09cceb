// The run-time launch settings of bitfast's CUDA kernels (see cuda/launch_config.h).
#include "cuda/launch_config.h"

#include <atomic>
#include <cstring>

namespace bitfast::cuda {
namespace {

constexpr int kKnobs = static_cast<int>(Knob::kCount);

// Names, in Knob order, and the values each accepts besides 0.
constexpr const char* kNames[kKnobs] = {
    "gn_fwd_threads", "gn_fwd_vec_bytes", "gn_split_target", "gn_pointwise_threads",
    "gn_pointwise_vectors", "sgd_threads", "sgd_chunk", "sgd_unroll",
};
constexpr const char* kNameList =
    "gn_fwd_threads,gn_fwd_vec_bytes,gn_split_target,gn_pointwise_threads,gn_pointwise_vectors,sgd_threads,"
    "sgd_chunk,sgd_unroll";

std::atomic<int64_t> g_knobs[kKnobs] = {};

bool pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

bool valid(Knob k, int64_t v) {
  if (v == 0) return true;
  switch (k) {
    case Knob::kGnFwdThreads: return v == 64 || v == 128 || v == 256 || v == 512;
    case Knob::kGnFwdVecBytes: return v == 1 || v == 8 || v == 16;
    case Knob::kGnSplitTarget: return v >= 1 && v <= (int64_t(1) << 20);
    case Knob::kGnPointwiseThreads: return v == 64 || v == 128 || v == 256;
    case Knob::kGnPointwiseVectors: return v >= 1 && v <= 64;
    case Knob::kSgdThreads: return v == 128 || v == 256 || v == 512 || v == 1024;
    case Knob::kSgdChunk: return pow2(v) && v >= 4096 && v <= 262144;
    case Knob::kSgdUnroll: return v == 1 || v == 2 || v == 4;
    default: return false;
  }
}

int find(const char* name) {
  if (name == nullptr) return -1;
  for (int i = 0; i < kKnobs; ++i) {
    if (std::strcmp(name, kNames[i]) == 0) return i;
  }
  return -1;
}

}  // namespace

int64_t launch_knob(Knob k) { return g_knobs[static_cast<int>(k)].load(std::memory_order_relaxed); }

}  // namespace bitfast::cuda

extern "C" {

__attribute__((visibility("default"))) int bitfast_cuda_set_launch_knob(const char* name, int64_t value) {
  using namespace bitfast::cuda;
  const int i = find(name);
  if (i < 0) return -1;
  if (!valid(static_cast<Knob>(i), value)) return -2;
  g_knobs[i].store(value, std::memory_order_relaxed);
  return 0;
}

__attribute__((visibility("default"))) int bitfast_cuda_get_launch_knob(const char* name, int64_t* value) {
  using namespace bitfast::cuda;
  const int i = find(name);
  if (i < 0 || value == nullptr) return -1;
  *value = g_knobs[i].load(std::memory_order_relaxed);
  return 0;
}

__attribute__((visibility("default"))) const char* bitfast_cuda_launch_knob_names() {
  return bitfast::cuda::kNameList;
}

}  // extern "C"
