// 16-lane fp32 vector traits for the AVX-512 translation units (the "V" of the kernels written once
// over vector traits: attention_kernel.h, reduce_kernel.h). Include only after MMK_TARGET_AVX512
// (cpu_features.h); internal linkage throughout (see there).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace mmk {
namespace cpu {
namespace {

struct V512 {
  static constexpr int W = 16;
  using T = __m512;
  static inline T zero() { return _mm512_setzero_ps(); }
  static inline T set1(float x) { return _mm512_set1_ps(x); }
  static inline T load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static inline __mmask16 lanes(int n) {
    return n <= 0 ? (__mmask16)0 : n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
  }
  static inline T loadn(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
  static inline void storen(float* p, T v, int n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
  static inline T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static inline T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static inline T add(T a, T b) { return _mm512_add_ps(a, b); }
  static inline T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static inline T max(T a, T b) { return _mm512_max_ps(a, b); }
  static inline float hmax(T a) { return _mm512_reduce_max_ps(a); }
  static inline float hsum(T a) { return _mm512_reduce_add_ps(a); }
  static inline float first(T a) { return _mm512_cvtss_f32(a); }
  // lanes >= n become -inf
  static inline T mask_ge(T x, int n) {
    return _mm512_mask_blend_ps(lanes(n), _mm512_set1_ps(-__builtin_inff()), x);
  }
  // Lanes of cb that are -inf, and x with those lanes set to -inf.
  using Mask = __mmask16;
  static inline Mask neginf_lanes(T cb) {
    return _mm512_cmp_ps_mask(cb, _mm512_set1_ps(-__builtin_inff()), _CMP_EQ_OQ);
  }
  static inline T set_neginf(T x, Mask m) {
    return _mm512_mask_mov_ps(x, m, _mm512_set1_ps(-__builtin_inff()));
  }
  static inline bool any(Mask m) { return m != 0; }
  // 2^x for x <= 0 (x = -inf -> 0, NaN -> NaN): n = round(x), 2^(x-n) by a degree-5 fit on
  // [-0.5, 0.5] (max relative error 1.7e-7), scaled by 2^n with vscalefps. Lanes below -125 are
  // 0 without being computed (zero-masked): a result there would be denormal or underflow, which
  // Intel cores compute in a microcode assist (~100 cycles by Intel's manual; unmeasured here),
  // and every -inf lane of a masked or ragged key block would make one. Results stay normal or 0.
  static inline T exp2(T x) {
    // vmaxps returns its second operand when one is NaN: x second, so NaN goes through.
    x = _mm512_max_ps(_mm512_set1_ps(-150.f), x);
    const T n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const T f = _mm512_sub_ps(x, n);
    T y = _mm512_set1_ps(1.3400432653725147e-3f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.676037356257439e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.550327152013779e-2f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.402210682630539e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.931471824645996e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0000001192092896f));
    // Live lanes: x >= -125, or NaN (unordered compare true), which must go through.
    const Mask live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.f), _CMP_NLT_UQ);
    return _mm512_maskz_scalef_ps(live, y, n);
  }

  // Lanes [0, n) as a mask (n may be <= 0 or >= W); ordered a > b; and; where m: yes, else no.
  static inline Mask first_lanes(int64_t n) { return lanes(n <= 0 ? 0 : n >= 16 ? 16 : (int)n); }
  static inline Mask gt(T a, T b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static inline Mask mask_and(Mask a, Mask b) { return a & b; }
  static inline T select(Mask m, T yes, T no) { return _mm512_mask_blend_ps(m, no, yes); }
  static inline T div(T a, T b) { return _mm512_div_ps(a, b); }
  // Keeps the compiler from fusing the operation that made x into a following add (an FMA would
  // round once where the reference rounds twice).
  static inline void opaque(T& x) { __asm__("" : "+v"(x)); }

  // int32 lanes (token indices).
  using I = __m512i;
  static inline I set1_i(int32_t x) { return _mm512_set1_epi32(x); }
  static inline I iota_i() {
    return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  static inline I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  static inline I select_i(Mask m, I yes, I no) { return _mm512_mask_blend_epi32(m, no, yes); }
  static inline void store_i(int32_t* p, I v) { _mm512_storeu_si512((void*)p, v); }
  static inline Mask eq(T a, T b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  // min of idx over the lanes of m (INT32_MAX when m is empty)
  static inline int32_t hmin_i(Mask m, I idx) { return _mm512_mask_reduce_min_epi32(m, idx); }

  // fp16 <-> fp32 for n lanes (F16C, round to nearest even).
  static inline T load_f16(const uint16_t* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes(n), p));
  }
  static inline void store_f16(uint16_t* p, T v, int n) {
    _mm256_mask_storeu_epi16(p, lanes(n),
                             _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  // bf16 <-> fp32 for n lanes, AVX-512F/BW integer ops only (so the plain "avx512" flavour stays
  // free of BF16 instructions). store_bf16 rounds to nearest even like f32_to_bf16.
  static constexpr bool kBf16Vec = true;
  static inline T load_bf16(const uint16_t* p, int n) {
    const __m512i x = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes(n), p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  }
  static inline void store_bf16(uint16_t* p, T v, int n) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_mask_storeu_epi16(p, lanes(n), _mm512_cvtepi32_epi16(r));
  }  // The same rounding with torch's NaN: every NaN lane stores 0x7fc0 (as c10::BFloat16).
  static inline void store_bf16_torch(uint16_t* p, T v, int n) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16(p, lanes(n), _mm512_cvtepi32_epi16(r));
  }

  // Panel packing: dst[c * 16 + w] = row_w[c] for 32-bit elements, c < ncols (a multiple of 4),
  // w < 16; rows w >= nrows are zero. 16x16 register transposes.
  static constexpr bool kPanel32 = true;
  static inline void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
      const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
      u[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
      u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
      u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
      u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const __m512 v0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88);
      const __m512 v1 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xdd);
      const __m512 v2 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88);
      const __m512 v3 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xdd);
      r[k] = _mm512_shuffle_f32x4(v0, v2, 0x88);
      r[8 + k] = _mm512_shuffle_f32x4(v0, v2, 0xdd);
      r[4 + k] = _mm512_shuffle_f32x4(v1, v3, 0x88);
      r[12 + k] = _mm512_shuffle_f32x4(v1, v3, 0xdd);
    }
  }
  static void pack_panel32(const void* row0, int64_t row_bytes, int nrows, int ncols, void* dst_) {
    float* dst = (float*)dst_;
    for (int c0 = 0; c0 < ncols; c0 += 16) {
      const int nc = ncols - c0 < 16 ? ncols - c0 : 16;
      const __mmask16 m = lanes(nc);
      __m512 r[16];
#pragma GCC unroll 16
      for (int w = 0; w < 16; ++w)
        r[w] = w < nrows ? _mm512_maskz_loadu_ps(m, (const char*)row0 + w * row_bytes + c0 * 4)
                         : _mm512_setzero_ps();
      transpose16(r);
      for (int c = 0; c < nc; ++c) _mm512_storeu_ps(dst + (c0 + c) * 16, r[c]);
    }
  }
};

}  // namespace
}  // namespace cpu
}  // namespace mmk
