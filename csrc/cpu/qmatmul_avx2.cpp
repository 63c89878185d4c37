// AVX2 + FMA kernels of the quantized matmul (compiled for AVX2 + FMA by MMK_TARGET_AVX2,
// cpu_features.h; chosen at run time on CPUs without AVX-512, or with MMKERNELS_CPU_ISA=avx2). Same
// algorithms and layouts as qmatmul_avx512.cpp with 8-lane vectors; bf16 activations are widened to
// fp32 by the driver (no bf16 dot products here). W8A8 has no vpdpbusd: x_q is widened to int16 and
// multiplied with vpmaddwd, which cannot saturate (|x_q| <= 127, |w| <= 255: a pair sums to at
// most 64770 < 2^31). No torch headers in this file (see qmatmul.h).
#include "cpu/cpu_features.h"
#include "cpu/qmatmul.h"

#ifdef MMK_X86
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

MMK_TARGET_AVX2
#include "cpu/qmatmul_kernel.h"
#include "cpu/vec_avx2.h"

namespace mmk {
namespace cpu {
namespace qmm {
namespace {

inline __m128i load8(const uint8_t* p) { return _mm_loadl_epi64((const __m128i*)p); }

// =============================================================================================
// rowdot (weight-only, small M, canonical layout): 8 bytes -> 8 int32 lanes; int4 symmetric
// nibbles are flipped to unsigned with ^0x88 (zero point 8). w_hat = float(u - z) * s exactly as
// the reference, then FMA with x (int4: low nibbles with x's even half, high with the odd half).
// =============================================================================================

// Weights are streamed once: prefetch the same position 4 row blocks ahead into L2 (as in the
// AVX-512 file).
inline void prefetch_rows(const uint8_t* p, int64_t block_bytes) {
  _mm_prefetch((const char*)(p + 4 * block_bytes), _MM_HINT_T1);
}

// One flat loop per row block (8 bytes of int4 / 8 int8 a step), the group's scale / zero point
// reloaded when a group starts: a loop nest around the step loop made GCC spill the accumulators.
// Rows whose length is not a multiple of 8 finish with scalar code.
template <int NB, int MB>
void rowdot4_block(const RowdotJob& j, int64_t n, int64_t m) {
  const QWeight& w = j.w;
  const int64_t K2 = w.K / 2, gb = w.gs / 2, main_end = K2 / 8 * 8;
  const bool sym = w.zeros == nullptr;
  const __m128i flip = _mm_set1_epi8(sym ? (char)0x88 : 0);
  __m256 acc[NB][MB][2], sv[NB];
  __m256i zv[NB];
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i][0] = acc[r][i][1] = _mm256_setzero_ps();
  const uint8_t* q0 = w.q + n * K2;
  int64_t next_group = 0, g = 0;
  auto group_params = [&](int64_t gg, int r, float& s, int& z) {
    s = w.scales[(n + r) * w.G + gg];
    z = sym ? 8 : (int)w.zeros[(n + r) * w.G + gg];
  };
  for (int64_t b = 0; b < main_end; b += 8) {
    if (b >= next_group) {
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        float s;
        int z;
        group_params(g, r, s, z);
        sv[r] = _mm256_set1_ps(s);
        zv[r] = _mm256_set1_epi32(z);
      }
      ++g;
      next_group += gb;
    }
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) prefetch_rows(q0 + r * K2 + b, NB * K2);
    __m256 ve[MB], vo[MB];
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      ve[i] = _mm256_loadu_ps(j.xe + (m + i) * j.ldx + b);
      vo[i] = _mm256_loadu_ps(j.xo + (m + i) * j.ldx + b);
    }
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) {
      const __m256i q = _mm256_cvtepu8_epi32(_mm_xor_si128(load8(q0 + r * K2 + b), flip));
      const __m256i lo = _mm256_and_si256(q, _mm256_set1_epi32(15));
      const __m256i hi = _mm256_srli_epi32(q, 4);
      const __m256 wl = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(lo, zv[r])), sv[r]);
      const __m256 wh = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(hi, zv[r])), sv[r]);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) {
        acc[r][i][0] = _mm256_fmadd_ps(wl, ve[i], acc[r][i][0]);
        acc[r][i][1] = _mm256_fmadd_ps(wh, vo[i], acc[r][i][1]);
      }
    }
  }
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MB; ++i) {
      float tail = 0.f;
      for (int64_t b = main_end; b < K2; ++b) {  // per-channel rows only (groups are 16+ bytes)
        float s;
        int z;
        group_params(b / gb, r, s, z);
        const int u = q0[r * K2 + b] ^ (sym ? 0x88 : 0);
        tail += (float)((u & 15) - z) * s * j.xe[(m + i) * j.ldx + b] +
                (float)((u >> 4) - z) * s * j.xo[(m + i) * j.ldx + b];
      }
      store_scalar(j.out, m + i, n + r,
                   V256::hsum(_mm256_add_ps(acc[r][i][0], acc[r][i][1])) + tail);
    }
}

