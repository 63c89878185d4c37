// The AMX quantized-matmul kernels (qmatmul_amx_kernel.h) over emulated tiles (tile_emu.h): table
// "amx_emulated", only with MMKERNELS_CPU_ISA=amx_emulated, so that the tests run the AMX code
// (tiling, K tails, staging, epilogues) on CPUs without AMX. Compiled for AVX-512
// (MMK_TARGET_AVX512): no tile instruction in this object. Slow: for tests only.
#include "cpu/cpu_features.h"
#include "cpu/qmatmul.h"

#ifdef MMK_X86
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12: _mm512_slli_epi32
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

MMK_TARGET_AVX512
#include "cpu/tile_emu.h"
#include "cpu/qmatmul_amx_kernel.h"

namespace mmk {
namespace cpu {
namespace qmm {
const QmmImpl* qmm_impl_amx_emulated() { return AmxKernels<TileEmu>::table("amx_emulated"); }
}  // namespace qmm
}  // namespace cpu
}  // namespace mmk

#else
namespace mmk {
namespace cpu {
namespace qmm {
const QmmImpl* qmm_impl_amx_emulated() { return nullptr; }
}  // namespace qmm
}  // namespace cpu
}  // namespace mmk
#endif
