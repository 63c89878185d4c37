// Machine peak probe: the float32 FMA throughput of the vector path this CPU runs, measured by a
// register-resident loop, so the bench can give each kernel's fraction of the machine's peak in
// the same run. No torch headers.
#pragma once

#include <cstdint>

namespace mmk {
namespace cpu {
namespace peak {

// One thread: `iterations` rounds of independent FMA chains on the path's vectors; returns the
// float32 flops done (the chains' sum goes to *sink so that the loop cannot be removed).
using FmaLoop = double (*)(int64_t iterations, float* sink);

FmaLoop fma_loop_avx512();  // nullptr where the path is not built (non-x86)
FmaLoop fma_loop_avx2();
FmaLoop fma_loop_scalar();

// GFLOP/s of every OpenMP thread running the selected path's loop at once, best of `repeats`.
// Sets *error (and returns 0) when MMKERNELS_CPU_ISA names a path this CPU cannot run.
double fma_peak_gflops(int64_t iterations, int64_t repeats, const char** error);

}  // namespace peak
}  // namespace cpu
}  // namespace mmk
