// A micro-benchmark of the NCHW row loops of bitfast's CPU norms (csrc/cpu/norm_rows.cpp),
// outside torch: the GroupNorm backward's per-row sums and dx pass over `tasks` groups of
// `rows` rows of L elements, and a BatchNorm channel's statistics over N rows of L elements
// C * L apart (summed row by row with rows::sum, then with rows::sum_rows), and the three
// passes of a BatchNorm forward over such channels (bnf). One thread.
//
// It links norm_rows.cpp compiled as the extension compiles it, so a change to the loops can
// be timed in seconds, and for each instruction-set clone separately: build it once with
// the target_clones of csrc/cpu/simd.h (the clone the CPU picks, as in bitfast._C), and once
// per level with the clones turned off and -march set (a copy of simd.h whose
// BITFAST_TARGET_CLONES is empty, first on the include path), to see the AVX2 and baseline
// code on an AVX-512 machine (add -DBITFAST_FORCE_REGS_FOR_SUMS=1 to the AVX2 build: the
// loops pick their AVX2 variant by the CPU, see regs_for_sums; and
// -DBITFAST_FORCE_SHORT_ROWS_IN_VECTORS=0 to the baseline build, whose short-row loops the
// CPU picks too, see short_rows_in_vectors). TI: torch's include flags, e.g.
//   TI=$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
//   TL=$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
//   g++ -O3 -ffp-contract=off -fopenmp -std=c++20 -Icsrc $TI -c csrc/cpu/norm_rows.cpp -o /tmp/nr.o
//   g++ -O3 -std=c++20 -Icsrc $TI tools/rows_bench.cpp /tmp/nr.o csrc/cpu/convert.cpp -fopenmp \
//       -L$TL -lc10 -Wl,-rpath,$TL -o /tmp/rows_bench
//   /tmp/rows_bench gn 256 64 16 bf16      # GroupNorm bwd: tasks, rows per group, L, fp32|bf16
//   /tmp/rows_bench bn 2048 16 16          # BatchNorm stats: C, N, L (fp32)
//   /tmp/rows_bench bnf 512 16 49 bf16     # BatchNorm forward passes: C, N, L, fp32|bf16
// The checksum line lets two builds be compared for identical results.
#include "cpu/norm_rows.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

using namespace bitfast::cpu::rows;

namespace {

template <typename F>
double best_us(F&& f, int reps = 10, int rounds = 7) {
  double best = 1e30;
  for (int r = 0; r < rounds; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f();
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, us / reps);
  }
  return best;
}

int gn(int64_t tasks, int64_t rows, int64_t L, bool bf16) {
  const int64_t M = rows * L, total = tasks * M;
  std::vector<float> x(total), dy(total), dx(total);
  std::vector<c10::BFloat16> xb(total), dyb(total), dxb(total);
  std::mt19937 gen(0);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < total; ++i) {
    x[i] = nd(gen);
    dy[i] = nd(gen);
    xb[i] = x[i];
    dyb[i] = dy[i];
  }
  std::vector<float> s(rows, 1.1f), t(rows, 0.1f), m(rows, 0.01f), a(rows, 0.5f), kx(rows, 0.2f), k0(rows, 0.3f);
  std::vector<double> sd(rows), sx(rows);
  double check = 0;
  const auto sums = [&] {
    for (int64_t k = 0; k < tasks; ++k) {
      const int64_t o = k * M;
      if (bf16) {
        planar_bwd_sums(dyb.data() + o, xb.data() + o, rows, L, L, s.data(), t.data(), m.data(), true, sd.data(),
                        sx.data());
      } else {
        planar_bwd_sums(dy.data() + o, x.data() + o, rows, L, L, s.data(), t.data(), m.data(), true, sd.data(),
                        sx.data());
      }
      check += sd[0] + sx[rows - 1];
    }
  };
  const auto dxs = [&] {
    for (int64_t k = 0; k < tasks; ++k) {
      const int64_t o = k * M;
      if (bf16) {
        planar_bwd_dx(dyb.data() + o, xb.data() + o, dxb.data() + o, rows, L, L, s.data(), t.data(), a.data(),
                      kx.data(), k0.data(), true);
      } else {
        planar_bwd_dx(dy.data() + o, x.data() + o, dx.data() + o, rows, L, L, s.data(), t.data(), a.data(),
                      kx.data(), k0.data(), true);
      }
    }
  };
  const double t_sums = best_us(sums), t_dx = best_us(dxs);
  check = 0;
  sums();
  std::printf("gn %s tasks %lld rows %lld L %lld: sums %.1f us, dx %.1f us (%.3f ns per element in all); check %.10g\n",
              bf16 ? "bf16" : "fp32", (long long)tasks, (long long)rows, (long long)L, t_sums, t_dx,
              (t_sums + t_dx) * 1e3 / double(total), check);
  return 0;
}