template <int NB, int MB>
void rowdot8_block(const RowdotJob& j, int64_t n, int64_t m) {
  const QWeight& w = j.w;
  const int64_t K = w.K, main_end = K / 8 * 8;
  const bool sym = w.zeros == nullptr;
  __m256 acc[NB][MB], sv[NB];
  __m256i zv[NB];
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm256_setzero_ps();
  const uint8_t* q0 = w.q + n * K;
  int64_t next_group = 0, g = 0;
  for (int64_t k = 0; k < main_end; k += 8) {
    if (k >= next_group) {
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        sv[r] = _mm256_set1_ps(w.scales[(n + r) * w.G + g]);
        zv[r] = _mm256_set1_epi32(sym ? 0 : (int)w.zeros[(n + r) * w.G + g]);
      }
      ++g;
      next_group += w.gs;
    }
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) prefetch_rows(q0 + r * K + k, NB * K);
    __m256 xv[MB];
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) xv[i] = _mm256_loadu_ps(j.xe + (m + i) * j.ldx + k);
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) {
      const __m128i bytes = load8(q0 + r * K + k);
      const __m256i q = sym ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
      const __m256 wv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, zv[r])), sv[r]);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) acc[r][i] = _mm256_fmadd_ps(wv, xv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MB; ++i) {
      float tail = 0.f;
      for (int64_t k = main_end; k < K; ++k) {  // per-channel rows only (groups are 32+)
        const uint8_t raw = q0[r * K + k];
        const int q = sym ? (int)(int8_t)raw : (int)raw;
        const int64_t gg = k / w.gs;
        const int z = sym ? 0 : (int)w.zeros[(n + r) * w.G + gg];
        tail += (float)(q - z) * w.scales[(n + r) * w.G + gg] * j.xe[(m + i) * j.ldx + k];
      }
      store_scalar(j.out, m + i, n + r, V256::hsum(acc[r][i]) + tail);
    }
}

// Blocks of MB <= 4 rows x NB output channels (4 for a single row, else 2), then single channels.
template <int MB>
void rowdot_rows(const RowdotJob& j, int64_t n0, int64_t n1, int64_t m) {
  constexpr int NB = MB == 1 ? 4 : 2;
  const bool b4 = j.w.bits == 4;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB)
    b4 ? rowdot4_block<NB, MB>(j, n, m) : rowdot8_block<NB, MB>(j, n, m);
  for (; n < n1; ++n) b4 ? rowdot4_block<1, MB>(j, n, m) : rowdot8_block<1, MB>(j, n, m);
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
// gemm (weight-only, fp32): the strip of 64 channels is decoded into panel[k][64] = w_hat, then
// a 6-row x 16-channel micro-kernel (12 ymm accumulators) runs over each quarter of the strip.
// =============================================================================================

constexpr int MR = 6;
constexpr int64_t KC = 256;

int64_t gemm_scratch_bytes(const GemmJob&, int64_t rows) {
  return KC * kStrip * 4 + rows * kStrip * 4 + 64;
}

