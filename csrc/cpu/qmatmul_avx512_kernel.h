// AVX-512 pieces of the quantized matmul shared by the AVX-512 path (qmatmul_avx512.cpp) and the
// AMX paths (qmatmul_amx_kernel.h), which decode the same bf16 panels and run the same W8A8 and
// output epilogues so that their results match: output stores, the bf16 panel decode of the gemm,
// the gemm's and W8A8's epilogues. Layouts: qmatmul.h.
//
// Include ONLY after the file's MMK_TARGET_AVX512 / MMK_TARGET_AMX pragma, after <immintrin.h>
// and <algorithm>: everything here has internal linkage (see cpu_features.h).
#pragma once

#include "cpu/qmatmul_kernel.h"
#include "cpu/vec_avx512.h"

namespace mmk {
namespace cpu {
namespace qmm {
namespace {

constexpr int64_t kStripK = kStrip;
constexpr int64_t KC_BF16 = 512;  // bf16 gemm: features per decoded panel (256 pairs x 64 x 4 B)

inline __mmask16 lanes16(int64_t n) {
  return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

// fp32 -> bf16 bits with round to nearest even, like torch's .to(torch.bfloat16) (denormals kept;
// NaN stays a quiet NaN). Integer arithmetic, so it needs no AVX512-BF16.
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// x lanes as fp32: fp32, bf16 or fp16 (vcvtph2ps, exact).
inline __m512 load_x(const void* x, int dtype, int64_t off, __mmask16 m) {
  if (dtype == kF32) return _mm512_maskz_loadu_ps(m, (const float*)x + off);
  if (dtype == kBF16) return load_bf16((const uint16_t*)x + off, m);
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t*)x + off));
}

// ---- activations (Act in qmatmul.h), 16 lanes -------------------------------------------------
// Every exponential has a non-positive argument (V512::exp2's domain, max relative error 1.7e-7;
// 0 below 2^-125). NaN lanes stay NaN; +inf lanes give +inf; -inf lanes give NaN except relu's 0
// (torch's activations do the same, but its vectorised float32 gelu gives NaN at +inf).

inline __m512 neg_abs(__m512 a) {  // -|a| (NaN stays NaN)
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN)));
}

inline __m512 exp_nonpos(__m512 y) {  // e^y for y <= 0
  return V512::exp2(_mm512_mul_ps(y, _mm512_set1_ps(1.4426950408889634f)));
}

// x * sigmoid(a) = x / (1 + e) for a >= 0, x e / (1 + e) for a < 0, with e = exp(-|a|).
inline __m512 times_sigmoid(__m512 x, __m512 a) {
  const __m512 e = exp_nonpos(neg_abs(a));
  const __mmask16 neg = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_div_ps(_mm512_mask_mul_ps(x, neg, x, e), _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

// x / 2 * (1 + erf(x / sqrt 2)) = x (1 - q / 2) for x >= 0 and x q / 2 for x < 0, q = erfc(|x| /
// sqrt 2) by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7: the approximation torch's
// vectorised erf uses), so no cancellation for negative x. Lanes with |x| / sqrt 2 > 9 take q = 0
// (gelu(x) = x, or 0 for x below -12.7 where it is under 1e-35), computed masked: no denormal.
inline __m512 gelu_erf(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));
  const __mmask16 near = _mm512_cmp_ps_mask(z, _mm512_set1_ps(9.f), _CMP_LE_OQ);
  const __m512 t =
      _mm512_maskz_div_ps(near, one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), z, one));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  const __m512 half_e =
      _mm512_mul_ps(exp_nonpos(neg_abs(_mm512_mul_ps(z, z))), _mm512_set1_ps(0.5f));
  const __m512 half_q = _mm512_maskz_mul_ps(near, _mm512_mul_ps(p, t), half_e);
  const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mul_ps(x, _mm512_mask_blend_ps(neg, _mm512_sub_ps(one, half_q), half_q));
}

// Out of line: the epilogues that call it stay small in the common case (no activation).
__attribute__((noinline)) __m512 activate(__m512 v, int act) {
  switch (act) {
    case kActRelu:
      return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), v,
                                  _mm512_setzero_ps());
    case kActGelu:     return gelu_erf(v);
    case kActGeluTanh: {  // a = 2 sqrt(2 / pi) (v + 0.044715 v^3)
      const __m512 v2 = _mm512_mul_ps(v, v);
      const __m512 c = _mm512_fmadd_ps(v2, _mm512_set1_ps(0.07135481627159207f),
                                       _mm512_set1_ps(1.5957691216057307f));
      return times_sigmoid(v, _mm512_mul_ps(v, c));
    }
    case kActQuickGelu: return times_sigmoid(v, _mm512_mul_ps(v, _mm512_set1_ps(1.702f)));
    case kActSilu:      return times_sigmoid(v, v);
    default:            return v;
  }
}