#ifndef ROWS_BENCH_GN_ONLY  // (define it to time a build of norm_rows.cpp older than sum_rows)
int bn(int64_t C, int64_t N, int64_t L) {
  const int64_t stride = C * L;
  std::vector<float> x(C * N * L);
  std::mt19937 gen(0);
  std::normal_distribution<float> nd;
  for (auto& v : x) v = nd(gen);
  double check_rows = 0, check_sum = 0;
  const auto per_row = [&] {
    for (int64_t c = 0; c < C; ++c) {
      const float* xc = x.data() + c * L;
      double t = 0, q = 0;
      for (int64_t n = 0; n < N; ++n) t += sum(xc + n * stride, L);
      const float mean = float(t / double(N * L));
      for (int64_t n = 0; n < N; ++n) q += sum_sq_dev(xc + n * stride, L, mean);
      check_rows += t + q;
    }
  };
  const auto together = [&] {
    for (int64_t c = 0; c < C; ++c) {
      const float* xc = x.data() + c * L;
      const double t = sum_rows(xc, N, L, stride);
      check_sum += t + sum_sq_dev_rows(xc, N, L, stride, float(t / double(N * L)));
    }
  };
  const double a = best_us(per_row), b = best_us(together);
  check_rows = check_sum = 0;
  per_row();
  together();
  std::printf("bn C %lld N %lld L %lld: row by row %.1f us, sum_rows %.1f us (%.2fx); checks %.10g %.10g\n",
              (long long)C, (long long)N, (long long)L, a, b, a / b, check_rows, check_sum);
  return 0;
}

// BatchNorm forward in training, per channel: the two statistics passes and the affine pass
// over N rows of L elements C * L apart, each timed alone over all channels, then the three
// channel by channel as the kernel runs them.
int bnf(int64_t C, int64_t N, int64_t L, bool bf16) {
  const int64_t stride = C * L, total = C * N * L;
  std::vector<float> x(total), y(total);
  std::vector<c10::BFloat16> xb(total), yb(total);
  std::mt19937 gen(0);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < total; ++i) {
    x[i] = nd(gen);
    xb[i] = x[i];
  }
  std::vector<float> mean(C), s(N, 1.1f), t(N, 0.1f);
  double check = 0;
  const auto stat1 = [&] {
    for (int64_t c = 0; c < C; ++c) {
      const double v = bf16 ? sum_rows(xb.data() + c * L, N, L, stride) : sum_rows(x.data() + c * L, N, L, stride);
      mean[c] = float(v / double(N * L));
    }
  };
  const auto stat2 = [&] {
    for (int64_t c = 0; c < C; ++c) {
      check += bf16 ? sum_sq_dev_rows(xb.data() + c * L, N, L, stride, mean[c])
                    : sum_sq_dev_rows(x.data() + c * L, N, L, stride, mean[c]);
    }
  };
  const auto affine = [&] {
    for (int64_t c = 0; c < C; ++c) {
      if (bf16) {
        planar_affine(xb.data() + c * L, yb.data() + c * L, N, L, stride, s.data(), t.data(), true);
      } else {
        planar_affine(x.data() + c * L, y.data() + c * L, N, L, stride, s.data(), t.data(), true);
      }
    }
  };
  // the kernel's order: the three passes over one channel, then the next channel
  const auto channels = [&] {
    for (int64_t c = 0; c < C; ++c) {
      if (bf16) {
        const auto* xc = xb.data() + c * L;
        const float m = float(sum_rows(xc, N, L, stride) / double(N * L));
        check += sum_sq_dev_rows(xc, N, L, stride, m);
        planar_affine(xc, yb.data() + c * L, N, L, stride, s.data(), t.data(), true);
      } else {
        const auto* xc = x.data() + c * L;
        const float m = float(sum_rows(xc, N, L, stride) / double(N * L));
        check += sum_sq_dev_rows(xc, N, L, stride, m);
        planar_affine(xc, y.data() + c * L, N, L, stride, s.data(), t.data(), true);
      }
    }
  };
  const double a = best_us(stat1), b = best_us(stat2), d = best_us(affine), e = best_us(channels);
  check = 0;
  stat1();
  stat2();
  std::printf("bnf %s C %lld N %lld L %lld: sum %.1f us, sum_sq_dev %.1f us, affine %.1f us, the three per channel "
              "%.1f us (%.3f ns per element); check %.10g\n",
              bf16 ? "bf16" : "fp32", (long long)C, (long long)N, (long long)L, a, b, d, e, e * 1e3 / double(total),
              check);
  return 0;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 5 && std::strcmp(argv[1], "gn") == 0) {
    return gn(std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]), argc > 5 && std::strcmp(argv[5], "bf16") == 0);
  }
#ifndef ROWS_BENCH_GN_ONLY
  if (argc >= 5 && std::strcmp(argv[1], "bn") == 0) return bn(std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]));
  if (argc >= 5 && std::strcmp(argv[1], "bnf") == 0) {
    return bnf(std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]), argc > 5 && std::strcmp(argv[5], "bf16") == 0);
  }
#endif
  std::fprintf(stderr, "usage: rows_bench gn TASKS ROWS L [fp32|bf16] | rows_bench bn C N L | rows_bench bnf C N L [fp32|bf16]\n");
  return 2;
}
