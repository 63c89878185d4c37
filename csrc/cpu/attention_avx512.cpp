// AVX-512 attention path (its code is compiled for AVX-512 by MMK_TARGET_AVX512, cpu_features.h).
// Two flavours:
//   "avx512"      fp32 FMA micro-kernels; bf16 inputs are widened to fp32 when packing.
//   "avx512_bf16" bf16 inputs only: Q.K^T and P.V with vdpbf16ps on pair-interleaved panels,
//                 P rounded to bf16 for P.V, fp32 accumulation. Only selected when CPUID reports
//                 AVX512_BF16; no bf16 instruction is reachable from the plain "avx512" flavour.
// No torch headers in this file (see attention.h).
#include "cpu/attention.h"
#include "cpu/cpu_features.h"

#ifdef MMK_X86
// GCC 12 reports false "may be used uninitialized" inside its own _mm512_reduce_* intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>
#include <cstring>

MMK_TARGET_AVX512
#include "cpu/attention_bf16_pack.h"
#include "cpu/attention_kernel.h"
#include "cpu/vec_avx512.h"

namespace mmk {
namespace cpu {
namespace {

// Attention's register tiles on 16-lane vectors.
struct AttnV512 : V512 {
  static constexpr int RS = 8;   // S tile: 8 rows x 2 panels = 16 accumulators
  static constexpr int RPV = 4;  // P.V tile: 4 rows x up to 4 vectors
  static constexpr int CPV = 4;
};

// bf16 dot-product micro-kernels.
//   K panels: [panel][d/2][16 keys][2]  (a 64-byte vector holds the (d, d+1) pair of 16 keys)
//   V:        [j/2][Dvp][2]             (a 64-byte vector holds the (j, j+1) pair of 16 columns)
//   P:        bf16 rows of kBK          (pairs broadcast as 32-bit)
struct MicroBf16Dot {
  static constexpr int W = 16;
  using T = __m512;
  using KT = uint16_t;
  using QT = uint16_t;

  static void pack(const AttnParams& p, const AttnSeq& s, int kvh, void* kp_, void* vp_,
                   bool sanitize_v) {
    pack_bf16_pairs(p, s, kvh, (uint16_t*)kp_, (uint16_t*)vp_, sanitize_v, p.D, W);
  }

  // V pair-rows: row "k0" of the block starts at k0 * Dvp elements (k0 even).
  static const uint16_t* v_rows(const AttnParams& p, const AttnSeq&, int, const void* vp,
                                int64_t* ldv, bool) {
    *ldv = round_up(p.Dv, W);
    return (const uint16_t*)vp;
  }

  static const QT* prepare_q(const AttnParams& p, const AttnSeq& s, const AttnItem& it,
                             const AttnScratch&, int64_t* qs) {
    *qs = p.q_ss;
    return (const uint16_t*)p.q + s.bq * p.q_sb + it.h * p.q_sh + (s.q_begin + it.q0) * p.q_ss;
  }

  static inline __m512i bcast_pair(const uint16_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }

