// AVX2 + FMA attention path (compiled for AVX2 + FMA by MMK_TARGET_AVX2, cpu_features.h). fp32 micro-kernels;
// bf16 inputs are widened to fp32 when packing. No torch headers in this file (see attention.h).
#include "cpu/attention.h"
#include "cpu/cpu_features.h"

#ifdef MMK_X86
#include <immintrin.h>

#include <cstdint>
#include <cstring>

MMK_TARGET_AVX2
#include "cpu/attention_kernel.h"

namespace mmk {
namespace cpu {
namespace {

struct V256 {
  static constexpr int W = 8;
  static constexpr int RS = 6;   // S tile: 6 rows x 2 panels = 12 accumulators
  static constexpr int RPV = 4;  // P.V tile: 4 rows x up to 2 vectors
  static constexpr int CPV = 2;
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
    return _mm256_blendv_ps(_mm256_set1_ps(kNegInf), x, _mm256_castsi256_ps(lanes(n)));
  }
  // Lanes of cb that are -inf, and x with those lanes set to -inf.
  using Mask = __m256;
  static inline Mask neginf_lanes(T cb) { return _mm256_cmp_ps(cb, _mm256_set1_ps(kNegInf), _CMP_EQ_OQ); }
  static inline T set_neginf(T x, Mask m) { return _mm256_blendv_ps(x, _mm256_set1_ps(kNegInf), m); }
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
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  }
  static constexpr bool kPanel32 = false;
  static constexpr bool kBf16Vec = false;  // no load_bf16 / store_bf16: scalar conversions
  static void pack_panel32(const void*, int64_t, int, int, void*) {}
};

using K256 = AttnKernel<V256, MicroF32<V256>>;
const AttnImpl kImpl = {"avx2", 8, 4, 6, &K256::pack, &K256::run};

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
