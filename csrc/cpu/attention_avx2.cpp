// AVX2 + FMA attention path (compiled for AVX2 + FMA by MMK_TARGET_AVX2, cpu_features.h). fp32
// micro-kernels; bf16 inputs are widened to fp32 when packing. No torch headers in this file (see
// attention.h).
#include "cpu/attention.h"
#include "cpu/cpu_features.h"

#ifdef MMK_X86
#include <immintrin.h>

#include <cstdint>
#include <cstring>

MMK_TARGET_AVX2
#include "cpu/attention_kernel.h"
#include "cpu/vec_avx2.h"

namespace mmk {
namespace cpu {
namespace {

// Attention's register tiles on 8-lane vectors.
struct AttnV256 : V256 {
  static constexpr int RS = 6;   // S tile: 6 rows x 2 panels = 12 accumulators
  static constexpr int RPV = 4;  // P.V tile: 4 rows x up to 2 vectors
  static constexpr int CPV = 2;
};

using K256 = AttnKernel<AttnV256, MicroF32<AttnV256>>;
const AttnImpl kImpl = {"avx2", 8, 4, 6, &K256::pack, &K256::run, &any_nonfinite};

}  // namespace

const AttnImpl* attn_impl_avx2(int) { return &kImpl; }

}  // namespace cpu
}  // namespace mmk

#else  // not x86
namespace mmk {
namespace cpu {
const AttnImpl* attn_impl_avx2(int) { return nullptr; }
}  // namespace cpu
}  // namespace mmk
#endif