  template <int R, int NP>
  static inline void s_tile(const uint16_t* q, int64_t qs, const uint16_t* kp, int D, float* S,
                            const float* colb, float scale2) {
    const int D2 = D / 2;
    __m512 acc[R][NP];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int c = 0; c < NP; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int d2 = 0; d2 < D2; ++d2) {
      __m512i kv[NP];
#pragma GCC unroll 2
      for (int c = 0; c < NP; ++c)
        kv[c] = _mm512_loadu_si512((const void*)(kp + ((int64_t)c * D2 + d2) * 32));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512i qb = bcast_pair(q + r * qs + 2 * d2);
#pragma GCC unroll 2
        for (int c = 0; c < NP; ++c)
          acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)kv[c], (__m512bh)qb);
      }
    }
    // Epilogue as in MicroF32::s_tile: S = acc * scale2 + colb, -inf where colb is -inf.
    const __m512 sc2 = _mm512_set1_ps(scale2);
#pragma GCC unroll 2
    for (int c = 0; c < NP; ++c) {
      const __m512 cb = _mm512_loadu_ps(colb + c * W);
      const __mmask16 dead = V512::neginf_lanes(cb);
      if (dead) {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          _mm512_storeu_ps(S + r * kLDS + c * W,
                           V512::set_neginf(_mm512_fmadd_ps(acc[r][c], sc2, cb), dead));
      } else {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          _mm512_storeu_ps(S + r * kLDS + c * W, _mm512_fmadd_ps(acc[r][c], sc2, cb));
      }
    }
  }

  template <int R>
  static void s_rows(const uint16_t* q, int64_t qs, const uint16_t* kp, int D, int npan, float* S,
                     const float* colb, float scale2) {
    int pn = 0;
    for (; pn + 2 <= npan; pn += 2)
      s_tile<R, 2>(q, qs, kp + (int64_t)pn * D * W, D, S + pn * W, colb + pn * W, scale2);
    if (pn < npan)
      s_tile<R, 1>(q, qs, kp + (int64_t)pn * D * W, D, S + pn * W, colb + pn * W, scale2);
  }

  static void s_block(const uint16_t* q, int64_t qs, const uint16_t* kp, int D, int nq, int npan,
                      float* S, const float* cb, float s2) {
    int r0 = 0;
    for (; r0 + 8 <= nq; r0 += 8) s_rows<8>(q + r0 * qs, qs, kp, D, npan, S + r0 * kLDS, cb, s2);
    const int rem = nq - r0;
    const uint16_t* qr = q + r0 * qs;
    float* Sr = S + r0 * kLDS;
    switch (rem) {
      case 0:  break;
      case 1:  s_rows<1>(qr, qs, kp, D, npan, Sr, cb, s2); break;
      case 2:  s_rows<2>(qr, qs, kp, D, npan, Sr, cb, s2); break;
      case 3:  s_rows<3>(qr, qs, kp, D, npan, Sr, cb, s2); break;
      case 4:  s_rows<4>(qr, qs, kp, D, npan, Sr, cb, s2); break;
      case 5:  s_rows<5>(qr, qs, kp, D, npan, Sr, cb, s2); break;
      case 6:  s_rows<6>(qr, qs, kp, D, npan, Sr, cb, s2); break;
      default: s_rows<7>(qr, qs, kp, D, npan, Sr, cb, s2); break;
    }
  }

  static inline void store_p(float* P, int r, int jv, __m512 e) { store_p_bf16(P, r, jv, e); }
  static inline void zero_p(float* P, int r, int n) { zero_p_bf16(P, r, n); }

  template <int R, int C>
  static inline void pv_tile(const uint16_t* P, const uint16_t* vp, int Dvp, int npairs, float* O,
                             const float* alpha) {
    __m512 acc[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c)
        acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(O + r * Dvp + c * W), a);
    }
    for (int jp = 0; jp < npairs; ++jp) {
      __m512i vv[C];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c)
        vv[c] = _mm512_loadu_si512((const void*)(vp + ((int64_t)jp * Dvp + c * W) * 2));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512i pb = bcast_pair(P + r * kLDS + 2 * jp);
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c)
          acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)vv[c], (__m512bh)pb);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(O + r * Dvp + c * W, acc[r][c]);
  }

  template <int R>
  static void pv_rows(int C, const uint16_t* P, const uint16_t* vp, int Dvp, int np, float* O,
                      const float* alpha) {
    switch (C) {
      case 1:  pv_tile<R, 1>(P, vp, Dvp, np, O, alpha); break;
      case 2:  pv_tile<R, 2>(P, vp, Dvp, np, O, alpha); break;
      case 3:  pv_tile<R, 3>(P, vp, Dvp, np, O, alpha); break;
      default: pv_tile<R, 4>(P, vp, Dvp, np, O, alpha); break;
    }
  }

  // vp points at the V pair-row of the block's first key (k0 is even).
  static void pv_block(const float* P_, const uint16_t* vp, int64_t, int Dvp, int nq, int kb,
                       float* O, const float* alpha) {
    const uint16_t* P = (const uint16_t*)P_;
    const int npairs = (kb + 1) / 2;
    const int nv = Dvp / W;
    const int nch = (nv + 3) / 4;
    for (int ch = 0; ch < nch; ++ch) {
      int c0;
      const int C = pv_chunk(nv, 4, ch, &c0);
      const uint16_t* vpc = vp + c0 * W * 2;
      float* Oc = O + c0 * W;
      int r0 = 0;
      for (; r0 + 4 <= nq; r0 += 4)
        pv_rows<4>(C, P + r0 * kLDS, vpc, Dvp, npairs, Oc + r0 * Dvp, alpha + r0);
      for (; r0 < nq; ++r0)
        pv_rows<1>(C, P + r0 * kLDS, vpc, Dvp, npairs, Oc + r0 * Dvp, alpha + r0);
    }
  }
};

using K512 = AttnKernel<AttnV512, MicroF32<AttnV512>>;
using K512Dot = AttnKernel<AttnV512, MicroBf16Dot>;

const AttnImpl kImplF32 = {"avx512", 16, 4, 8, &K512::pack, &K512::run, &any_nonfinite};
const AttnImpl kImplDot = {"avx512_bf16", 16, 2, 8, &K512Dot::pack, &K512Dot::run, &any_nonfinite};

}  // namespace

const AttnImpl* attn_impl_avx512(int dtype, bool bf16_dot) {
  if (dtype == kBF16 && bf16_dot) return &kImplDot;
  return &kImplF32;
}

}  // namespace cpu
}  // namespace mmk

#else  // not x86
namespace mmk {
namespace cpu {
const AttnImpl* attn_impl_avx512(int, bool) { return nullptr; }
}  // namespace cpu
}  // namespace mmk
#endif
