// The FMA peak probe's driver and its portable path (torch-free): every OpenMP thread runs the
// selected path's loop at once; the best of a few repeats is the machine's peak.
#include "cpu/peak.h"

#include <omp.h>

#include <algorithm>
#include <chrono>

#include "cpu/cpu_features.h"
#include "cpu/peak_kernel.h"
#include "cpu/peak_tile_kernel.h"
#include "cpu/tile_emu.h"
#include "cpu/vec_scalar.h"

namespace mmk {
namespace cpu {
namespace peak {

FmaLoop fma_loop_scalar() { return &FmaKernel<VScalar>::loop; }
DotLoop tile_loop_emulated() { return &TileKernel<TileEmu>::loop; }

namespace {

// Every OpenMP thread runs body(sink) at once; best of `repeats` of (operations / s) / 1e9.
template <class Body>
double best_rate(int64_t repeats, Body body) {
  double best = 0.0;
  for (int64_t r = 0; r < std::max<int64_t>(repeats, 1); ++r) {
    double ops = 0.0;
    float sinks[256] = {};
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel reduction(+ : ops)
    {
      ops += body(&sinks[omp_get_thread_num() % 256]);
    }
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    volatile float keep = sinks[0];
    (void)keep;
    best = std::max(best, ops / dt.count() / 1e9);
  }
  return best;
}

}  // namespace

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
  return best_rate(repeats, [&](float* sink) { return loop(iterations, sink); });
}

double dot_peak_gops(int kind, int64_t iterations, int64_t repeats, const char** error) {
  *error = nullptr;
  const Isa isa = selected_isa(error);
  if (*error != nullptr) return 0.0;
  DotLoop loop = nullptr;
  if (isa == Isa::Amx) loop = tile_loop_amx();
  if (isa == Isa::AmxEmulated) loop = tile_loop_emulated();
  if (isa == Isa::Avx512Bf16 && (kind == 0 || cpu_features().avx512_vnni)) loop = dot_loop_avx512();
  if (loop == nullptr) {
    *error = "dot_peak_gops: the selected CPU path has no bf16 / int8 dot-product instructions";
    return 0.0;
  }
  return best_rate(repeats, [&](float* sink) { return loop(kind, iterations, sink); });
}

}  // namespace peak
}  // namespace cpu
}  // namespace mmk
