// 8-lane fp32 vector traits for the AVX2 + FMA translation units (the "V" of the kernels written
// once over vector traits: attention_kernel.h, reduce_kernel.h). Include only after
// MMK_TARGET_AVX2 (cpu_features.h); internal linkage throughout (see there).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace mmk {
namespace cpu {
namespace {

struct V256 {
  static constexpr int W = 8;
  using T = __m256;
  static inline T zero() { return _mm256_setzero_ps(); }
  static inline T set1(float x) { return _mm256_set1_ps(x); }
  static inline T load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static inline __m256i lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline T loadn(const float* p, int n) { return _mm256_maskload_ps(p, lanes(n)); }
  static inline void storen(float* p, T v, int n) { _mm256_maskstore_ps(p, lanes(n), v); }
  static inline T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static inline T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static inline T add(T a, T b) { return _mm256_add_ps(a, b); }
  static inline T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static inline T max(T a, T b) { return _mm256_max_ps(a, b); }
  static inline float hmax(T a) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
  static inline float hsum(T a) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
  static inline float first(T a) { return _mm256_cvtss_f32(a); }
  static inline T mask_ge(T x, int n) {
    return _mm256_blendv_ps(_mm256_set1_ps(-__builtin_inff()), x, _mm256_castsi256_ps(lanes(n)));
  }
  // Lanes of cb that are -inf, and x with those lanes set to -inf.
  using Mask = __m256;
  static inline Mask neginf_lanes(T cb) {
    return _mm256_cmp_ps(cb, _mm256_set1_ps(-__builtin_inff()), _CMP_EQ_OQ);
  }
  static inline T set_neginf(T x, Mask m) {
    return _mm256_blendv_ps(x, _mm256_set1_ps(-__builtin_inff()), m);
  }
  static inline bool any(Mask m) { return _mm256_movemask_ps(m) != 0; }
  // 2^x for x <= 0 (x = -inf -> 0, NaN -> NaN): n = round(x), 2^(x-n) by a degree-5 fit on
  // [-0.5, 0.5] (max relative error 1.7e-7), 2^n built in the exponent field (n = -127 gives +0).
  static inline T exp2(T x) {
    // vmaxps returns its second operand when one is NaN: x second, so NaN goes through (the
    // exponent part of a NaN lane is garbage, y is NaN, so the product is NaN).
    x = _mm256_max_ps(_mm256_set1_ps(-127.f), x);
    const T n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const T f = _mm256_sub_ps(x, n);
    T y = _mm256_set1_ps(1.3400432653725147e-3f);
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(9.676037356257439e-3f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(5.550327152013779e-2f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.402210682630539e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(6.931471824645996e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.0000001192092896f));
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    // Lanes below -125 get the scale +0 (exact 0, as on the AVX-512 path): 2^x there would be a
    // denormal or underflowing product (a microcode assist on Intel cores, by Intel's manual).
    // NaN lanes compare unordered and keep their (garbage) scale: y is NaN.
    const T live = _mm256_cmp_ps(x, _mm256_set1_ps(-125.f), _CMP_NLT_UQ);
    return _mm256_mul_ps(y, _mm256_and_ps(_mm256_castsi256_ps(e), live));
  }
  // Lanes [0, n) as a mask (n may be <= 0 or >= W); ordered a > b; and; where m: yes, else no.
  static inline Mask first_lanes(int64_t n) {
    return _mm256_castsi256_ps(lanes(n <= 0 ? 0 : n >= 8 ? 8 : (int)n));
  }
  static inline Mask gt(T a, T b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static inline Mask mask_and(Mask a, Mask b) { return _mm256_and_ps(a, b); }
  static inline T select(Mask m, T yes, T no) { return _mm256_blendv_ps(no, yes, m); }
  static inline T div(T a, T b) { return _mm256_div_ps(a, b); }
  // Keeps the compiler from fusing the operation that made x into a following add (an FMA would
  // round once where the reference rounds twice).
  static inline void opaque(T& x) { __asm__("" : "+x"(x)); }

  // int32 lanes (token indices).
  using I = __m256i;
  static inline I set1_i(int32_t x) { return _mm256_set1_epi32(x); }
  static inline I iota_i() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static inline I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  static inline I select_i(Mask m, I yes, I no) {
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(no), _mm256_castsi256_ps(yes), m));
  }
  static inline void store_i(int32_t* p, I v) { _mm256_storeu_si256((__m256i*)p, v); }
  static inline Mask eq(T a, T b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  // min of idx over the lanes of m (INT32_MAX when m is empty)
  static inline int32_t hmin_i(Mask m, I idx) {
    __m256i v = select_i(m, idx, _mm256_set1_epi32(INT32_MAX));
    __m128i x = _mm_min_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    x = _mm_min_epi32(x, _mm_shuffle_epi32(x, 0x4e));
    x = _mm_min_epi32(x, _mm_shuffle_epi32(x, 0xb1));
    return _mm_cvtsi128_si32(x);
  }

  // 16-bit lanes for n < 8 go through a zero-padded buffer (AVX2 has no 16-bit masked moves).
  static inline __m128i load_u16(const uint16_t* p, int n) {
    if (n >= 8) return _mm_loadu_si128((const __m128i*)p);
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n; ++i) buf[i] = p[i];
    return _mm_load_si128((const __m128i*)buf);
  }
  static inline void store_u16(uint16_t* p, __m128i h, int n) {
    if (n >= 8) {
      _mm_storeu_si128((__m128i*)p, h);
      return;
    }
    alignas(16) uint16_t buf[8];
    _mm_store_si128((__m128i*)buf, h);
    for (int i = 0; i < n; ++i) p[i] = buf[i];
  }
  // fp16 <-> fp32 for n lanes (F16C, round to nearest even).
  static inline T load_f16(const uint16_t* p, int n) { return _mm256_cvtph_ps(load_u16(p, n)); }
  static inline void store_f16(uint16_t* p, T v, int n) {
    store_u16(p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), n);
  }
  // bf16 <-> fp32 for n lanes; store_bf16 rounds to nearest even, NaN -> quiet NaN (as in
  // vec_avx512.h).
  static inline T load_bf16(const uint16_t* p, int n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load_u16(p, n)), 16));
  }
  static inline void store_bf16(uint16_t* p, T v, int n) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    store_u16(p, pack_u16(_mm256_blendv_epi8(bf16_rne(u), quiet, nan)), n);
  }
  // The same rounding with torch's NaN: every NaN lane stores 0x7fc0 (as c10::BFloat16).
  static inline void store_bf16_torch(uint16_t* p, T v, int n) {
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    const __m256i r =
        _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bf16_rne(_mm256_castps_si256(v))),
                                             _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)), nan));
    store_u16(p, pack_u16(r), n);
  }
  // bf16 bits of u rounded to nearest even, in the low half of each 32-bit lane.
  static inline __m256i bf16_rne(__m256i u) {
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))),
                             16);
  }
  // The low halves of the 32-bit lanes as 8 uint16 (they fit: packus does not saturate them; the
  // permute puts the two 64-bit halves of interest side by side).
  static inline __m128i pack_u16(__m256i r) {
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
  }

  static constexpr bool kPanel32 = false;
  static constexpr bool kBf16Vec = false;  // attention converts bf16 with scalar code on AVX2
  static void pack_panel32(const void*, int64_t, int, int, void*) {}
};

}  // namespace
}  // namespace cpu
}  // namespace mmk
