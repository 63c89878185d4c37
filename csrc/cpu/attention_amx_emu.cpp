// The AMX attention kernel over emulated tiles ("amx_emulated"): the micro-kernel of
// attention_amx_kernel.h with TileEmu (tile_emu.h, every tile instruction in plain C++), so that
// its packing, tiling, padding and epilogues run on CPUs without AMX. Only selected with
// MMKERNELS_CPU_ISA=amx_emulated (tests; slow). bf16 only, like "amx". Compiled for AVX-512 by
// MMK_TARGET_AVX512 (no AMX instruction in this file). No torch headers (see attention.h).
#include "cpu/attention.h"
#include "cpu/cpu_features.h"

#ifdef MMK_X86
// GCC 12 reports false "may be used uninitialized" inside its own _mm512_reduce_* intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>
#include <cstring>

MMK_TARGET_AVX512
#include "cpu/attention_amx_kernel.h"
#include "cpu/tile_emu.h"

namespace mmk {
namespace cpu {
namespace {

using MEmu = MicroAmxBf16<TileEmu>;
using KEmu = AttnKernel<V512, MEmu>;
// W = 32: the driver sizes the packs for keys padded to 32 (a P.V tile reads 32 keys).
constexpr int kDAlign = MEmu::kDAlign;
constexpr const char* kName = "amx_emulated";
const AttnImpl kImplEmu = {kName, 32, 2, 16, &KEmu::pack, &KEmu::run, &any_nonfinite, kDAlign};

}  // namespace

const AttnImpl* attn_impl_amx_emulated(int dtype) { return dtype == kBF16 ? &kImplEmu : nullptr; }

}  // namespace cpu
}  // namespace mmk

#else  // not x86
namespace mmk {
namespace cpu {
const AttnImpl* attn_impl_amx_emulated(int) { return nullptr; }
}  // namespace cpu
}  // namespace mmk
#endif
