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

// One thread: `iterations` rounds of the path's bf16 (kind 0) or int8 (kind 1) matrix / dot
// instructions on registers; returns the operations done (2 per multiply-add).
using DotLoop = double (*)(int kind, int64_t iterations, float* sink);

DotLoop tile_loop_amx();       // AMX tiles: tdpbf16ps / tdpbusd, 2x2 blocking (nullptr: non-x86)
DotLoop tile_loop_emulated();  // tile_emu.h (tests the driver; its figure means nothing)
DotLoop dot_loop_avx512();     // AVX-512 BF16 / VNNI: vdpbf16ps / vpdpbusd (nullptr: non-x86)

// GFLOP/s of every OpenMP thread running the selected path's loop at once, best of `repeats`.
// Sets *error (and returns 0) when MMKERNELS_CPU_ISA names a path this CPU cannot run.
double fma_peak_gflops(int64_t iterations, int64_t repeats, const char** error);

// The bf16 (kind 0) / int8 (kind 1) peak (GOP/s, every OpenMP thread at once, best of
// `repeats`) of the instructions the selected path computes bf16 / int8 products with: the AMX
// tiles (Amx; AmxEmulated runs the emulation), else vdpbf16ps / vpdpbusd (Avx512Bf16, and the
// CPU has VNNI for int8). Sets *error (and returns 0) on any other path.
double dot_peak_gops(int kind, int64_t iterations, int64_t repeats, const char** error);

}  // namespace peak
}  // namespace cpu
}  // namespace mmk
