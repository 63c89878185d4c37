// AMX attention path ("amx"): bf16 inputs, Q.K^T and P.V on the tile registers (tdpbf16ps) with
// the micro-kernel of attention_amx_kernel.h; fp32 accumulation, P rounded to bf16 for P.V as on
// the "avx512_bf16" path. Other dtypes return nullptr (the AVX-512 kernels serve them). Compiled
// for AVX-512 + AMX by MMK_TARGET_AMX (cpu_features.h); chosen only when cpu_features().amx (the
// tile-data permission granted). No torch headers in this file (see attention.h).
#include "cpu/attention.h"
#include "cpu/cpu_features.h"

#ifdef MMK_X86
// GCC 12 reports false "may be used uninitialized" inside its own _mm512_reduce_* intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>
#include <cstring>

MMK_TARGET_AMX
#include "cpu/attention_amx_kernel.h"
#include "cpu/tile_amx.h"

namespace mmk {
namespace cpu {
namespace {

using MAmx = MicroAmxBf16<TileAmx>;
using KAmx = AttnKernel<V512, MAmx>;
// W = 32: the driver sizes the packs for keys padded to 32 (a P.V tile reads 32 keys).
constexpr int kDAlign = MAmx::kDAlign;
const AttnImpl kImplAmx = {"amx", 32, 2, 16, &KAmx::pack, &KAmx::run, &any_nonfinite, kDAlign};

}  // namespace

const AttnImpl* attn_impl_amx(int dtype) { return dtype == kBF16 ? &kImplAmx : nullptr; }

}  // namespace cpu
}  // namespace mmk

#else  // not x86
namespace mmk {
namespace cpu {
const AttnImpl* attn_impl_amx(int) { return nullptr; }
}  // namespace cpu
}  // namespace mmk
#endif
