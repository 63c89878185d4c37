// Flash-style attention forward, written once over a vector-traits class `V` and a micro-kernel
// class `M`, and instantiated in each ISA translation unit (attention_{avx512,avx2,scalar}.cpp).
//
// Include this ONLY from an ISA translation unit, after defining the traits. Everything here has
// internal linkage (anonymous namespace) so that code compiled with ISA flags can never be merged
// by the linker with code from another translation unit. No standard-library templates are
// instantiated here for the same reason.
//
// Algorithm for one work item (sequence s, query head h, query rows [q0, q0+nq)):
//   for each block of kBK keys (up to the causal limit of the last row; one block when that
//   limit is <= kBKOne):
//     S = (Q_blk . K_blk^T)*scale*log2(e) + colb   (M::s_block: register tiles of rows x
//         16-key panels; the epilogue applies the scale and the block's column terms colb =
//         bias*log2(e), -inf past the last visible key, so there is no separate bias pass)
//     rows whose causal limit ends inside the block mask their own tail to -inf
//     m' = max(m, rowmax S); alpha = 2^(m-m'); P = 2^(S-m'); l = l*alpha + rowsum P
//     O = O*alpha + P . V_blk        (M::pv_block)
//   out = O / l, lse = (m + log2 l) * ln 2   (l == 0: fully masked row -> out 0, lse -inf)
// Work is in base 2 (exp2) throughout; only lse is converted back to natural log.
// NaN / inf (docs/nan_semantics.md): a column term of -inf forces S = -inf whatever q.k is (a
// masked key is never read); exp2 propagates NaN, so a NaN or +inf logit of a visible key makes
// l NaN and the row NaN (out, lse, and its scores on the keys it sees). The one place a NaN can
// hide is a block whose other visible logits are all -inf (the max drops it): that rare branch
// looks for it. A NaN / inf in V shows as a non-finite output row that is not a NaN row: run
// reports it and the driver reruns the item on a sanitised V (attention.h).
// Scores: with a single block, kept rows add P / l to the item's partial row right after their
// softmax. Otherwise rows that contribute keep their (unnormalised) P and the running max of each
// block in per-thread scratch; after the last block each kept value is scaled by
// 2^(m_blk - m) / l and summed over rows into the item's partial row (the driver reduces partial
// rows in a fixed order).
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/attention.h"

namespace mmk {
namespace cpu {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_inff();

inline float bf16_to_f32(uint16_t x) {
  uint32_t u = (uint32_t)x << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
// The column-term buffer follows the four kBQ-long row arrays of AttnScratch::rowbuf.
inline float* lim_end(int32_t* lim) { return (float*)(lim + kBQ); }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline float fmaxf_(float a, float b) { return a > b ? a : b; }
inline bool has_nan(const float* x, int n) {
  for (int i = 0; i < n; ++i)
    if (x[i] != x[i]) return true;
  return false;
}
// Replaces NaN / inf by 0 (rare path: V held one).
inline void zero_nonfinite_f32(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) x[i] = 0.f;
  }
}
inline void zero_nonfinite_bf16(uint16_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if ((x[i] & 0x7f80u) == 0x7f80u) x[i] = 0;
}
// Key blocks start at multiples of kBK; the last one takes up to kBK + kBKMerge keys. An item
// that sees at most kBKOne keys has a single block.
inline int block_len(int64_t k0, int64_t kend) {
  const int64_t rem = kend - k0;
  if (k0 == 0 && kend <= kBKOne) return (int)kend;
  return (int)(rem <= kBK + kBKMerge ? rem : kBK);
}

// Software prefetch of rows [r0, r1) of a strided matrix (row_bytes long, ld_bytes apart), one
// hint per 64-byte line. The inputs are (B, L, H, D) views: each head's row is a short piece of
// a long stride, which the hardware prefetchers follow poorly, and at real batch sizes the data
// lives in L3. Without these hints packing K/V and the first touch of Q and out are bound by
// miss latency (measured: ~24 us per packed (sequence, head) of DINOv2-S bf16, vs ~4 us hot).
// locality 3: into L1 (prefetcht0), 2: into L2 (prefetcht1).
template <int Locality>
inline void prefetch_rows(const void* base, int64_t ld_bytes, int64_t r0, int64_t r1,
                          int row_bytes) {
  for (int64_t r = r0; r < r1; ++r) {
    const char* row = (const char*)base + r * ld_bytes;
    for (int off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 0, Locality);
  }
}

// NaN / inf scan (AttnImpl::any_nonfinite): a value is NaN or +-inf exactly when its exponent
// field is all ones. One AND, compare and OR per element, which the compiler vectorises under the
// translation unit's ISA flags; a row found non-finite ends the scan.
template <typename Bits>
inline bool rows_nonfinite(const Bits* p, int64_t nrows, int64_t n, int64_t stride, Bits exp) {
  for (int64_t r = 0; r < nrows; ++r) {
    const Bits* row = p + r * stride;
    Bits bad = 0;
    for (int64_t i = 0; i < n; ++i) bad |= (Bits)((row[i] & exp) == exp);
    if (bad) return true;
  }
  return false;
}

inline bool any_nonfinite(const void* base, int dtype, int64_t nrows, int64_t n, int64_t stride) {
  if (dtype == kF32)
    return rows_nonfinite((const uint32_t*)base, nrows, n, stride, (uint32_t)0x7f800000u);
  const uint16_t exp = dtype == kF16 ? 0x7c00 : 0x7f80;
  return rows_nonfinite((const uint16_t*)base, nrows, n, stride, exp);
}

// Column chunks for P.V: split nv vectors into chunks of at most cmax, as even as possible.
inline int pv_chunk(int nv, int cmax, int idx, int* start) {
  const int nch = (nv + cmax - 1) / cmax, base = nv / nch, extra = nv % nch;
  *start = idx * base + (idx < extra ? idx : extra);
  return base + (idx < extra ? 1 : 0);
}

// ---------------------------------------------------------------------------------------------
// fp32 micro-kernels: K packed as panels [panel][d][W] (float), V as rows [j][Dvp] (float),
// P as float rows of kBK.
// ---------------------------------------------------------------------------------------------
template <class V>
struct MicroF32 {
  static constexpr int W = V::W;
  using T = typename V::T;
  using KT = float;
  using QT = float;

