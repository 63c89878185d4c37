// AMX quantized-matmul path (table "amx"): the tile kernels of qmatmul_amx_kernel.h on the real
// tmm registers (tile_amx.h), compiled for AMX by MMK_TARGET_AMX and chosen at run time on CPUs
// with AMX once the tile-data permission is granted (cpu_features.h). NOT run on AMX hardware yet:
// the same kernel code is tested over emulated tiles (qmatmul_amx_emu.cpp, "amx_emulated").
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

MMK_TARGET_AMX
#include "cpu/tile_amx.h"
#include "cpu/qmatmul_amx_kernel.h"

namespace mmk {
namespace cpu {
namespace qmm {
const QmmImpl* qmm_impl_amx() { return AmxKernels<TileAmx>::table("amx"); }
}  // namespace qmm
}  // namespace cpu
}  // namespace mmk

#else
namespace mmk {
namespace cpu {
namespace qmm {
const QmmImpl* qmm_impl_amx() { return nullptr; }
}  // namespace qmm
}  // namespace cpu
}  // namespace mmk
#endif
