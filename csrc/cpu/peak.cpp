// The FMA peak probe's driver and its portable path (torch-free): every OpenMP thread runs the
// selected path's loop at once; the best of a few repeats is the machine's peak.
#include "cpu/peak.h"

#include <omp.h>

#include <algorithm>
#include <chrono>

#include "cpu/cpu_features.h"
#include "cpu/peak_kernel.h"
#include "cpu/vec_scalar.h"

namespace mmk {
namespace cpu {
namespace peak {

FmaLoop fma_loop_scalar() { return &FmaKernel<VScalar>::loop; }

double fma_peak_gflops(int64_t iterations, int64_t repeats, const char** error) {
  *error = nullptr;
  const Isa isa = selected_isa(error);
  if (*error != nullptr) return 0.0;
  FmaLoop loop = fma_loop_scalar();
  if (isa >= Isa::Avx512 && fma_loop_avx512() != nullptr) {
    loop = fma_loop_avx512();
  } else if (isa >= Isa::Avx2 && fma_loop_avx2() != nullptr) {
    loop = fma_loop_avx2();
  }
  double best = 0.0;
  for (int64_t r = 0; r < std::max<int64_t>(repeats, 1); ++r) {
    double flops = 0.0;
    float sinks[256] = {};
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel reduction(+ : flops)
    {
      flops += loop(iterations, &sinks[omp_get_thread_num() % 256]);
    }
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    volatile float keep = sinks[0];
    (void)keep;
    best = std::max(best, flops / dt.count() / 1e9);
  }
  return best;
}

}  // namespace peak
}  // namespace cpu
}  // namespace mmk