void decode_panel(const GemmJob& j, int64_t strip, int64_t p0, int64_t p1, float* panel) {
  const int64_t gp = j.gs / 2 > 0 ? j.gs / 2 : 1;
  const int64_t col0 = strip * kStrip;
  const int64_t unit = j.bits == 4 ? 1 : 2;
  for (int64_t pa = p0; pa < p1;) {
    const int64_t g = j.G == 1 ? 0 : pa / gp;
    const int64_t pb = j.G == 1 ? p1 : std::min(p1, (g + 1) * gp);
    for (int c = 0; c < 8; ++c) {
      const __m256 sv = _mm256_loadu_ps(j.p.sT + g * j.p.Npad + col0 + 8 * c);
      const __m256i zv = _mm256_loadu_si256((const __m256i*)(j.p.zT + g * j.p.Npad + col0 + 8 * c));
      for (int64_t p = pa; p < pb; ++p) {
        const uint8_t* src = j.p.w + ((strip * j.p.P + p) * kStrip + 8 * c) * unit;
        __m256i lo, hi;
        if (j.bits == 4) {
          const __m256i b = _mm256_cvtepu8_epi32(load8(src));
          lo = _mm256_and_si256(b, _mm256_set1_epi32(15));
          hi = _mm256_srli_epi32(b, 4);
        } else {
          const __m256i d = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)src));
          lo = _mm256_and_si256(d, _mm256_set1_epi32(255));
          hi = _mm256_srli_epi32(d, 8);
        }
        float* dst = panel + 2 * (p - p0) * kStrip + 8 * c;
        _mm256_storeu_ps(dst, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(lo, zv)), sv));
        _mm256_storeu_ps(dst + kStrip,
                         _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(hi, zv)), sv));
      }
    }
    pa = pb;
  }
}

template <int R>
void ukernel(const float* a, int64_t lda, const float* panel, int64_t kc, float* C, bool first) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * kStrip),
                 b1 = _mm256_loadu_ps(panel + k * kStrip + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2; ++c) {
      float* dst = C + r * kStrip + 8 * c;
      _mm256_storeu_ps(dst, first ? acc[r][c] : _mm256_add_ps(_mm256_loadu_ps(dst), acc[r][c]));
    }
}

void gemm_item(const GemmJob& j, int64_t m0, int64_t m1, int64_t strip, void* scratch) {
  float* panel = (float*)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
  float* C = panel + KC * kStrip;
  const float* a = (const float*)j.a;
  for (int64_t k0 = 0; k0 < j.K; k0 += KC) {
    const int64_t kc = std::min(KC, j.K - k0);
    const float* fpanel = panel;
    if (j.dense != nullptr)
      fpanel = j.dense + (strip * j.K + k0) * kStrip;  // prepacked: the panel itself
    else
      decode_panel(j, strip, k0 / 2, (k0 + kc + 1) / 2, panel);
    for_row_tiles<MR>(m0, m1, [&](int64_t m, auto R) {
      for (int q = 0; q < 4; ++q)
        ukernel<R>(a + m * j.lda + k0, j.lda, fpanel + 16 * q, kc, C + (m - m0) * kStrip + 16 * q,
                   k0 == 0);
    });
  }
  const int64_t n0 = strip * kStrip, n1 = std::min(j.N, n0 + kStrip);
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n) store_scalar(j.out, m, n, C[(m - m0) * kStrip + n - n0]);
}

// =============================================================================================
// a8 (W8A8) without VNNI: x_q stored as int16; per quad of features, 4 channels x 4 bytes of the
// VNNI-blocked weight are widened to 16 int16 and multiplied with the broadcast 4 int16 of x_q
// (vpmaddwd: two int32 partial sums per channel, added in the epilogue). Asymmetric weights are
// unsigned (zero-extended) and corrected by zp[n] * rowsum[m], as in the AVX-512 kernel.
// =============================================================================================

