// A few helpers for bitfast's C++ kernel tests: each test binary counts its failures,
// prints each with its case, and exits non-zero when there were any (that is what ctest
// reads).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

namespace bitfast::test {

inline int& failures() {
  static int n = 0;
  return n;
}

// Compares got with want (both converted to double): |got - want| <= atol + rtol * |want|
// everywhere, NaN matching NaN.
inline void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, double atol,
                         double rtol) {
  if (got.sizes() != want.sizes()) {
    std::printf("FAIL %s: shape mismatch\n", what.c_str());
    ++failures();
    return;
  }
  const at::Tensor g = got.to(at::kDouble).contiguous().flatten(), w = want.to(at::kDouble).contiguous().flatten();
  const double* gp = g.const_data_ptr<double>();
  const double* wp = w.const_data_ptr<double>();
  double worst = 0;
  int64_t at_index = -1;
  for (int64_t i = 0; i < g.numel(); ++i) {
    if (std::isnan(gp[i]) && std::isnan(wp[i])) continue;
    const double err = std::abs(gp[i] - wp[i]) - (atol + rtol * std::abs(wp[i]));
    if (!(err <= 0) && (at_index < 0 || err > worst)) {
      worst = err;
      at_index = i;
    }
  }
  if (at_index >= 0) {
    std::printf("FAIL %s: element %lld is %.17g, expected %.17g (atol %g, rtol %g)\n", what.c_str(),
                static_cast<long long>(at_index), gp[at_index], wp[at_index], atol, rtol);
    ++failures();
  }
}

// Runs f and expects it to throw c10::Error whose message contains needle.
template <typename F>
void expect_error(const std::string& what, const std::string& needle, F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    if (std::string(e.what_without_backtrace()).find(needle) == std::string::npos) {
      std::printf("FAIL %s: error message lacks '%s': %s\n", what.c_str(), needle.c_str(), e.what_without_backtrace());
      ++failures();
    }
    return;
  }
  std::printf("FAIL %s: no error raised\n", what.c_str());
  ++failures();
}

inline int finish(const char* name) {
  if (failures()) {
    std::printf("%s: %d failure(s)\n", name, failures());
    return 1;
  }
  std::printf("%s: all passed\n", name);
  return 0;
}

}  // namespace bitfast::test
