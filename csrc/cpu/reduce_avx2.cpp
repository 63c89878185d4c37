// AVX2 kernels of the token-reduction primitives (compiled for AVX2 + FMA by MMK_TARGET_AVX2,
// cpu_features.h; chosen at run time on CPUs without AVX-512). The arithmetic is the AVX-512 path's, lane for
// lane (FMA channel by channel for the similarities, rounded products and sums for the merge), so
// both give the same plans and the same merged values. No torch headers (see reduce.h).
#include "cpu/cpu_features.h"
#include "cpu/reduce.h"

#ifdef MMK_X86
#include <immintrin.h>

#include <cstring>
#include <limits>

MMK_TARGET_AVX2

namespace mmk {
namespace cpu {
namespace reduce {
namespace {

// ---- cosine max / first argmax -------------------------------------------------------------
// A 16-token B tile is two 8-lane halves. R A rows x one tile of accumulators (2R registers) plus
// the two B vectors and one broadcast fit the 16 ymm registers. Per A row and lane a running
// (max, index); only a strictly greater value replaces it, so the lowest index among the lanes
// holding the final max is the first argmax (as in reduce_avx512.cpp).
constexpr int R = 4;
static_assert(kRowBlock % R == 0, "A rows come in blocks of kRowBlock");

inline __m256 valid_lanes(int64_t n) {  // all-ones in lanes < n
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int v = n <= 0 ? 0 : n >= 8 ? 8 : (int)n;
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(v), iota));
}

inline void update(__m256& vmax, __m256i& vidx, __m256 acc, int64_t base, int64_t nvalid) {
  const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)base),
                                       _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 gt = _mm256_and_ps(_mm256_cmp_ps(acc, vmax, _CMP_GT_OQ), valid_lanes(nvalid));
  vmax = _mm256_blendv_ps(vmax, acc, gt);
  vidx = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(vidx), _mm256_castsi256_ps(idx), gt));
}

void sim_argmax(const float* a, int64_t c, int64_t a0, int64_t a1, const float* bp, int64_t nb,
                float* best, int32_t* arg) {
  const int64_t ntiles = (nb + kTile - 1) / kTile;
  const int64_t tstride = c * kTile;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t i0 = a0; i0 < a1; i0 += R) {
    const float* ar = a + i0 * c;
    __m256 vmax[R][2];
    __m256i vidx[R][2];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h) {
        vmax[r][h] = _mm256_set1_ps(neg_inf);
        vidx[r][h] = _mm256_setzero_si256();
      }
    for (int64_t t = 0; t < ntiles; ++t) {
      const float* b = bp + t * tstride;
      __m256 acc[R][2];
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      for (int64_t k = 0; k < c; ++k) {
        const __m256 vb0 = _mm256_loadu_ps(b + k * kTile);
        const __m256 vb1 = _mm256_loadu_ps(b + k * kTile + 8);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m256 va = _mm256_broadcast_ss(ar + r * c + k);
          acc[r][0] = _mm256_fmadd_ps(va, vb0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(va, vb1, acc[r][1]);
        }
      }
      const int64_t base = t * kTile;
      for (int r = 0; r < R; ++r) {
        update(vmax[r][0], vidx[r][0], acc[r][0], base, nb - base);
        update(vmax[r][1], vidx[r][1], acc[r][1], base + 8, nb - base - 8);
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(32) float m16[16];
      alignas(32) int32_t i16[16];
      _mm256_store_ps(m16, vmax[r][0]);
      _mm256_store_ps(m16 + 8, vmax[r][1]);
      _mm256_store_si256((__m256i*)i16, vidx[r][0]);
      _mm256_store_si256((__m256i*)(i16 + 8), vidx[r][1]);
      float m = m16[0];
      for (int l = 1; l < 16; ++l) m = m16[l] > m ? m16[l] : m;
      int32_t j = 0;
      bool found = false;
      for (int l = 0; l < 16; ++l)
        if (m16[l] == m && (!found || i16[l] < j)) {
          j = i16[l];
          found = true;
        }
      best[i0 + r] = m;
      arg[i0 + r] = found ? j : 0;
    }
  }
}

