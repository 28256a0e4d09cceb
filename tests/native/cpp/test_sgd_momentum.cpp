// C++ unit test of bitfast::cpu::sgd_momentum_ against a straightforward loop with
// torch.optim.SGD's math (bitfast/ops/reference.py), for fp32 and fp64, every option
// combination, several steps, tensor sizes around the vector width and the chunk size,
// and non-contiguous tensors.
#include "cpu/sgd_momentum.h"

#include "check.h"

#include <ATen/ATen.h>

#include <string>
#include <vector>

using bitfast::test::expect_close;
using bitfast::test::expect_error;

namespace {

struct Opt {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

// One step on float64 copies, element by element.
void naive_step(std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g, std::vector<at::Tensor>& m,
                const Opt& o, bool first) {
  for (size_t i = 0; i < p.size(); ++i) {
    double* pp = p[i].data_ptr<double>();
    const double* gp = g[i].const_data_ptr<double>();
    double* mp = o.momentum != 0 ? m[i].data_ptr<double>() : nullptr;
    for (int64_t k = 0; k < p[i].numel(); ++k) {
      double d = o.maximize ? -gp[k] : gp[k];
      if (o.weight_decay != 0) d += o.weight_decay * pp[k];
      if (o.momentum != 0) {
        mp[k] = first ? d : o.momentum * mp[k] + (1 - o.dampening) * d;
        d = o.nesterov ? d + o.momentum * mp[k] : mp[k];
      }
      pp[k] -= o.lr * d;
    }
  }
}

// A parameter of the given shape, made non-contiguous when layout asks for it: "t" a
// transposed view, "s" every other column of a larger tensor, "cl" channels_last.
at::Tensor make(const std::vector<int64_t>& shape, const std::string& layout, at::ScalarType dtype) {
  const auto opt = at::TensorOptions().dtype(dtype);
  if (layout == "t") return at::randn({shape[1], shape[0]}, opt).t();
  if (layout == "s") return at::randn({shape[0], shape[1] * 2}, opt).slice(1, 0, shape[1] * 2, 2);
  if (layout == "cl") return at::randn(shape, opt).contiguous(at::MemoryFormat::ChannelsLast);
  return at::randn(shape, opt);
}

void run_case(at::ScalarType dtype, const Opt& o, int steps) {
  const bool f64 = dtype == at::kDouble;
  const std::string name = std::string(f64 ? "fp64" : "fp32") + " mom=" + std::to_string(o.momentum) +
                           " damp=" + std::to_string(o.dampening) + " wd=" + std::to_string(o.weight_decay) +
                           (o.nesterov ? " nesterov" : "") + (o.maximize ? " maximize" : "");
  // sizes around the vector width and the 16384-element chunk, plus layouts
  const std::vector<std::pair<std::vector<int64_t>, std::string>> specs = {
      {{1}, ""},      {{7}, ""},       {{33}, ""},       {{16384}, ""},  {{16389}, ""},
      {{40000}, ""},  {{64, 48}, "t"}, {{30, 17}, "s"}, {{4, 8, 3, 3}, "cl"}, {{0}, ""},
  };
  std::vector<at::Tensor> p, m, p_ref, m_ref;
  for (const auto& [shape, layout] : specs) {
    p.push_back(make(shape, layout, dtype));
    m.push_back(make(shape, layout, dtype));
    p_ref.push_back(p.back().to(at::kDouble).contiguous());
    m_ref.push_back(m.back().to(at::kDouble).contiguous());
  }
  const std::vector<at::Tensor> no_buffers;
  for (int s = 0; s < steps; ++s) {
    std::vector<at::Tensor> g, g_ref;
    for (size_t i = 0; i < p.size(); ++i) {
      // gradients in another layout than their parameter half of the time
      g.push_back(s % 2 ? at::randn(p[i].sizes(), p[i].options()) : at::randn_like(p[i]));
      g_ref.push_back(g.back().to(at::kDouble).contiguous());
    }
    const double lr = o.lr * (1.0 + 0.25 * s);  // lr changes between steps
    const bool first = s == 0;
    bitfast::cpu::sgd_momentum_(p, g, o.momentum != 0 ? at::TensorList(m) : at::TensorList(no_buffers), lr,
                                o.momentum, o.dampening, o.weight_decay, o.nesterov, o.maximize, first);
    Opt step = o;
    step.lr = lr;
    naive_step(p_ref, g_ref, m_ref, step, first);
  }
  const double tol = f64 ? 1e-12 : 1e-5;
  for (size_t i = 0; i < p.size(); ++i) {
    expect_close(name + " p[" + std::to_string(i) + "]", p[i], p_ref[i], tol, tol);
    if (o.momentum != 0) expect_close(name + " m[" + std::to_string(i) + "]", m[i], m_ref[i], tol, tol);
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    for (double momentum : {0.0, 0.9}) {
      for (double dampening : {0.0, 0.1}) {
        for (double wd : {0.0, 1e-4}) {
          for (bool nesterov : {false, true}) {
            for (bool maximize : {false, true}) {
              if (nesterov && (momentum == 0 || dampening != 0)) continue;
              run_case(dtype, Opt{0.1, momentum, dampening, wd, nesterov, maximize}, 5);
            }
          }
        }
      }
    }
  }

  // argument checks: clear errors, no crash
  const std::vector<at::Tensor> p = {at::randn({3})}, g = {at::randn({3})}, none;
  const std::vector<at::Tensor> two = {at::randn({3}), at::randn({3})};
  expect_error("grads length", "expected one grad per param",
               [&] { bitfast::cpu::sgd_momentum_(p, two, none, 0.1, 0, 0, 0, false, false, false); });
  expect_error("buffers length", "needs one buffer per param",
               [&] { bitfast::cpu::sgd_momentum_(p, g, none, 0.1, 0.9, 0, 0, false, false, false); });
  expect_error("grad shape", "like params[0]", [&] {
    bitfast::cpu::sgd_momentum_(p, {at::randn({4})}, none, 0.1, 0, 0, 0, false, false, false);
  });
  expect_error("grad dtype", "like params[0]", [&] {
    bitfast::cpu::sgd_momentum_(p, {at::randn({3}, at::kDouble)}, none, 0.1, 0, 0, 0, false, false, false);
  });
  expect_error("mixed dtypes", "one dtype and device per call", [&] {
    const std::vector<at::Tensor> mixed = {at::randn({3}), at::randn({3}, at::kDouble)};
    const std::vector<at::Tensor> mixed_g = {at::randn({3}), at::randn({3}, at::kDouble)};
    bitfast::cpu::sgd_momentum_(mixed, mixed_g, none, 0.1, 0, 0, 0, false, false, false);
  });
  expect_error("expanded param", "share memory", [&] {
    bitfast::cpu::sgd_momentum_({at::randn({1}).expand({3})}, g, none, 0.1, 0, 0, 0, false, false, false);
  });
  return bitfast::test::finish("test_sgd_momentum");
}
