// C++ unit test of bitfast::cpu::sgd_momentum_ against a straightforward loop with
// torch.optim.SGD's math (bitfast/ops/reference/sgd_momentum_ref.py), for fp32 and fp64, every option
// combination, several steps, tensor sizes around the vector width and the chunk size,
// and non-contiguous tensors; with the learning rate as a float or in a tensor, with and
// without a moving average of the parameters.
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
  bool lr_tensor = false;  // pass the learning rate in a one-element float32 tensor
  double ema_decay = -1;   // >= 0: also update a moving average of the parameters
};

// One step on float64 copies, element by element.
void naive_step(std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g, std::vector<at::Tensor>& m,
                std::vector<at::Tensor>& e, const Opt& o, bool first) {
  for (size_t i = 0; i < p.size(); ++i) {
    double* pp = p[i].data_ptr<double>();
    const double* gp = g[i].const_data_ptr<double>();
    double* mp = o.momentum != 0 ? m[i].data_ptr<double>() : nullptr;
    double* ep = o.ema_decay >= 0 ? e[i].data_ptr<double>() : nullptr;
    for (int64_t k = 0; k < p[i].numel(); ++k) {
      double d = o.maximize ? -gp[k] : gp[k];
      if (o.weight_decay != 0) d += o.weight_decay * pp[k];
      if (o.momentum != 0) {
        mp[k] = first ? d : o.momentum * mp[k] + (1 - o.dampening) * d;
        d = o.nesterov ? d + o.momentum * mp[k] : mp[k];
      }
      pp[k] -= o.lr * d;
      if (ep) ep[k] = o.ema_decay * ep[k] + (1 - o.ema_decay) * pp[k];
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
                           (o.nesterov ? " nesterov" : "") + (o.maximize ? " maximize" : "") +
                           (o.lr_tensor ? " lr_tensor" : "") + (o.ema_decay >= 0 ? " ema" : "");
  // sizes around the vector width and the 16384-element chunk, plus layouts
  const std::vector<std::pair<std::vector<int64_t>, std::string>> specs = {
      {{1}, ""},      {{7}, ""},       {{33}, ""},       {{16384}, ""},  {{16389}, ""},
      {{40000}, ""},  {{64, 48}, "t"}, {{30, 17}, "s"}, {{4, 8, 3, 3}, "cl"}, {{0}, ""},
  };
  std::vector<at::Tensor> p, m, e, p_ref, m_ref, e_ref;
  const bool ema = o.ema_decay >= 0;
  for (const auto& [shape, layout] : specs) {
    p.push_back(make(shape, layout, dtype));
    m.push_back(make(shape, layout, dtype));
    // averages in another layout than their parameter for the strided cases
    e.push_back(make(shape, layout.empty() ? "" : "c", dtype));
    p_ref.push_back(p.back().to(at::kDouble).contiguous());
    m_ref.push_back(m.back().to(at::kDouble).contiguous());
    e_ref.push_back(e.back().to(at::kDouble).contiguous());
  }
  const std::vector<at::Tensor> no_buffers;
  for (int s = 0; s < steps; ++s) {
    std::vector<at::Tensor> g, g_ref;
    for (size_t i = 0; i < p.size(); ++i) {
      // gradients in another layout than their parameter half of the time
      g.push_back(s % 2 ? at::randn(p[i].sizes(), p[i].options()) : at::randn_like(p[i]));
      g_ref.push_back(g.back().to(at::kDouble).contiguous());
    }
    double lr = o.lr * (1.0 + 0.25 * s);  // lr changes between steps
    const bool first = s == 0;
    std::optional<at::Tensor> lr_tensor;
    if (o.lr_tensor) {
      lr_tensor = at::full({}, lr, at::TensorOptions().dtype(at::kFloat));
      lr = static_cast<double>(static_cast<float>(lr));  // the value the kernel reads
    }
    bitfast::cpu::sgd_momentum_(p, g, o.momentum != 0 ? at::TensorList(m) : at::TensorList(no_buffers),
                                o.lr_tensor ? 1e9 : lr,  // ignored when the tensor is given
                                o.momentum, o.dampening, o.weight_decay, o.nesterov, o.maximize, first, lr_tensor,
                                ema ? at::TensorList(e) : at::TensorList(no_buffers), ema ? o.ema_decay : 0.0);
    Opt step = o;
    step.lr = lr;
    naive_step(p_ref, g_ref, m_ref, e_ref, step, first);
  }
  const double tol = f64 ? 1e-12 : 1e-5;
  for (size_t i = 0; i < p.size(); ++i) {
    expect_close(name + " p[" + std::to_string(i) + "]", p[i], p_ref[i], tol, tol);
    if (o.momentum != 0) expect_close(name + " m[" + std::to_string(i) + "]", m[i], m_ref[i], tol, tol);
    if (ema) expect_close(name + " e[" + std::to_string(i) + "]", e[i], e_ref[i], tol, tol);
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

  // the learning rate in a tensor, a moving average (float32 or float64 like the params)
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    for (bool lr_tensor : {false, true}) {
      Opt o{0.1, 0.9, 0.0, 1e-4, true, false};
      o.lr_tensor = lr_tensor;
      o.ema_decay = lr_tensor ? 0.75 : -1;
      run_case(dtype, o, 5);
      o.ema_decay = 0.0;  // the average is the new parameter
      run_case(dtype, o, 2);
    }
  }

  // argument checks: clear errors, no crash
  const std::vector<at::Tensor> p = {at::randn({3})}, g = {at::randn({3})}, none;
  const std::vector<at::Tensor> two = {at::randn({3}), at::randn({3})};
  const std::optional<at::Tensor> no_lr;
  expect_error("grads length", "expected one grad per param",
               [&] { bitfast::cpu::sgd_momentum_(p, two, none, 0.1, 0, 0, 0, false, false, false, no_lr, none, 0); });
  expect_error("buffers length", "needs one buffer per param",
               [&] { bitfast::cpu::sgd_momentum_(p, g, none, 0.1, 0.9, 0, 0, false, false, false, no_lr, none, 0); });
  expect_error("grad shape", "like params[0]", [&] {
    bitfast::cpu::sgd_momentum_(p, {at::randn({4})}, none, 0.1, 0, 0, 0, false, false, false, no_lr, none, 0);
  });
  expect_error("grad dtype", "like params[0]", [&] {
    bitfast::cpu::sgd_momentum_(p, {at::randn({3}, at::kDouble)}, none, 0.1, 0, 0, 0, false, false, false, no_lr,
                                none, 0);
  });
  expect_error("mixed dtypes", "one dtype and device per call", [&] {
    const std::vector<at::Tensor> mixed = {at::randn({3}), at::randn({3}, at::kDouble)};
    const std::vector<at::Tensor> mixed_g = {at::randn({3}), at::randn({3}, at::kDouble)};
    bitfast::cpu::sgd_momentum_(mixed, mixed_g, none, 0.1, 0, 0, 0, false, false, false, no_lr, none, 0);
  });
  expect_error("expanded param", "share memory", [&] {
    bitfast::cpu::sgd_momentum_({at::randn({1}).expand({3})}, g, none, 0.1, 0, 0, 0, false, false, false, no_lr,
                                none, 0);
  });
  expect_error("lr_tensor dtype", "expected one Float element", [&] {
    bitfast::cpu::sgd_momentum_(p, g, none, 0.1, 0, 0, 0, false, false, false,
                                at::full({}, 0.1, at::TensorOptions().dtype(at::kDouble)), none, 0);
  });
  expect_error("lr_tensor numel", "expected one Float element", [&] {
    bitfast::cpu::sgd_momentum_(p, g, none, 0.1, 0, 0, 0, false, false, false, at::zeros({2}), none, 0);
  });
  expect_error("ema length", "ema_params; expected none or one per param", [&] {
    bitfast::cpu::sgd_momentum_(p, g, none, 0.1, 0, 0, 0, false, false, false, no_lr, two, 0.5);
  });
  expect_error("ema decay", "expected 0 <= ema_decay < 1", [&] {
    bitfast::cpu::sgd_momentum_(p, g, none, 0.1, 0, 0, 0, false, false, false, no_lr, {at::randn({3})}, 1.0);
  });
  expect_error("ema dtype", "expected Float for Float params", [&] {
    bitfast::cpu::sgd_momentum_(p, g, none, 0.1, 0, 0, 0, false, false, false, no_lr,
                                {at::randn({3}, at::kDouble)}, 0.5);
  });
  expect_error("ema aliasing the param", "shares memory with params[0]", [&] {
    bitfast::cpu::sgd_momentum_(p, g, none, 0.1, 0, 0, 0, false, false, false, no_lr, p, 0.5);
  });
  return bitfast::test::finish("test_sgd_momentum");
}
