// AVX-512 kernels of the quantized matmul (compiled for AVX-512 by MMK_TARGET_AVX512,
// cpu_features.h; chosen at run time). The bf16 dot products (vdpbf16ps) are used only by the
// "avx512_bf16" table, the int8 dot products (vpdpbusd) only when the driver saw AVX512-VNNI in
// CPUID. No torch headers in this file (see qmatmul.h for the layouts).
#include "cpu/cpu_features.h"
#include "cpu/qmatmul.h"

#ifdef MMK_X86
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12: _mm512_reduce_* intrinsics
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

MMK_TARGET_AVX512
#include "cpu/qmatmul_avx512_kernel.h"

namespace mmk {
namespace cpu {
namespace qmm {
namespace {

// Software prefetch for the row-dot kernels, which stream each weight byte once: the same
// position PF_BLOCKS row blocks ahead (block = NB rows, `block_bytes` apart), into L2. The
// hardware prefetchers alone leave a single thread's stream of many short rows latency-bound
// (measured here: ~1.7x slower for a cold 4096 x 11008 int4 GEMV without it; L2 beat L1 as target).
constexpr int PF_BLOCKS = 4;
inline void prefetch_rows(const uint8_t* p, int64_t block_bytes) {
  _mm_prefetch((const char*)(p + PF_BLOCKS * block_bytes), _MM_HINT_T1);
}

// =============================================================================================
// rowdot: weight-only, small M, canonical layout.
//
// int4: 16 bytes of a row hold 32 weights; vpmovzxbd puts byte j in 32-bit lane j. vpermps only
// reads the low 4 bits of each index, so permuting a 16-entry table T by the raw lanes looks up
// the low nibbles, and by (lanes >> 4) the high nibbles, with no masking. T[u] = (u - z) * s (or
// signed(u) * s when symmetric) is exactly the reference's dequantized value, rebuilt once per
// (row, group). Low nibbles hold the even features, high nibbles the odd ones, so they are
// dotted with x's even / odd halves (split once per call by the driver).
// int8: 16 bytes -> 16 int32 lanes -> (q - z) -> fp32 -> * s: again the reference's w_hat.
// NB output channels x MB rows of x per block; every weight vector is decoded once per block.
// =============================================================================================

template <int NB, int MB>
void rowdot4_block(const RowdotJob& j, int64_t n, int64_t m) {
  const QWeight& w = j.w;
  const int64_t K2 = w.K / 2, gb = w.gs / 2;
  const bool sym = w.zeros == nullptr;
  const __m512 iota = sym ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1)
                          : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // One loop over the row (16 bytes a step); the tables are rebuilt when a group starts. A flat
  // loop keeps the accumulators in registers (a group loop around it made GCC spill them).
  __m512 acc_e[NB][MB], acc_o[NB][MB], T[NB];
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MB; ++i) acc_e[r][i] = acc_o[r][i] = _mm512_setzero_ps();
  const uint8_t* q0 = w.q + n * K2;
  const float* xe = j.xe + m * j.ldx;
  const float* xo = j.xo + m * j.ldx;
  int64_t next_group = 0, g = 0;
  for (int64_t b = 0; b < K2; b += 16) {
    if (b == next_group) {
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        const float s = w.scales[(n + r) * w.G + g];
        const float z = sym ? 0.f : (float)w.zeros[(n + r) * w.G + g];
        T[r] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s));
      }
      ++g;
      next_group += gb;
    }
    const __mmask16 mk = lanes16(K2 - b);  // all lanes except at the end of a per-channel row
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) prefetch_rows(q0 + r * K2 + b, NB * K2);
    __m512 ve[MB], vo[MB];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      ve[i] = _mm512_maskz_loadu_ps(mk, xe + i * j.ldx + b);
      vo[i] = _mm512_maskz_loadu_ps(mk, xo + i * j.ldx + b);
    }
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) {
      const __m512i q = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, q0 + r * K2 + b));
      const __m512 lo = _mm512_permutexvar_ps(q, T[r]);
      const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), T[r]);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) {
        acc_e[r][i] = _mm512_fmadd_ps(lo, ve[i], acc_e[r][i]);
        acc_o[r][i] = _mm512_fmadd_ps(hi, vo[i], acc_o[r][i]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NB; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i)
      store_scalar(j.out, m + i, n + r,
                   _mm512_reduce_add_ps(_mm512_add_ps(acc_e[r][i], acc_o[r][i])));
}