void a8_quantize(const A8Job& j, int64_t m0, int64_t m1) {
  const int64_t K = j.K, K4 = j.p.T * 4;
  for (int64_t m = m0; m < m1; ++m) {
    auto value = [&](int64_t k) {
      const int64_t off = m * j.ldx + k;
      const float v = j.x_dtype == kF16 ? _cvtsh_ss(((const uint16_t*)j.x)[off])  // F16C
                                        : x_elem_f32(j.x, j.x_dtype, off);
      return j.smooth ? v / j.smooth[k] : v;
    };
    uint32_t amax = 0;  // bits of max |v| (see a8_scale)
    for (int64_t k = 0; k < K; ++k) {
      const float v = value(k);
      uint32_t u;
      std::memcpy(&u, &v, 4);
      amax = std::max(amax, u & 0x7fffffffu);
    }
    const float s = a8_scale(amax);
    int16_t* dst = (int16_t*)j.aq + m * K4;
    int32_t sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      float q = std::nearbyint(value(k) / s);  // default rounding mode: half to even
      q = std::min(127.f, std::max(-127.f, q));
      dst[k] = (int16_t)q;
      sum += (int32_t)q;
    }
    for (int64_t k = K; k < K4; ++k) dst[k] = 0;
    j.sx[m] = s;
    j.rowsum[m] = sum;
  }
}

template <int R>
void a8_tile(const A8Job& j, int64_t m, int64_t strip, int q16) {
  const int64_t T = j.p.T;
  const uint8_t* b = j.p.w + strip * T * (kStrip * 4) + q16 * 64;
  const int16_t* a = (const int16_t*)j.aq + m * T * 4;
  __m256i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_si256();
  for (int64_t t = 0; t < T; ++t) {
    __m256i av[R];
    for (int r = 0; r < R; ++r) {
      int64_t bits;
      std::memcpy(&bits, a + r * T * 4 + t * 4, 8);
      av[r] = _mm256_set1_epi64x(bits);
    }
    const uint8_t* bt = b + t * (kStrip * 4);
    for (int c = 0; c < 4; ++c) {
      const __m128i raw = _mm_loadu_si128((const __m128i*)(bt + 16 * c));
      const __m256i wv = j.symmetric ? _mm256_cvtepi8_epi16(raw) : _mm256_cvtepu8_epi16(raw);
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(av[r], wv));
    }
  }
  const int64_t n0 = strip * kStrip + q16 * 16;
  for (int r = 0; r < R; ++r) {
    int32_t part[32];
    for (int c = 0; c < 4; ++c) _mm256_storeu_si256((__m256i*)(part + 8 * c), acc[r][c]);
    for (int i = 0; i < 16; ++i) {
      const int64_t n = n0 + i;
      if (n >= j.N) break;
      int32_t acc32 = part[2 * i] + part[2 * i + 1];
      if (!j.symmetric) acc32 -= j.p.zp[n] * j.rowsum[m + r];
      const float y = ((float)acc32 * j.sx[m + r]) * j.p.sw[n];
      store_scalar(j.out, m + r, n, y);
    }
  }
}

void a8_item(const A8Job& j, int64_t m0, int64_t m1, int64_t strip) {
  for (int q16 = 0; q16 < 4; ++q16) {
    if (strip * kStrip + q16 * 16 >= j.N) break;
    int64_t m = m0;
    for (; m + 3 <= m1; m += 3) a8_tile<3>(j, m, strip, q16);
    if (m1 - m == 2) a8_tile<2>(j, m, strip, q16);
    if (m1 - m == 1) a8_tile<1>(j, m, strip, q16);
  }
}

void widen_row(const void* x, int dtype, int64_t n, float* dst) {
  if (dtype == kF32) {
    std::memcpy(dst, x, n * sizeof(float));
    return;
  }
  const uint16_t* h = (const uint16_t*)x;
  for (int64_t k = 0; k < n; k += 8) {
    const int r = (int)std::min<int64_t>(8, n - k);
    V256::storen(dst + k, dtype == kBF16 ? V256::load_bf16(h + k, r) : V256::load_f16(h + k, r), r);
  }
}

const QmmImpl kImpl = {"avx2",  rowdot, false, gemm_item, gemm_scratch_bytes, false, a8_quantize,
                       a8_item, false,  2,     6,         widen_row};

}  // namespace

const QmmImpl* qmm_impl_avx2() { return &kImpl; }

}  // namespace qmm
}  // namespace cpu
}  // namespace mmk

#else
namespace mmk {
namespace cpu {
namespace qmm {
const QmmImpl* qmm_impl_avx2() { return nullptr; }
}  // namespace qmm
}  // namespace cpu
}  // namespace mmk
#endif
