// AVX512 FMA peak loop: peak_kernel.h over the AVX512 vector traits (compiled for AVX512 by
// MMK_TARGET_AVX512, cpu_features.h; chosen at run time). No torch headers.
#include "cpu/cpu_features.h"
#include "cpu/peak.h"

#ifdef MMK_X86
#include <immintrin.h>

#include <cstdint>

MMK_TARGET_AVX512
#include "cpu/peak_kernel.h"
#include "cpu/vec_avx512.h"

namespace mmk {
namespace cpu {
namespace peak {

FmaLoop fma_loop_avx512() { return &FmaKernel<V512>::loop; }

namespace {

// AVX-512 BF16 / VNNI dot-product peak: kind 0 vdpbf16ps (32 bf16 multiply-adds per
// instruction), kind 1 vpdpbusd (64 int8 multiply-adds), on 12 independent register chains.
double dot_loop(int kind, int64_t iterations, float* sink) {
  constexpr int kChains = 12;
  __m512 acc[kChains];
  __m512i iacc[kChains];
  for (int i = 0; i < kChains; ++i) {
    acc[i] = _mm512_set1_ps(1e-3f * i);
    iacc[i] = _mm512_set1_epi32(i);
  }
  const __m512i a = _mm512_set1_epi16(0x3f80), b = _mm512_set1_epi16(0x0080);  // bf16 1, tiny
  if (kind == 0) {
    for (int64_t it = 0; it < iterations; ++it)
      for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)a, (__m512bh)b);
  } else {
    for (int64_t it = 0; it < iterations; ++it)
      for (int i = 0; i < kChains; ++i) iacc[i] = _mm512_dpbusd_epi32(iacc[i], a, b);
  }
  __m512 sum = acc[0];
  __m512i isum = iacc[0];
  for (int i = 1; i < kChains; ++i) {
    sum = _mm512_add_ps(sum, acc[i]);
    isum = _mm512_add_epi32(isum, iacc[i]);
  }
  *sink = _mm512_reduce_add_ps(sum) + (float)_mm512_reduce_add_epi32(isum);
  return 2.0 * 16 * (kind == 0 ? 2 : 4) * kChains * (double)iterations;
}

}  // namespace

DotLoop dot_loop_avx512() { return &dot_loop; }

}  // namespace peak
}  // namespace cpu
}  // namespace mmk

#else  // not x86
namespace mmk {
namespace cpu {
namespace peak {
FmaLoop fma_loop_avx512() { return nullptr; }
DotLoop dot_loop_avx512() { return nullptr; }
}  // namespace peak
}  // namespace cpu
}  // namespace mmk
#endif
