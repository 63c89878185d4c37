// bf16 pair-interleaved K/V packing and bf16 P rows, shared by the AVX-512 dot-product micro-kernel
// (MicroBf16Dot, attention_avx512.cpp) and the AMX one (MicroAmxBf16, attention_amx_kernel.h):
//   K panels: [panel][Dk/2][16 keys][2]   (64 bytes hold the (d, d+1) pair of 16 keys)
//   V:        [Lk_pad/2][Dvp][2]          (64 bytes hold the (j, j+1) pair of 16 columns)
// For AMX these are the B-tile ("VNNI") layouts directly: 32 dims of a panel are 16 rows x 64
// bytes at stride 64, and 32 keys of 16 output columns are 16 rows x 64 bytes at stride Dvp * 4.
// Include only after MMK_TARGET_AVX512 / MMK_TARGET_AMX; internal linkage (cpu_features.h).
#pragma once

#include "cpu/attention_kernel.h"
#include "cpu/vec_avx512.h"

namespace mmk {
namespace cpu {
namespace {

// Packs K and V of (sequence s, kv head kvh). Dk >= D (even): the panel's head dim, dims past D
// are zero (AMX pads D to a multiple of 32). Lk_pad = round_up(Lk, key_align) (key_align a
// multiple of 16): V pair rows past Lk are zero (AMX reads V 32 keys at a time). Columns past Dv
// are zero; Dvp = round_up(Dv, 16). sanitize_v: NaN / inf in V become 0 (rare path, attention.h).
inline void pack_bf16_pairs(const AttnParams& p, const AttnSeq& s, int kvh, uint16_t* kp,
                            uint16_t* vp, bool sanitize_v, int Dk, int key_align) {
  constexpr int W = 16;
  const int D = p.D, D2 = D / 2, Dv = p.Dv, Dvp = (int)round_up(Dv, W);
  const int64_t Lk = s.Lk, npan = ceil_div(Lk, W), Lkp = round_up(Lk, key_align);
  const int64_t kbase = s.bk * p.k_sb + kvh * p.k_sh + s.k_begin * p.k_ss;
  const int64_t vbase = s.bk * p.v_sb + kvh * p.v_sh + s.k_begin * p.v_ss;
  const uint16_t* k0p = (const uint16_t*)p.k + kbase;
  const uint16_t* v0p = (const uint16_t*)p.v + vbase;
  // As in MicroF32::pack: K rows two panels ahead into L1, V rows into L2.
  prefetch_rows<3>(k0p, p.k_ss * 2, 0, imin(Lk, 2 * W), D * 2);
  for (int64_t pn = 0; pn < npan; ++pn) {
    prefetch_rows<3>(k0p, p.k_ss * 2, imin(Lk, (pn + 2) * W), imin(Lk, (pn + 3) * W), D * 2);
    prefetch_rows<2>(v0p, p.v_ss * 2, pn * W, imin(Lk, (pn + 1) * W), Dv * 2);
    const int64_t j0 = pn * W;
    const int nrows = (int)(Lk - j0 < W ? Lk - j0 : W);
    uint16_t* dst = kp + pn * Dk * W;
    V512::pack_panel32(k0p + j0 * p.k_ss, p.k_ss * 2, nrows, D2, dst);
    if (Dk > D) std::memset(dst + D * W, 0, (size_t)(Dk - D) * W * 2);
  }
  // V pair rows: the 32-bit lane c of pair row j/2 is (V[j][c], V[j+1][c]); zero-extend row j,
  // shift row j+1 into the high half. Rows past Lk and columns past Dv are zero.
  for (int64_t j = 0; j < Lkp; j += 2) {
    uint16_t* dst = vp + j * Dvp;
    const uint16_t* ra = j < Lk ? v0p + j * p.v_ss : nullptr;
    const uint16_t* rb = j + 1 < Lk ? v0p + (j + 1) * p.v_ss : nullptr;
    for (int c = 0; c < Dvp; c += W) {
      const __mmask16 m = V512::lanes(Dv - c);
      const __m512i a =
          ra ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, ra + c)) : _mm512_setzero_si512();
      const __m512i b =
          rb ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, rb + c)) : _mm512_setzero_si512();
      _mm512_storeu_si512((void*)(dst + 2 * c), _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
  }
  // NaN / inf in V (rare path): 0 in the copy (see MicroF32::pack).
  if (sanitize_v) zero_nonfinite_bf16(vp, Lkp * Dvp);
}

// P as bf16 rows of kLDS elements (the probabilities P.V reads): 16 lanes of row r from key jv,
// rounded to nearest even (vcvtneps2bf16); and keys [0, n) of row r zeroed.
inline void store_p_bf16(float* P, int r, int jv, __m512 e) {
  uint16_t* dst = (uint16_t*)P + r * kLDS + jv;
  _mm256_storeu_si256((__m256i*)dst, (__m256i)_mm512_cvtneps_pbh(e));
}
inline void zero_p_bf16(float* P, int r, int n) {
  uint16_t* dst = (uint16_t*)P + r * kLDS;
  for (int j = 0; j < n; j += 16) _mm256_storeu_si256((__m256i*)(dst + j), _mm256_setzero_si256());
}

}  // namespace
}  // namespace cpu
}  // namespace mmk