// Wide variant (per-channel rows, groups of >= 128): one 64-byte load gives 16 lanes of 4 bytes;
// lane i >> 4p indexes nibble p of lane i (feature 8i + p of the block), so 8 shifts and 8
// table lookups decode 128 weights without any byte shuffles; x is staged in the matching
// phase-8 order by the driver (RowdotJob::x8).
template <int NB, int MB>
void rowdot4_wide_block(const RowdotJob& j, int64_t n, int64_t m) {
  const QWeight& w = j.w;
  const int64_t K2 = w.K / 2, gb = w.G == 1 ? K2 : w.gs / 2;
  const bool sym = w.zeros == nullptr;
  const __m512 iota = sym ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1)
                          : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc[NB][MB][2], T[NB];
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i][0] = acc[r][i][1] = _mm512_setzero_ps();
  const uint8_t* q0 = w.q + n * K2;
  const float* x8 = j.x8 + m * j.ldx8;
  int64_t next_group = 0, g = 0;
  for (int64_t b = 0; b < K2; b += 64) {
    if (b == next_group) {
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        const float s = w.scales[(n + r) * w.G + g];
        const float z = sym ? 0.f : (float)w.zeros[(n + r) * w.G + g];
        T[r] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s));
      }
      ++g;
      next_group += gb;
    }
    const __mmask64 mk = K2 - b >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K2 - b)) - 1);
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) prefetch_rows(q0 + r * K2 + b, NB * K2);
    __m512i v[NB];
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) v[r] = _mm512_maskz_loadu_epi8(mk, q0 + r * K2 + b);
    const float* xb = x8 + 2 * b;  // 128 features per 64 bytes
#pragma GCC unroll 8
    for (int p = 0; p < 8; ++p) {
      __m512 xv[MB];
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_ps(xb + i * j.ldx8 + 16 * p);
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        const __m512 wv =
            _mm512_permutexvar_ps(p == 0 ? v[r] : _mm512_srli_epi32(v[r], 4 * p), T[r]);
#pragma GCC unroll 8
        for (int i = 0; i < MB; ++i)
          acc[r][i][p & 1] = _mm512_fmadd_ps(wv, xv[i], acc[r][i][p & 1]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NB; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i)
      store_scalar(j.out, m + i, n + r,
                   _mm512_reduce_add_ps(_mm512_add_ps(acc[r][i][0], acc[r][i][1])));
}

// int8: w_hat = float(q - z) * s as in the reference; per-channel rows keep the exact integers
// (q - z) in the loop and apply the one scale per row at the end (one multiply less per vector).
// SYM (no zero points) and PER_CHANNEL (one scale per row) are template parameters: each of the
// four loops is branch-free, and its code no longer depends on how GCC unswitches a generic loop
// (that layout moved with unrelated edits elsewhere in the function and cost the GEMV up to 7%).
template <int NB, int MB, bool SYM, bool PER_CHANNEL>
void rowdot8_block_t(const RowdotJob& j, int64_t n, int64_t m) {
  const QWeight& w = j.w;
  const int64_t K = w.K;
  constexpr bool sym = SYM, per_channel = PER_CHANNEL;
  __m512 acc[NB][MB], sv[NB];
  __m512i zv[NB];
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_setzero_ps();
  const uint8_t* q0 = w.q + n * K;
  const float* x = j.xe + m * j.ldx;
  int64_t next_group = 0, g = 0;
  for (int64_t k = 0; k < K; k += 16) {
    if (k == next_group) {
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        sv[r] = _mm512_set1_ps(w.scales[(n + r) * w.G + g]);
        zv[r] = _mm512_set1_epi32(sym ? 0 : (int)w.zeros[(n + r) * w.G + g]);
      }
      ++g;
      next_group += w.gs;
    }
    const __mmask16 mk = lanes16(K - k);
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) prefetch_rows(q0 + r * K + k, NB * K);
    __m512 xv[MB];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) xv[i] = _mm512_maskz_loadu_ps(mk, x + i * j.ldx + k);
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) {
      const __m128i bytes = _mm_maskz_loadu_epi8(mk, q0 + r * K + k);
      __m512i q = sym ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
      if (!sym) q = _mm512_sub_epi32(q, zv[r]);
      __m512 wv = _mm512_cvtepi32_ps(q);
      if (!per_channel) wv = _mm512_mul_ps(wv, sv[r]);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_fmadd_ps(wv, xv[i], acc[r][i]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NB; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      float v = _mm512_reduce_add_ps(acc[r][i]);
      if (per_channel) v *= w.scales[n + r];
      store_scalar(j.out, m + i, n + r, v);
    }
}

