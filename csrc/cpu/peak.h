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

// One thread: `iterations` rounds of four independent tile products (kind 0: bf16 tdpbf16ps,
// kind 1: int8 tdpbusd) on registers; returns the operations done (2 per multiply-add).
using TileLoop = double (*)(int kind, int64_t iterations, float* sink);

TileLoop tile_loop_amx();       // the real tiles; nullptr where not built (non-x86)
TileLoop tile_loop_emulated();  // tile_emu.h (tests the driver; its figure means nothing)

// GFLOP/s of every OpenMP thread running the selected path's loop at once, best of `repeats`.
// Sets *error (and returns 0) when MMKERNELS_CPU_ISA names a path this CPU cannot run.
double fma_peak_gflops(int64_t iterations, int64_t repeats, const char** error);

// The AMX tiles' peak (GOP/s, every OpenMP thread at once, best of `repeats`) for kind 0 (bf16)
// or 1 (int8), on the selected path: Amx (real tiles) or AmxEmulated. Sets *error (and returns
// 0) on any other path.
double tile_peak_gops(int kind, int64_t iterations, int64_t repeats, const char** error);

}  // namespace peak
}  // namespace cpu
}  // namespace mmk
