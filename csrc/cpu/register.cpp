// Attaches bitfast's CPU kernels to the native op schemas defined in
// bitfast/ops/_library.py. Loading bitfast._C runs this registration.
#include "cpu/batch_norm_relu.h"
#include "cpu/group_norm_relu.h"
#include "cpu/sgd_momentum.h"
#include "cpu/weight_std.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(bitfast, CPU, m) {
  m.impl("native_batch_norm_relu_fwd", &bitfast::cpu::batch_norm_relu_fwd);
  m.impl("native_batch_norm_relu_bwd", &bitfast::cpu::batch_norm_relu_bwd);
  m.impl("native_batch_norm_update_stats_", &bitfast::cpu::batch_norm_update_stats_);
  m.impl("native_group_norm_relu_fwd", &bitfast::cpu::group_norm_relu_fwd);
  m.impl("native_group_norm_relu_bwd", &bitfast::cpu::group_norm_relu_bwd);
  m.impl("native_group_norm_relu_add_fwd", &bitfast::cpu::group_norm_relu_add_fwd);
  m.impl("native_group_norm_relu_add_bwd", &bitfast::cpu::group_norm_relu_add_bwd);
  m.impl("native_sgd_momentum_", &bitfast::cpu::sgd_momentum_);
  m.impl("native_weight_standardize_fwd", &bitfast::cpu::weight_standardize_fwd);
  m.impl("native_weight_standardize_bwd", &bitfast::cpu::weight_standardize_bwd);
}