template <int NB, int MB>
void rowdot8_block(const RowdotJob& j, int64_t n, int64_t m) {
  const bool sym = j.w.zeros == nullptr, per_channel = j.w.G == 1;
  if (sym && per_channel)
    rowdot8_block_t<NB, MB, true, true>(j, n, m);
  else if (sym)
    rowdot8_block_t<NB, MB, true, false>(j, n, m);
  else if (per_channel)
    rowdot8_block_t<NB, MB, false, true>(j, n, m);
  else
    rowdot8_block_t<NB, MB, false, false>(j, n, m);
}

// Blocks of MB <= 4 rows x NB output channels (4 for a single row, else 2), then single channels.
// (Kept per ISA: written as a shared template, GCC compiled the int8 block differently and the
// int8 GEMV ran ~8% slower.)
template <int MB>
void rowdot_rows(const RowdotJob& j, int64_t n0, int64_t n1, int64_t m) {
  constexpr int NB = MB == 1 ? 4 : 2;
  const int kind = j.w.bits == 8 ? 0 : rowdot_x8_layout(j.w) ? 2 : 1;
  auto block = [&](int64_t n, auto nb) {
    constexpr int B = decltype(nb)::value;
    if (kind == 0)
      rowdot8_block<B, MB>(j, n, m);
    else if (kind == 1)
      rowdot4_block<B, MB>(j, n, m);
    else
      rowdot4_wide_block<B, MB>(j, n, m);
  };
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) block(n, std::integral_constant<int, NB>());
  for (; n < n1; ++n) block(n, std::integral_constant<int, 1>());
}

void rowdot(const RowdotJob& j, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= j.M; m += 4) rowdot_rows<4>(j, n0, n1, m);
  switch (j.M - m) {
    case 3:  rowdot_rows<3>(j, n0, n1, m); break;
    case 2:  rowdot_rows<2>(j, n0, n1, m); break;
    case 1:  rowdot_rows<1>(j, n0, n1, m); break;
    default: break;
  }
}

// =============================================================================================
// gemm: weight-only, larger M. Per (block of rows, strip of 64 channels): for each block of KC
// input features, decode the strip into a panel, then run the micro-kernel for every 6 rows.
//   fp32 panel: panel[k][64] = w_hat (exactly the reference's dequantized weight).
//   bf16 panel: panel[k/2][64] = 32-bit pairs (bf16(u - z) of feature k, of k + 1): integers of
//     at most 8 significant bits, so exact in bf16; the products x * (u - z) are exact in fp32
//     and each group is scaled once (vdpbf16ps pairs with x's bf16 pairs as stored in memory).
// Accumulation: 6 rows x 64 channels = 24 zmm accumulators; per feature (pair) 4 panel loads and
// 6 broadcasts of x. Partial sums of a block go to C (rows x 64 fp32, L1/L2-resident).
// =============================================================================================

constexpr int MR = 6;
constexpr int64_t KC_F32 = 256;  // panel 256 x 64 fp32 = 64 KiB

int64_t kc_of(const GemmJob& j) { return j.a_dtype == kBF16 ? KC_BF16 : KC_F32; }

int64_t gemm_scratch_bytes(const GemmJob& j, int64_t rows) {
  return kc_of(j) * kStripK * 4 + rows * kStripK * 4 + 64;
}

// C[R][64] (+)= A[R][0 .. kc) . panel[kc][64], fp32.
template <int R>
void ukernel_f32(const float* a, int64_t lda, const float* panel, int64_t kc, float* C,
                 bool first) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const float* b = panel + k * kStripK;
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16),
                 b2 = _mm512_loadu_ps(b + 32), b3 = _mm512_loadu_ps(b + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + k]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(av, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(av, b3, acc[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) {
      float* dst = C + r * kStripK + 16 * c;
      _mm512_storeu_ps(dst, first ? acc[r][c] : _mm512_add_ps(_mm512_loadu_ps(dst), acc[r][c]));
    }
}

// C[R][64] (+)= (A[R][pairs] . panel[pairs][64]) (* s[64] when s != nullptr), bf16 pairs.
template <int R>
void ukernel_bf16(const uint16_t* a, int64_t lda, const uint32_t* panel, int64_t npairs, float* C,
                  const float* s, bool first) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < npairs; ++p) {
    const uint32_t* b = panel + p * kStripK;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 16),
                   b2 = (__m512bh)_mm512_loadu_si512(b + 32),
                   b3 = (__m512bh)_mm512_loadu_si512(b + 48);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t bits;
      std::memcpy(&bits, a + r * lda + 2 * p, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(bits);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], av, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], av, b3);
    }
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512 sv = s ? _mm512_loadu_ps(s + 16 * c) : _mm512_set1_ps(1.f);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float* dst = C + r * kStripK + 16 * c;
      const __m512 prev = first ? _mm512_setzero_ps() : _mm512_loadu_ps(dst);
      _mm512_storeu_ps(dst,
                       s ? _mm512_fmadd_ps(acc[r][c], sv, prev) : _mm512_add_ps(prev, acc[r][c]));
    }
  }
}