  static void pack(const AttnParams& p, const AttnSeq& s, int kvh, void* kp_, void* vp_,
                   bool sanitize_v) {
    float* kp = (float*)kp_;
    float* vp = (float*)vp_;
    const int D = p.D, Dv = p.Dv, Dvp = (int)round_up(Dv, W);
    const int64_t Lk = s.Lk, npan = ceil_div(Lk, W);
    const int64_t kbase = s.bk * p.k_sb + kvh * p.k_sh + s.k_begin * p.k_ss;
    const int64_t vbase = s.bk * p.v_sb + kvh * p.v_sh + s.k_begin * p.v_ss;
    const int64_t es = p.dtype == kF32 ? 4 : 2;
    const char* k0p = (const char*)p.k + kbase * es;
    const char* v0p = (const char*)p.v + vbase * es;
    // K rows two panels ahead into L1; V rows (read later, by the V copy or by P.V) into L2.
    prefetch_rows<3>(k0p, p.k_ss * es, 0, imin(Lk, 2 * W), (int)(D * es));
    for (int64_t pn = 0; pn < npan; ++pn) {
      prefetch_rows<3>(k0p, p.k_ss * es, imin(Lk, (pn + 2) * W), imin(Lk, (pn + 3) * W),
                       (int)(D * es));
      prefetch_rows<2>(v0p, p.v_ss * es, pn * W, imin(Lk, (pn + 1) * W), (int)(Dv * es));
      float* dst = kp + pn * D * W;
      if (p.dtype == kF16) {
        pack_panel_f16(p, kbase, pn, Lk, dst);
        continue;
      }
      if constexpr (V::kPanel32) {
        if (p.dtype == kF32) {
          const int64_t j0 = pn * W;
          const int nrows = (int)(Lk - j0 < W ? Lk - j0 : W);
          V::pack_panel32((const float*)p.k + kbase + j0 * p.k_ss, p.k_ss * 4, nrows, D, dst);
          continue;
        }
      }
      for (int w = 0; w < W; ++w) {
        const int64_t j = pn * W + w;
        if (j < Lk) {
          const int64_t off = kbase + j * p.k_ss;
          if (p.dtype == kF32) {
            const float* src = (const float*)p.k + off;
            for (int d = 0; d < D; ++d) dst[d * W + w] = src[d];
          } else {
            const uint16_t* src = (const uint16_t*)p.k + off;
            for (int d = 0; d < D; ++d) dst[d * W + w] = bf16_to_f32(src[d]);
          }
        } else {
          for (int d = 0; d < D; ++d) dst[d * W + w] = 0.f;
        }
      }
    }
    if (v_direct(p, s) && !sanitize_v) return;  // P.V reads V in place
    const int64_t Lkp = npan * W;
    for (int64_t j = 0; j < Lkp; ++j) {
      float* dst = vp + j * Dvp;
      int c = 0;
      if (j < Lk) {
        const int64_t off = vbase + j * p.v_ss;
        if (p.dtype == kF32) {
          const float* src = (const float*)p.v + off;
          for (; c < Dv; ++c) dst[c] = src[c];
        } else if (p.dtype == kF16) {
          const uint16_t* src = (const uint16_t*)p.v + off;
          for (; c < Dvp; c += W) V::store(dst + c, V::load_f16(src + c, Dv - c));  // 0 past Dv
        } else {
          const uint16_t* src = (const uint16_t*)p.v + off;
          for (; c < Dv; ++c) dst[c] = bf16_to_f32(src[c]);
        }
      }
      for (; c < Dvp; ++c) dst[c] = 0.f;
    }
    // NaN / inf in V (rare path): 0 in the copy, so that P = 0 of a masked key stays 0.
    if (sanitize_v) zero_nonfinite_f32(vp, Lkp * Dvp);
  }