// ---- merge -----------------------------------------------------------------------------------
inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even, NaN -> 0x7fc0 (as c10::BFloat16 and reduce_avx512.cpp).
inline uint16_t f32_to_bf16(float f) {
  if (f != f) return 0x7fc0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <int DT>
inline __m256 load8(const void* base, int64_t off) {
  if (DT == kF32) return _mm256_loadu_ps(static_cast<const float*>(base) + off);
  const __m128i h = _mm_loadu_si128((const __m128i*)(static_cast<const uint16_t*>(base) + off));
  if (DT == kF16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int DT>
inline void store8(void* base, int64_t off, __m256 v) {
  if (DT == kF32) {
    _mm256_storeu_ps(static_cast<float*>(base) + off, v);
    return;
  }
  __m128i h;
  if (DT == kF16) {
    h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r),
                                             _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)), nan));
    // 16-bit results in the low half of each 32-bit lane: pack them (the values fit, no
    // saturation), then put the two 64-bit halves of interest side by side.
    const __m256i packed = _mm256_packus_epi32(r, r);
    h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  }
  _mm_storeu_si128((__m128i*)(static_cast<uint16_t*>(base) + off), h);
}

template <int DT>
inline float load1(const void* base, int64_t off) {
  if (DT == kF32) return static_cast<const float*>(base)[off];
  const uint16_t h = static_cast<const uint16_t*>(base)[off];
  return DT == kF16 ? _cvtsh_ss(h) : bf16_to_f32(h);
}

template <int DT>
inline void store1(void* base, int64_t off, float v) {
  if (DT == kF32) {
    static_cast<float*>(base)[off] = v;
  } else {
    static_cast<uint16_t*>(base)[off] =
        DT == kF16 ? (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                   : f32_to_bf16(v);
  }
}

// w * x rounded to fp32 on its own: the empty asm keeps the compiler from contracting the
// product and the following add into an FMA (the reference rounds both).
inline __m256 mul_rounded(__m256 a, __m256 b) {
  __m256 p = _mm256_mul_ps(a, b);
  __asm__("" : "+x"(p));
  return p;
}
inline float mul_rounded1(float a, float b) {
  float p = a * b;
  __asm__("" : "+x"(p));
  return p;
}

template <int DT>
void merge_slots_t(const MergeRow& p, int64_t s0, int64_t s1) {
  const int64_t c = p.C;
  constexpr int V = 4;  // 32 channels per pass
  for (int64_t s = s0; s < s1; ++s) {
    const int32_t* src = p.list + p.off[s];
    const int n = p.off[s + 1] - p.off[s];
    const int64_t ob = s * c;
    const __m256 den = _mm256_set1_ps(p.wsum[s]);
    int64_t c0 = 0;
    for (; c0 + V * 8 <= c; c0 += V * 8) {
      __m256 acc[V];
      for (int v = 0; v < V; ++v) acc[v] = _mm256_setzero_ps();
      for (int q = 0; q < n; ++q) {
        const int64_t i = src[q];
        const __m256 w = _mm256_set1_ps(p.w[i]);
        for (int v = 0; v < V; ++v)
          acc[v] = _mm256_add_ps(acc[v], mul_rounded(load8<DT>(p.x, i * p.sxn + c0 + 8 * v), w));
      }
      for (int v = 0; v < V; ++v) store8<DT>(p.out, ob + c0 + 8 * v, _mm256_div_ps(acc[v], den));
    }
    for (; c0 + 8 <= c; c0 += 8) {
      __m256 acc = _mm256_setzero_ps();
      for (int q = 0; q < n; ++q) {
        const int64_t i = src[q];
        acc = _mm256_add_ps(acc, mul_rounded(load8<DT>(p.x, i * p.sxn + c0),
                                             _mm256_set1_ps(p.w[i])));
      }
      store8<DT>(p.out, ob + c0, _mm256_div_ps(acc, den));
    }
    for (; c0 < c; ++c0) {  // the last channels one by one, same arithmetic
      float acc = 0.f;
      for (int q = 0; q < n; ++q) {
        const int64_t i = src[q];
        acc = acc + mul_rounded1(load1<DT>(p.x, i * p.sxn + c0), p.w[i]);
      }
      store1<DT>(p.out, ob + c0, acc / p.wsum[s]);
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

const ReduceImpl kImpl = {"avx2", &sim_argmax, &merge_slots};

}  // namespace

const ReduceImpl* reduce_impl_avx2() { return &kImpl; }

}  // namespace reduce
}  // namespace cpu
}  // namespace mmk

#else  // not x86
namespace mmk {
namespace cpu {
namespace reduce {
const ReduceImpl* reduce_impl_avx2() { return nullptr; }
}  // namespace reduce
}  // namespace cpu
}  // namespace mmk
#endif
