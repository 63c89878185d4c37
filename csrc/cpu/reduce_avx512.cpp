// AVX-512 kernels of the token-reduction primitives (compiled for AVX-512 by MMK_TARGET_AVX512,
// cpu_features.h; chosen at run time). No torch headers in this file (see reduce.h).
#include "cpu/cpu_features.h"
#include "cpu/reduce.h"

#ifdef MMK_X86
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <climits>
#include <limits>

MMK_TARGET_AVX512

namespace mmk {
namespace cpu {
namespace reduce {
namespace {

inline __mmask16 lanes(int64_t n) {
  return n <= 0 ? (__mmask16)0 : n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
}

// ---- cosine max / first argmax -------------------------------------------------------------
// 8 A rows x 2 B tiles (32 tokens) of accumulators; every dot product is summed channel by
// channel with FMA (the order of a GEMM micro-kernel). Per A row a running (max, index) per lane;
// B tokens reach a lane in increasing order and only a strictly greater value replaces the
// current one, so the final "lowest index among the lanes holding the max" is the first argmax.
template <int R>
inline void update(__m512* vmax, __m512i* vidx, const __m512* acc, int64_t base, __mmask16 valid) {
  const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)base),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                         13, 14, 15));
  for (int r = 0; r < R; ++r) {
    const __mmask16 gt = _mm512_mask_cmp_ps_mask(valid, acc[r], vmax[r], _CMP_GT_OQ);
    vmax[r] = _mm512_mask_mov_ps(vmax[r], gt, acc[r]);
    vidx[r] = _mm512_mask_mov_epi32(vidx[r], gt, idx);
  }
}