// y[0 .. n) = act(v (+ bias)) in the output dtype.
inline void store_out(const Out& o, int64_t m, int64_t n0, __m512 v, __mmask16 mask) {
  if (o.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, o.bias + n0));
  if (o.act != kActNone) v = activate(v, o.act);
  if (o.dtype == kF32) {
    _mm512_mask_storeu_ps((float*)o.y + m * o.ldo + n0, mask, v);
  } else {
    // fp16: vcvtps2ph rounds to nearest even, overflows to inf, keeps NaN quiet (like fp16.h)
    const __m256i h = o.dtype == kBF16
                          ? to_bf16(v)
                          : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16((uint16_t*)o.y + m * o.ldo + n0, mask, h);
  }
}

// Unsigned values u of pair p for 16 channels (lanes) of column c of the strip: lo = feature 2p,
// hi = feature 2p + 1.
inline void load_pair(const GemmJob& j, int64_t strip, int64_t p, int c, __m512i& lo, __m512i& hi) {
  const int64_t unit = j.bits == 4 ? 1 : 2;
  const uint8_t* src = j.p.w + ((strip * j.p.P + p) * kStripK + 16 * c) * unit;
  if (j.bits == 4) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)src));
    lo = _mm512_and_si512(b, _mm512_set1_epi32(15));
    hi = _mm512_srli_epi32(b, 4);
  } else {
    const __m512i d = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)src));
    lo = _mm512_and_si512(d, _mm512_set1_epi32(255));
    hi = _mm512_srli_epi32(d, 8);
  }
}

// Pairs [p0, p1) of the strip (features 2 p0 .. 2 p1) into the panel, group by group.
template <bool BF16>
void decode_panel(const GemmJob& j, int64_t strip, int64_t p0, int64_t p1, void* panel) {
  const int64_t gp = j.gs / 2 > 0 ? j.gs / 2 : 1;  // pairs per group (gs is even unless G == 1)
  const int64_t col0 = strip * kStripK;
  for (int64_t pa = p0; pa < p1;) {
    const int64_t g = j.G == 1 ? 0 : pa / gp;
    const int64_t pb = j.G == 1 ? p1 : std::min(p1, (g + 1) * gp);
    __m512 sv[4];
    __m512i zv[4];
    for (int c = 0; c < 4; ++c) {
      sv[c] = _mm512_loadu_ps(j.p.sT + g * j.p.Npad + col0 + 16 * c);
      zv[c] = _mm512_loadu_si512(j.p.zT + g * j.p.Npad + col0 + 16 * c);
    }
    for (int64_t p = pa; p < pb; ++p) {
      for (int c = 0; c < 4; ++c) {
        __m512i lo, hi;
        load_pair(j, strip, p, c, lo, hi);
        const __m512 flo = _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, zv[c]));
        const __m512 fhi = _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, zv[c]));
        if (BF16) {
          // bf16(lo) in the low half of the lane, bf16(hi) in the high half (exact: integers)
          const __m512i pair = _mm512_or_si512(
              _mm512_srli_epi32(_mm512_castps_si512(flo), 16),
              _mm512_and_si512(_mm512_castps_si512(fhi), _mm512_set1_epi32((int)0xffff0000u)));
          _mm512_storeu_si512((uint32_t*)panel + (p - p0) * kStripK + 16 * c, pair);
        } else {
          float* dst = (float*)panel + 2 * (p - p0) * kStripK + 16 * c;
          _mm512_storeu_ps(dst, _mm512_mul_ps(flo, sv[c]));
          _mm512_storeu_ps(dst + kStripK, _mm512_mul_ps(fhi, sv[c]));
        }
      }
    }
    pa = pb;
  }
}

// gemm epilogue: rows [m0, m1) of C (64 fp32 per row, row m at C + (m - m0) * 64) into the
// strip's output channels; scale_out multiplies by the per-channel scales first.
inline void gemm_store(const GemmJob& j, int64_t m0, int64_t m1, int64_t strip, const float* C,
                       bool scale_out) {
  const int64_t n0 = strip * kStripK;
  for (int64_t m = m0; m < m1; ++m)
    for (int c = 0; c < 4; ++c) {
      const int64_t n = n0 + 16 * c;
      if (n >= j.N) break;
      __m512 v = _mm512_loadu_ps(C + (m - m0) * kStripK + 16 * c);
      if (scale_out) v = _mm512_mul_ps(v, _mm512_loadu_ps(j.p.sT + n));
      store_out(j.out, m, n, v, lanes16(j.N - n));
    }
}

// W8A8 epilogue of 16 output channels n .. n + 15 of row m from their int32 dot products acc:
// exact = acc - corr (symmetric: corr = 128 colsum, the x_q + 128 shift) or acc - corr * rowsum
// (asymmetric: corr = the zero points), then (exact * s_x) * s_w + bias, rounded step by step like
// the reference: no FMA (the build is ISO C++17, so GCC does not contract; tests check the result
// bit for bit).
template <bool SYM>
inline void a8_store16(const A8Job& j, int64_t m, int64_t n, __m512i acc, __m512i corr,
                       __m512i rowsum, __m512 sx, __m512 sw) {
  const __m512i exact = _mm512_sub_epi32(acc, SYM ? corr : _mm512_mullo_epi32(corr, rowsum));
  const __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(exact), sx), sw);
  store_out(j.out, m, n, y, lanes16(j.N - n));
}

}  // namespace
}  // namespace qmm
}  // namespace cpu
}  // namespace mmk