  // One K panel from fp16 rows: each row widened with V::load_f16 (F16C; fp16.h on the scalar
  // path) into a row-major block, then laid out [d][W] like fp32 rows. Rows past Lk are zero.
  static void pack_panel_f16(const AttnParams& p, int64_t kbase, int64_t pn, int64_t Lk,
                             float* dst) {
    constexpr int kMaxD = 256;  // head dims are checked <= 256 (attention_torch.cpp)
    alignas(64) float rows[W * kMaxD];
    const int D = p.D;
    const int64_t j0 = pn * W;
    const int nrows = (int)(Lk - j0 < W ? Lk - j0 : W);
    for (int w = 0; w < nrows; ++w) {
      const uint16_t* src = (const uint16_t*)p.k + kbase + (j0 + w) * p.k_ss;
      for (int d = 0; d < D; d += W)
        V::storen(rows + w * D + d, V::load_f16(src + d, D - d), D - d);
    }
    if constexpr (V::kPanel32) {
      V::pack_panel32(rows, (int64_t)D * 4, nrows, D, dst);
    } else {
      for (int w = 0; w < W; ++w)
        for (int d = 0; d < D; ++d) dst[d * W + w] = w < nrows ? rows[w * D + d] : 0.f;
    }
  }

  // fp32 V whose rows are whole vectors is read in place (no copy) when the item takes its keys
  // in one block; otherwise (or when it was packed with sanitize_v, v_packed) packed [j][Dvp].
  // Several blocks: P.V reads each kBK-row block of V once per row group, so it must stay in L1,
  // which in place it often cannot: (B, L, H, D) rows H*D*4 bytes apart fall into few L1 sets
  // when that is a multiple of 1-4 KiB (LLaVA 32x128, ViT-L 16x64: all rows in 4 sets). Packed,
  // measured on Zen 5 (2 threads): LLaVA prefill fp32 99.7 -> 89.5 ms, ViT-L/14-336 16.4 -> 14.8;
  // one-block items (ViT-B, DINOv2) lose 3-5% to the copy, so they keep reading in place.
  static bool v_direct(const AttnParams& p, const AttnSeq& s) {
    return p.dtype == kF32 && p.Dv % W == 0 && s.Lk <= kBKOne;
  }
  static const float* v_rows(const AttnParams& p, const AttnSeq& s, int kvh, const void* vp,
                             int64_t* ldv, bool v_packed) {
    if (v_direct(p, s) && !v_packed) {
      *ldv = p.v_ss;
      return (const float*)p.v + s.bk * p.v_sb + kvh * p.v_sh + s.k_begin * p.v_ss;
    }
    *ldv = round_up(p.Dv, W);
    return (const float*)vp;
  }

  // Query rows as float: direct for fp32 input, converted into scratch for bf16 / f16 input.
  static const QT* prepare_q(const AttnParams& p, const AttnSeq& s, const AttnItem& it,
                             const AttnScratch& sc, int64_t* qs) {
    const int64_t off = s.bq * p.q_sb + it.h * p.q_sh + (s.q_begin + it.q0) * p.q_ss;
    if (p.dtype == kF32) {
      *qs = p.q_ss;
      return (const float*)p.q + off;
    }
    const uint16_t* src = (const uint16_t*)p.q + off;
    for (int r = 0; r < it.nq; ++r) {
      if (p.dtype == kF16) {
        for (int d = 0; d < p.D; d += W)
          V::storen(sc.Qf + r * p.D + d, V::load_f16(src + r * p.q_ss + d, p.D - d), p.D - d);
      } else if constexpr (V::kBf16Vec) {
        for (int d = 0; d < p.D; d += W)
          V::storen(sc.Qf + r * p.D + d, V::load_bf16(src + r * p.q_ss + d, p.D - d), p.D - d);
      } else {
        for (int d = 0; d < p.D; ++d) sc.Qf[r * p.D + d] = bf16_to_f32(src[r * p.q_ss + d]);
      }
    }
    *qs = p.D;
    return sc.Qf;
  }

