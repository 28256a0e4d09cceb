// Attaches bitfast's CPU kernels to the native op schemas defined in
// bitfast/ops/_library.py. Loading bitfast._C runs this registration.
#include "cpu/sgd_momentum.h"
#include "cpu/weight_std.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(bitfast, CPU, m) {
  m.impl("native_sgd_momentum_", &bitfast::cpu::sgd_momentum_);
  m.impl("native_weight_standardize_fwd", &bitfast::cpu::weight_standardize_fwd);
  m.impl("native_weight_standardize_bwd", &bitfast::cpu::weight_standardize_bwd);
}