void gemm_item(const GemmJob& j, int64_t m0, int64_t m1, int64_t strip, void* scratch) {
  const bool bf16 = j.a_dtype == kBF16;
  const int64_t KC = kc_of(j);
  char* base = (char*)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
  void* panel = base;
  float* C = (float*)(base + KC * kStripK * 4);
  for (int64_t k0 = 0, kc = 0; k0 < j.K; k0 += kc) {
    kc = std::min(KC, j.K - k0);
    // bf16 groups: a block holds whole groups, or a part of one group longer than KC (each part
    // scaled on its own)
    if (bf16 && j.G > 1)
      kc = j.gs <= KC ? std::min(j.K - k0, KC / j.gs * j.gs)
                      : std::min(kc, (k0 / j.gs + 1) * j.gs - k0);
    const int64_t p0 = k0 / 2, p1 = (k0 + kc + 1) / 2;
    if (bf16) {
      decode_panel<true>(j, strip, p0, p1, panel);
      const uint16_t* a = (const uint16_t*)j.a;
      for_row_tiles<MR>(m0, m1, [&](int64_t m, auto R) {
        const uint16_t* am = a + m * j.lda;
        float* Cm = C + (m - m0) * kStripK;
        if (j.G == 1) {
          ukernel_bf16<R>(am + k0, j.lda, (const uint32_t*)panel, p1 - p0, Cm, nullptr, k0 == 0);
        } else {
          const float* sstrip = j.p.sT + strip * kStripK;  // + g * Npad
          for (int64_t g0 = k0; g0 < k0 + kc; g0 += j.gs)
            ukernel_bf16<R>(am + g0, j.lda, (const uint32_t*)panel + (g0 - k0) / 2 * kStripK,
                            std::min(j.gs, k0 + kc - g0) / 2, Cm, sstrip + (g0 / j.gs) * j.p.Npad,
                            g0 == 0);
        }
      });
    } else {
      const float* fpanel = (const float*)panel;
      if (j.dense != nullptr)
        fpanel = j.dense + (strip * j.K + k0) * kStripK;  // prepacked: the panel itself
      else
        decode_panel<false>(j, strip, p0, p1, panel);
      const float* a = (const float*)j.a;
      for_row_tiles<MR>(m0, m1, [&](int64_t m, auto R) {
        ukernel_f32<R>(a + m * j.lda + k0, j.lda, fpanel, kc, C + (m - m0) * kStripK, k0 == 0);
      });
    }
  }
  gemm_store(j, m0, m1, strip, C, bf16 && j.G == 1);  // per-channel bf16: scale here
}

// =============================================================================================
// a8 (W8A8): per-token int8 activations, vpdpbusd on the VNNI-blocked weight.
// vpdpbusd multiplies unsigned bytes by signed bytes. Symmetric weights are signed, so x_q is
// stored shifted to unsigned (x_q + 128) and 128 * colsum[n] is subtracted afterwards;
// asymmetric weights are unsigned, so they take the unsigned side, x_q the signed one, and
// zp[n] * rowsum[m] is subtracted. Both are exact int32 identities. Register tile: 6 rows x 64
// channels (24 zmm of int32), per quad of features 4 weight loads + 6 broadcasts.
// =============================================================================================