  template <int R, int NP>
  static inline void s_tile(const float* q, int64_t qs, const float* kp, int D, float* S,
                            const float* colb, float scale2) {
    T acc[R][NP];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int c = 0; c < NP; ++c) acc[r][c] = V::zero();
    for (int d = 0; d < D; ++d) {
      T kv[NP];
#pragma GCC unroll 2
      for (int c = 0; c < NP; ++c) kv[c] = V::load(kp + ((int64_t)c * D + d) * W);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const T qb = V::set1(q[r * qs + d]);
#pragma GCC unroll 2
        for (int c = 0; c < NP; ++c) acc[r][c] = V::fmadd(qb, kv[c], acc[r][c]);
      }
    }
    // Epilogue: base-2 logits, S = acc * scale*log2(e) + colb (bias*log2(e), or -inf past the
    // block's visible keys); one column vector serves the tile's R rows. Where colb is -inf, S is
    // -inf even if q.k is NaN or +inf (a masked key is never read); only panels that hold such a
    // column (the block's ragged end, keys with a -inf bias) pay for the blend.
    const T sc2 = V::set1(scale2);
#pragma GCC unroll 2
    for (int c = 0; c < NP; ++c) {
      const T cb = V::load(colb + c * W);
      const typename V::Mask dead = V::neginf_lanes(cb);
      if (V::any(dead)) {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          V::store(S + r * kLDS + c * W, V::set_neginf(V::fmadd(acc[r][c], sc2, cb), dead));
      } else {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) V::store(S + r * kLDS + c * W, V::fmadd(acc[r][c], sc2, cb));
      }
    }
  }

  template <int R>
  static void s_rows(const float* q, int64_t qs, const float* kp, int D, int npan, float* S,
                     const float* colb, float scale2) {
    int pn = 0;
    for (; pn + 2 <= npan; pn += 2)
      s_tile<R, 2>(q, qs, kp + (int64_t)pn * D * W, D, S + pn * W, colb + pn * W, scale2);
    if (pn < npan)
      s_tile<R, 1>(q, qs, kp + (int64_t)pn * D * W, D, S + pn * W, colb + pn * W, scale2);
  }

  // S[r][0 : npan*W] = (q_r . k_j) * scale2 + colb[j] for the npan panels starting at kp.
  static void s_block(const float* q, int64_t qs, const float* kp, int D, int nq, int npan,
                      float* S, const float* colb, float scale2) {
    int r0 = 0;
    for (; r0 + V::RS <= nq; r0 += V::RS)
      s_rows<V::RS>(q + r0 * qs, qs, kp, D, npan, S + r0 * kLDS, colb, scale2);
    const int rem = nq - r0;
    if (rem > 0) dispatch_rows(rem, q + r0 * qs, qs, kp, D, npan, S + r0 * kLDS, colb, scale2);
  }
  static void dispatch_rows(int rem, const float* q, int64_t qs, const float* kp, int D, int npan,
                            float* S, const float* cb, float s2) {
    switch (rem) {
      case 1:  s_rows<1>(q, qs, kp, D, npan, S, cb, s2); break;
      case 2:  s_rows<2>(q, qs, kp, D, npan, S, cb, s2); break;
      case 3:  s_rows<3>(q, qs, kp, D, npan, S, cb, s2); break;
      case 4:  s_rows<4>(q, qs, kp, D, npan, S, cb, s2); break;
      case 5:  s_rows<(5 < V::RS ? 5 : 1)>(q, qs, kp, D, npan, S, cb, s2); break;
      case 6:  s_rows<(6 < V::RS ? 6 : 1)>(q, qs, kp, D, npan, S, cb, s2); break;
      default: s_rows<(7 < V::RS ? 7 : 1)>(q, qs, kp, D, npan, S, cb, s2); break;
    }
  }

  // Decoding, one fp32 query row against keys read in place (rows kss floats apart): S[0][0 :
  // npan * W] for the block's kb keys. Per 16 keys: 16 vectors of partial sums over D, one
  // register transpose and 15 adds, where a pack transposes all D x 16 values of the panel (and
  // the FMA tiles read them back). AVX-512 only (V::transpose16).
  static constexpr bool kDirectRow = V::kPanel32;
  static void s_row_direct(const float* q, const float* krow, int64_t kss, int D, int kb, int npan,
                           float* S, const float* colb, float scale2) {
    if constexpr (V::kPanel32) {
      static_assert(W == 16, "one 16 x 16 transpose per panel");
      const T sc2 = V::set1(scale2);
      for (int pn = 0; pn < npan; ++pn) {
        T acc[16];
#pragma GCC unroll 16
        for (int w = 0; w < 16; ++w) {
          const int64_t j = (int64_t)pn * 16 + w;
          T a = V::zero();
          if (j < kb) {  // keys past the block are never read (their column term is -inf)
            const float* kr = krow + j * kss;
            int d = 0;
            for (; d + W <= D; d += W) a = V::fmadd(V::load(q + d), V::load(kr + d), a);
            if (d < D) a = V::fmadd(V::loadn(q + d, D - d), V::loadn(kr + d, D - d), a);
          }
          acc[w] = a;
        }
        V::transpose16(acc);
        T sum = acc[0];
#pragma GCC unroll 15
        for (int c = 1; c < 16; ++c) sum = V::add(sum, acc[c]);
        // The epilogue of s_tile: base-2 logits plus column terms, -inf where colb is -inf.
        const T cb = V::load(colb + pn * W);
        const typename V::Mask dead = V::neginf_lanes(cb);
        T x = V::fmadd(sum, sc2, cb);
        if (V::any(dead)) x = V::set_neginf(x, dead);
        V::store(S + pn * W, x);
      }
    }
  }

  static inline void store_p(float* P, int r, int jv, T e) { V::store(P + r * kLDS + jv, e); }
  static inline void zero_p(float* P, int r, int n) {
    for (int j = 0; j < n; j += W) V::store(P + r * kLDS + j, V::zero());
  }

  template <int R, int C>
  static inline void pv_tile(const float* P, const float* vp, int64_t ldv, int Dvp, int kb,
                             float* O, const float* alpha) {
    T acc[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T a = V::set1(alpha[r]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = V::mul(V::load(O + r * Dvp + c * W), a);
    }
    for (int j = 0; j < kb; ++j) {
      T vv[C];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) vv[c] = V::load(vp + (int64_t)j * ldv + c * W);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const T pb = V::set1(P[r * kLDS + j]);
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) acc[r][c] = V::fmadd(pb, vv[c], acc[r][c]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) V::store(O + r * Dvp + c * W, acc[r][c]);
  }

  template <int R>
  static void pv_rows(int C, const float* P, const float* vp, int64_t ldv, int Dvp, int kb,
                      float* O, const float* alpha) {
    switch (C) {
      case 1:  pv_tile<R, 1>(P, vp, ldv, Dvp, kb, O, alpha); break;
      case 2:  pv_tile<R, 2>(P, vp, ldv, Dvp, kb, O, alpha); break;
      case 3:  pv_tile<R, (3 <= V::CPV ? 3 : 1)>(P, vp, ldv, Dvp, kb, O, alpha); break;
      default: pv_tile<R, (4 <= V::CPV ? 4 : 1)>(P, vp, ldv, Dvp, kb, O, alpha); break;
    }
  }

  // O[r] = O[r]*alpha[r] + sum_j P[r][j] V[j] for j < kb; vp = V row of the block's first key,
  // rows ldv apart.
  static void pv_block(const float* P, const float* vp, int64_t ldv, int Dvp, int nq, int kb,
                       float* O, const float* alpha) {
    const int nv = Dvp / W;
    const int nch = (nv + V::CPV - 1) / V::CPV;
    for (int ch = 0; ch < nch; ++ch) {
      int c0;
      const int C = pv_chunk(nv, V::CPV, ch, &c0);
      const float* vpc = vp + c0 * W;
      float* Oc = O + c0 * W;
      int r0 = 0;
      for (; r0 + V::RPV <= nq; r0 += V::RPV)
        pv_rows<V::RPV>(C, P + r0 * kLDS, vpc, ldv, Dvp, kb, Oc + r0 * Dvp, alpha + r0);
      for (; r0 < nq; ++r0)
        pv_rows<1>(C, P + r0 * kLDS, vpc, ldv, Dvp, kb, Oc + r0 * Dvp, alpha + r0);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// The per-item kernel, shared by every micro-kernel.
// ---------------------------------------------------------------------------------------------
// Head dim of the packed K panels: D, or D rounded up to M::kDAlign when the micro-kernel
// declares one (AMX reads 32 dims per tile; the dims past D are zero). AttnImpl::d_align is the
// same number for the driver.
template <class M, class = int>
struct KDim {
  static int of(int D) { return D; }
};
template <class M>
struct KDim<M, decltype((void)M::kDAlign, 0)> {
  static int of(int D) { return (int)round_up(D, M::kDAlign); }
};

// A micro-kernel that holds state over an item's blocks (AMX: the tile configuration, set in
// prepare_q) declares end_item(); AttnKernel::run calls it after the item's last block.
template <class M, class = int>
struct ItemEnd {
  static void call() {}
};
template <class M>
struct ItemEnd<M, decltype((void)&M::end_item, 0)> {
  static void call() { M::end_item(); }
};

// A micro-kernel that computes single-row S tiles from K in place (MicroF32 on AVX-512) declares
// kDirectRow; decoding items use it instead of packing each block.
template <class M, class = int>
struct DirectRow {
  static constexpr bool value = false;
};
template <class M>
struct DirectRow<M, decltype((void)M::kDirectRow, 0)> {
  static constexpr bool value = M::kDirectRow;
};

template <class V, class M>
struct AttnKernel {
  static constexpr int W = V::W;
  using T = typename V::T;
  using KT = typename M::KT;
  using QT = typename M::QT;

  static void pack(const AttnParams& p, const AttnSeq& s, int kvh, void* kp, void* vp,
                   bool sanitize_v) {
    M::pack(p, s, kvh, kp, vp, sanitize_v);
  }

  static bool run(const AttnParams& p, const AttnSeq& s, const AttnItem& it, const void* kp_,
                  const void* vp_, const AttnScratch& sc, bool v_sanitized) {
    const int D = p.D, Dk = KDim<M>::of(D), Dv = p.Dv, Dvp = (int)round_up(Dv, W);
    const int nq = it.nq, h = it.h;
    const int64_t Lq = s.Lq, Lk = s.Lk;
    const int kvh = h / (p.Hq / p.Hkv);
    const bool jit = sc.kjit != nullptr;  // pack each block into thread scratch (kJitRows)
    const KT* kp = (const KT*)kp_;
    int64_t ldv = 0;
    const KT* vp = jit ? nullptr : M::v_rows(p, s, kvh, vp_, &ldv, v_sanitized);
    {
      // The item's query rows (read by the S tiles) and output rows (written at the end).
      const int64_t es = p.dtype == kF32 ? 4 : 2, row = s.q_begin + it.q0;
      prefetch_rows<3>((const char*)p.q + (s.bq * p.q_sb + h * p.q_sh + row * p.q_ss) * es,
                       p.q_ss * es, 0, nq, (int)(D * es));
      prefetch_rows<2>((const char*)p.out + (s.bq * p.o_sb + h * p.o_sh + row * p.o_ss) * es,
                       p.o_ss * es, 0, nq, (int)(Dv * es));
    }

    float* m = sc.rowbuf;
    float* l = m + kBQ;
    float* alpha = l + kBQ;
    int32_t* lim = (int32_t*)(alpha + kBQ);
    const int64_t off = Lk - Lq;
    // Keys past the last finite bias entry contribute exactly 0 (key padding): skip them.
    const float* bias = p.bias ? p.bias + s.bk * p.bias_sb + h * p.bias_sh + s.k_begin : nullptr;
    int64_t lk_eff = Lk;
    if (bias)
      while (lk_eff > 0 && bias[lk_eff - 1] == kNegInf) --lk_eff;
    for (int r = 0; r < nq; ++r) {
      lim[r] = (int32_t)(p.causal ? imax(0, imin(lk_eff, it.q0 + r + off + 1)) : lk_eff);
      m[r] = kNegInf;
      l[r] = 0.f;
    }
    const int64_t kend = nq > 0 ? lim[nq - 1] : 0;
    for (int64_t i = 0; i < (int64_t)nq * Dvp; i += W) V::store(sc.O + i, V::zero());

    // Rows whose probabilities are kept for the scores.
    int keep_lo = 0, keep_hi = 0;
    if (it.part != nullptr) {
      if (p.scores_mode == 3) {
        keep_hi = nq;
      } else {
        const int64_t tr = (p.scores_mode == 1 ? 0 : Lq - 1) - it.q0;
        if (tr >= 0 && tr < nq) {
          keep_lo = (int)tr;
          keep_hi = (int)tr + 1;
        }
      }
    }

    // One key block (kend <= kBKOne): each row's final max and sum are known right after its
    // softmax, so kept rows add P = e / l straight into the partial row (no keep buffer).
    const bool direct_scores = it.part != nullptr && kend <= kBKOne;
    if (direct_scores)
      for (int64_t j = 0; j < round_up(Lk, W); j += W) V::store(it.part + j, V::zero());

    int64_t qs = 0;
    const QT* q = M::prepare_q(p, s, it, sc, &qs);
    const float scale2 = p.scale * kLog2e;
    const T log2e = V::set1(kLog2e);
    const T neginf = V::set1(kNegInf);
    float* colb = lim_end(lim);  // kLDS column terms of the current block

    // jit without scores: blocks of up to kJitKeys keys (a decoding row rescales O once per
    // block; the scores' keep buffers assume block_len's blocks).
    const bool long_blocks = jit && it.part == nullptr;
    // One fp32 row whose V rows are whole vectors: S from K in place (M::s_row_direct), V read
    // in place; the rare path's rerun (v_sanitized) packs instead.
    const bool direct_row =
        DirectRow<M>::value && jit && nq == 1 && p.dtype == kF32 && Dv % W == 0 && !v_sanitized;
    int kbi = 0;
    for (int64_t k0 = 0, kb = 0; k0 < kend; k0 += kb, ++kbi) {
      kb = long_blocks ? imin(kend - k0, kJitKeys) : block_len(k0, kend);
      const int npan = (int)ceil_div(kb, W);
      const int kbp = npan * W;
      // Column terms, added to the scaled products in the S tile epilogue: bias*log2(e) (0
      // without bias), -inf for keys no row of the item sees (past kend, or padding).
      const int kvis = (int)kb;  // k0 + kb <= kend
      for (int jv = 0; jv < kbp; jv += W) {
        T b = V::zero();
        if (bias) {
          const int64_t j = k0 + jv;
          b = V::mul(j + W <= Lk ? V::load(bias + j) : V::loadn(bias + j, (int)(Lk - j)), log2e);
        }
        if (jv + W > kvis) b = V::mask_ge(b, kvis - jv);
        V::store(colb + jv, b);
      }
      const KT* kblk = nullptr;
      const KT* vblk;
      bool s_done = false;
      if (jit) {  // the block's keys as a sequence of their own, packed in the pack's layout
        AttnSeq sb = s;
        sb.k_begin = s.k_begin + k0;
        sb.Lk = kb;
        if constexpr (DirectRow<M>::value) {
          if (direct_row) {  // nothing packed: S from K in place, V in place
            const float* krow =
                (const float*)p.k + s.bk * p.k_sb + kvh * p.k_sh + sb.k_begin * p.k_ss;
            M::s_row_direct(q, krow, p.k_ss, D, (int)kb, npan, sc.S, colb, scale2);
            vblk = M::v_rows(p, sb, kvh, sc.vjit, &ldv, false);
            s_done = true;
          }
        }
        if (!s_done) {
          M::pack(p, sb, kvh, sc.kjit, sc.vjit, v_sanitized);
          kblk = (const KT*)sc.kjit;
          vblk = M::v_rows(p, sb, kvh, sc.vjit, &ldv, v_sanitized);  // fp32: V in place
        }
      } else {
        kblk = kp + k0 * Dk;
        vblk = vp + k0 * ldv;
      }
      if (!s_done) M::s_block(q, qs, kblk, Dk, nq, npan, sc.S, colb, scale2);

      for (int r = 0; r < nq; ++r) {
        float* srow = sc.S + r * kLDS;
        const bool keep = r >= keep_lo && r < keep_hi;
        // Kept probabilities: back into the S row (direct scores) or into the keep buffer.
        float* krow = !keep ? nullptr : direct_scores ? srow : sc.keep + r * sc.ldk + k0;
        const int nvalid = (int)imax(0, imin((int64_t)lim[r] - k0, kb));
        // S holds base-2 logits already; rows that see fewer keys than the block (causal) mask
        // their own tail here.
        T mx = neginf;
        if (nvalid > 0) {
          if (nvalid < kvis) {
            for (int jv = 0; jv < kbp; jv += W) {
              T x = V::load(srow + jv);
              if (jv + W > nvalid) {
                x = V::mask_ge(x, nvalid - jv);
                V::store(srow + jv, x);
              }
              mx = V::max(mx, x);
            }
          } else {
            for (int jv = 0; jv < kbp; jv += W) mx = V::max(mx, V::load(srow + jv));
          }
        }
        const float mnew = fmaxf_(m[r], V::hmax(mx));
        if (nvalid == 0 || mnew == kNegInf) {  // no visible key in this block, or none yet
          // The max drops NaN: a NaN logit among -inf ones lands here (rare); it makes the row
          // NaN (l stays NaN through every later block).
          if (nvalid > 0 && has_nan(srow, kbp)) l[r] = __builtin_nanf("");
          alpha[r] = 1.f;
          M::zero_p(sc.P, r, kbp);
          if (keep && !direct_scores) {
            for (int jv = 0; jv < kbp; jv += W) V::store(krow + jv, V::zero());
            sc.keep_m[r * sc.nkb + kbi] = kNegInf;
          }
          continue;
        }
        const float a = V::first(V::exp2(V::set1(m[r] - mnew)));
        const T nm = V::set1(-mnew);
        T sum = V::zero();
        for (int jv = 0; jv < kbp; jv += W) {
          const T e = V::exp2(V::add(V::load(srow + jv), nm));
          sum = V::add(sum, e);
          M::store_p(sc.P, r, jv, e);
          if (keep) V::store(krow + jv, e);
        }
        l[r] = l[r] * a + V::hsum(sum);
        m[r] = mnew;
        alpha[r] = a;
        if (keep && direct_scores) {
          if (l[r] > 0.f) {  // l[r] >= 1 (the max element gives e = 1); NaN rows: at the end
            const T invl = V::set1(1.f / l[r]);
            for (int jv = 0; jv < kbp; jv += W)
              V::store(it.part + jv, V::fmadd(V::load(krow + jv), invl, V::load(it.part + jv)));
          }
        } else if (keep) {
          sc.keep_m[r * sc.nkb + kbi] = mnew;
        }
      }
      M::pv_block(sc.P, vblk, ldv, Dvp, nq, (int)kb, sc.O, alpha);
    }
    ItemEnd<M>::call();
    const int nblocks = kbi;

    // Output and lse. nonfin: NaN once a row that is not a NaN row has a non-finite output (only a
    // NaN / inf in V makes one: v * 0 is 0 for finite v).
    const T zero = V::zero();
    T nonfin = zero;
    for (int r = 0; r < nq; ++r) {
      const int64_t row = s.q_begin + it.q0 + r;
      const int64_t ooff = s.bq * p.o_sb + h * p.o_sh + row * p.o_ss;
      float* orow = sc.O + r * Dvp;
      const bool empty = l[r] == 0.f;  // fully masked; l NaN: NaN row (out and lse NaN)
      const T inv = V::set1(empty ? 0.f : 1.f / l[r]);
      if (l[r] == l[r]) {
        for (int c = 0; c < Dvp; c += W) {
          const T o = V::mul(V::load(orow + c), inv);
          V::store(orow + c, o);
          nonfin = V::fmadd(o, zero, nonfin);
        }
      } else {  // a NaN row
        for (int c = 0; c < Dvp; c += W) V::store(orow + c, V::mul(V::load(orow + c), inv));
      }
      if (p.dtype == kF32) {
        float* dst = (float*)p.out + ooff;
        int c = 0;
        for (; c + W <= Dv; c += W) V::store(dst + c, V::load(orow + c));
        if (c < Dv) V::storen(dst + c, V::load(orow + c), Dv - c);
      } else if (p.dtype == kF16) {  // round to nearest even, NaN stays NaN
        uint16_t* dst = (uint16_t*)p.out + ooff;
        for (int c = 0; c < Dv; c += W) V::store_f16(dst + c, V::load(orow + c), Dv - c);
      } else {
        uint16_t* dst = (uint16_t*)p.out + ooff;
        if constexpr (V::kBf16Vec) {
          for (int c = 0; c < Dv; c += W) V::store_bf16(dst + c, V::load(orow + c), Dv - c);
        } else {
          for (int c = 0; c < Dv; ++c) dst[c] = f32_to_bf16(orow[c]);
        }
      }
      if (p.lse)
        p.lse[s.bq * p.lse_sb + h * p.lse_sh + row * p.lse_ss] =
            empty ? kNegInf : (m[r] + __builtin_log2f(l[r])) * kLn2;
    }

    // Scores partial row: part[j] = sum over kept rows of P_final[r][j].
    if (it.part != nullptr && !direct_scores) {
      float* part = it.part;
      // Per (row, block) factor 2^(m_blk - m) / l, 0 for rows that are fully masked.
      for (int r = keep_lo; r < keep_hi; ++r) {
        float* f = sc.keep_m + r * sc.nkb;
        const float invl = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (int b = 0; b < nblocks; ++b) {
          const float mb = f[b];
          f[b] =
              (invl == 0.f || mb == kNegInf) ? 0.f : V::first(V::exp2(V::set1(mb - m[r]))) * invl;
        }
      }
      int64_t j = 0;
      for (int b = 0; b < nblocks; ++b) {
        const int64_t k0 = (int64_t)b * kBK;
        const int64_t kstop = k0 + round_up(block_len(k0, kend), W);
        for (j = k0; j < kstop; j += W) {
          T acc = V::zero();
          for (int r = keep_lo; r < keep_hi; ++r) {
            if (j >= lim[r] || l[r] != l[r]) continue;  // NaN rows: below
            const float fr = sc.keep_m[r * sc.nkb + b];
            acc = V::fmadd(V::load(sc.keep + r * sc.ldk + j), V::set1(fr), acc);
          }
          V::store(part + j, acc);
        }
      }
      for (; j < Lk; j += W) V::store(part + j, V::zero());
    }
    // A kept NaN row: its probabilities are NaN on every key it sees (0 on masked keys).
    if (it.part != nullptr) {
      for (int r = keep_lo; r < keep_hi; ++r) {
        if (l[r] == l[r]) continue;
        for (int64_t j = 0; j < lim[r]; ++j)
          if (bias == nullptr || bias[j] != kNegInf) it.part[j] = __builtin_nanf("");
      }
    }
    const float nf = V::hsum(nonfin);
    return !v_sanitized && nf != nf;
  }
};

}  // namespace
}  // namespace cpu
}  // namespace mmk