void sim_argmax(const float* a, int64_t c, int64_t a0, int64_t a1, const float* bp, int64_t nb,
                float* best, int32_t* arg) {
  constexpr int R = kRowBlock;
  const int64_t ntiles = (nb + kTile - 1) / kTile;
  const int64_t tstride = c * kTile;
  for (int64_t i0 = a0; i0 < a1; i0 += R) {
    const float* ar = a + i0 * c;
    __m512 vmax[R];
    __m512i vidx[R];
    for (int r = 0; r < R; ++r) {
      vmax[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      vidx[r] = _mm512_setzero_si512();
    }
    int64_t t = 0;
    for (; t + 2 <= ntiles; t += 2) {
      const float* b0 = bp + t * tstride;
      const float* b1 = b0 + tstride;
      __m512 acc0[R], acc1[R];
      for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
      for (int64_t k = 0; k < c; ++k) {
        const __m512 vb0 = _mm512_loadu_ps(b0 + k * kTile);
        const __m512 vb1 = _mm512_loadu_ps(b1 + k * kTile);
        for (int r = 0; r < R; ++r) {
          const __m512 va = _mm512_set1_ps(ar[r * c + k]);
          acc0[r] = _mm512_fmadd_ps(va, vb0, acc0[r]);
          acc1[r] = _mm512_fmadd_ps(va, vb1, acc1[r]);
        }
      }
      update<R>(vmax, vidx, acc0, t * kTile, lanes(nb - t * kTile));
      update<R>(vmax, vidx, acc1, (t + 1) * kTile, lanes(nb - (t + 1) * kTile));
    }
    if (t < ntiles) {
      const float* b0 = bp + t * tstride;
      __m512 acc0[R];
      for (int r = 0; r < R; ++r) acc0[r] = _mm512_setzero_ps();
      for (int64_t k = 0; k < c; ++k) {
        const __m512 vb0 = _mm512_loadu_ps(b0 + k * kTile);
        for (int r = 0; r < R; ++r)
          acc0[r] = _mm512_fmadd_ps(_mm512_set1_ps(ar[r * c + k]), vb0, acc0[r]);
      }
      update<R>(vmax, vidx, acc0, t * kTile, lanes(nb - t * kTile));
    }
    for (int r = 0; r < R; ++r) {
      const float m = _mm512_reduce_max_ps(vmax[r]);
      const __mmask16 eq = _mm512_cmp_ps_mask(vmax[r], _mm512_set1_ps(m), _CMP_EQ_OQ);
      const int j = _mm512_mask_reduce_min_epi32(eq, vidx[r]);
      best[i0 + r] = m;
      arg[i0 + r] = eq ? j : 0;
    }
  }
}

// ---- merge -----------------------------------------------------------------------------------
template <int DT>
inline __m512 load(const void* base, int64_t off, __mmask16 m) {
  if (DT == kF32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + off);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + off);
  if (DT == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int DT>
inline void store(void* base, int64_t off, __m512 v, __mmask16 m) {
  if (DT == kF32) {
    _mm512_mask_storeu_ps(static_cast<float*>(base) + off, m, v);
    return;
  }
  __m256i h;
  if (DT == kF16) {
    h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {  // round to nearest even, NaN -> 0x7fc0 (as c10::BFloat16)
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    h = _mm512_cvtepi32_epi16(r);
  }
  _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + off, m, h);
}

// w * x rounded to fp32 on its own: the empty asm keeps the compiler from contracting the
// product and the following add into an FMA (the reference rounds both).
inline __m512 mul_rounded(__m512 a, __m512 b) {
  __m512 p = _mm512_mul_ps(a, b);
  __asm__("" : "+v"(p));
  return p;
}

template <int DT>
void merge_slots_t(const MergeRow& p, int64_t s0, int64_t s1) {
  const int64_t c = p.C;
  constexpr int V = 4;  // 64 channels per pass
  for (int64_t s = s0; s < s1; ++s) {
    const int32_t* src = p.list + p.off[s];
    const int n = p.off[s + 1] - p.off[s];
    const __m512 den = _mm512_set1_ps(p.wsum[s]);
    const int64_t ob = s * c;
    int64_t c0 = 0;
    for (; c0 + V * 16 <= c; c0 += V * 16) {
      __m512 acc[V];
      for (int v = 0; v < V; ++v) acc[v] = _mm512_setzero_ps();
      for (int q = 0; q < n; ++q) {
        const int64_t i = src[q];
        const __m512 w = _mm512_set1_ps(p.w[i]);
        for (int v = 0; v < V; ++v)
          acc[v] = _mm512_add_ps(
              acc[v], mul_rounded(load<DT>(p.x, i * p.sxn + c0 + 16 * v, 0xffff), w));
      }
      for (int v = 0; v < V; ++v)
        store<DT>(p.out, ob + c0 + 16 * v, _mm512_div_ps(acc[v], den), 0xffff);
    }
    for (; c0 < c; c0 += 16) {
      const __mmask16 m = lanes(c - c0);
      __m512 acc = _mm512_setzero_ps();
      for (int q = 0; q < n; ++q) {
        const int64_t i = src[q];
        const __m512 w = _mm512_set1_ps(p.w[i]);
        acc = _mm512_add_ps(acc, mul_rounded(load<DT>(p.x, i * p.sxn + c0, m), w));
      }
      store<DT>(p.out, ob + c0, _mm512_div_ps(acc, den), m);
    }
  }
}

void merge_slots(const MergeRow& p, int64_t s0, int64_t s1) {
  switch (p.dtype) {
    case kF32: merge_slots_t<kF32>(p, s0, s1); break;
    case kBF16: merge_slots_t<kBF16>(p, s0, s1); break;
    default: merge_slots_t<kF16>(p, s0, s1); break;
  }
}

const ReduceImpl kImpl = {"avx512", &sim_argmax, &merge_slots};

}  // namespace

const ReduceImpl* reduce_impl_avx512() { return &kImpl; }

}  // namespace reduce
}  // namespace cpu
}  // namespace mmk

#else  // not x86
namespace mmk {
namespace cpu {
namespace reduce {
const ReduceImpl* reduce_impl_avx512() { return nullptr; }
}  // namespace reduce
}  // namespace cpu
}  // namespace mmk
#endif