// Per-token quantization of rows [m0, m1) exactly as the reference: v = x (/ smooth), s = amax/127
// (1 if the row is zero, NaN if it holds a NaN / inf: the output row is NaN), x_q =
// clamp(round_half_even(v / s), -127, 127) -- true divisions. amax is the integer max of |v|'s
// bits (NaN > inf > finite values), so unlike a float max it never drops a NaN.
void a8_quantize_impl(const A8Job& j, int64_t m0, int64_t m1, bool shifted) {
  const int64_t K = j.K, K4 = j.p.T * 4;
  for (int64_t m = m0; m < m1; ++m) {
    auto load_v = [&](int64_t k, __mmask16 mk) {
      __m512 v = load_x(j.x, j.x_dtype, m * j.ldx + k, mk);
      if (j.smooth) v = _mm512_maskz_div_ps(mk, v, _mm512_maskz_loadu_ps(mk, j.smooth + k));
      return v;
    };
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
    __m512i amax = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
      const __m512i bits = _mm512_castps_si512(load_v(k, lanes16(K - k)));
      amax = _mm512_max_epu32(amax, _mm512_and_si512(bits, absmask));
    }
    const float s = a8_scale((uint32_t)_mm512_reduce_max_epu32(amax));
    const __m512 sv = _mm512_set1_ps(s);
    __m512i sum = _mm512_setzero_si512();
    uint8_t* dst = j.aq + m * K4;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = lanes16(K - k);
      __m512i q = _mm512_cvt_roundps_epi32(_mm512_div_ps(load_v(k, mk), sv),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
      q = _mm512_maskz_mov_epi32(mk, q);
      sum = _mm512_add_epi32(sum, q);
      if (shifted) q = _mm512_add_epi32(q, _mm512_set1_epi32(128));
      _mm_mask_storeu_epi8(dst + k, mk, _mm512_cvtepi32_epi8(q));
    }
    for (int64_t k = K; k < K4; ++k) dst[k] = shifted ? 128 : 0;
    j.sx[m] = s;
    j.rowsum[m] = _mm512_reduce_add_epi32(sum);
  }
}

void a8_quantize(const A8Job& j, int64_t m0, int64_t m1) {
  a8_quantize_impl(j, m0, m1, j.symmetric);
}

template <int R, bool SYM>
void a8_tile(const A8Job& j, int64_t m, int64_t strip) {
  const int64_t T = j.p.T;
  const uint8_t* b = j.p.w + strip * T * (kStripK * 4);
  const uint8_t* a = j.aq + m * T * 4;
  __m512i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t t = 0; t < T; ++t) {
    const __m512i* bt = (const __m512i*)(b + t * (kStripK * 4));
    const __m512i b0 = _mm512_loadu_si512(bt), b1 = _mm512_loadu_si512(bt + 1),
                  b2 = _mm512_loadu_si512(bt + 2), b3 = _mm512_loadu_si512(bt + 3);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t bits;
      std::memcpy(&bits, a + r * T * 4 + t * 4, 4);
      const __m512i av = _mm512_set1_epi32(bits);
      if (SYM) {
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, b0);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, b1);
        acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], av, b2);
        acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], av, b3);
      } else {
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], b0, av);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], b1, av);
        acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], b2, av);
        acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], b3, av);
      }
    }
  }
  // Epilogue (every loop over r / c is unrolled so the accumulators stay in registers).
  const int64_t n0 = strip * kStripK;
  __m512 sw[4];
  __m512i corr[4];
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    sw[c] = _mm512_loadu_ps(j.p.sw + n0 + 16 * c);  // Npad is a multiple of 64: in bounds
    corr[c] = SYM ? _mm512_slli_epi32(_mm512_loadu_si512(j.p.colsum + n0 + 16 * c), 7)
                  : _mm512_loadu_si512(j.p.zp + n0 + 16 * c);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512i rs = _mm512_set1_epi32(j.rowsum[m + r]);
    const __m512 sx = _mm512_set1_ps(j.sx[m + r]);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c)
      a8_store16<SYM>(j, m + r, n0 + 16 * c, acc[r][c], corr[c], rs, sx, sw[c]);
  }
}

void a8_item(const A8Job& j, int64_t m0, int64_t m1, int64_t strip) {
  for_row_tiles<MR>(m0, m1, [&](int64_t m, auto R) {
    if (j.symmetric)
      a8_tile<R, true>(j, m, strip);
    else
      a8_tile<R, false>(j, m, strip);
  });
}

void widen_row(const void* x, int dtype, int64_t n, float* dst) {
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mk = lanes16(n - k);
    _mm512_mask_storeu_ps(dst + k, mk, load_x(x, dtype, k, mk));
  }
}

const QmmImpl kImplBf16 = {
    "avx512_bf16", rowdot, true, gemm_item, gemm_scratch_bytes, true, a8_quantize,
    a8_item,       true,   1,    6,         widen_row};
const QmmImpl kImpl = {"avx512", rowdot, true, gemm_item, gemm_scratch_bytes, false, a8_quantize,
                       a8_item,  true,   1,    6,         widen_row};

}  // namespace

const QmmImpl* qmm_impl_avx512(bool bf16) { return bf16 ? &kImplBf16 : &kImpl; }

}  // namespace qmm
}  // namespace cpu
}  // namespace mmk

#else
namespace mmk {
namespace cpu {
namespace qmm {
const QmmImpl* qmm_impl_avx512(bool) { return nullptr; }
}  // namespace qmm
}  // namespace cpu
}  // namespace mmk
#endif
