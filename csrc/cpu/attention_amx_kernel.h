// AMX bf16 micro-kernel of the attention kernel (attention_kernel.h: AttnKernel keeps the online
// softmax, masks, column terms, scores, lse and NaN rules), written once over the tile traits
// `Tile`: TileAmx (tile_amx.h, the tmm registers; attention_amx.cpp) or TileEmu (tile_emu.h, the
// same instructions in plain C++; attention_amx_emu.cpp, the "amx_emulated" path of the tests).
//
// Every tile is 16 rows x 64 bytes. Layouts (attention_bf16_pack.h, the B tiles read them as is):
//   K panels [panel][Dk/2][16 keys][2], Dk = round_up(D, 32) (dims past D zero);
//   V pair rows [Lk_pad/2][Dvp][2], Lk_pad = round_up(Lk, 32) (rows past Lk zero);
//   Q: the item's rows copied to scratch as bf16 rows of Dk, zero past D and past row nq up to a
//      multiple of 16 (A tiles never read the user's tensor, nor past the scratch);
//   P: bf16 rows (stride kLDS elements), zero-padded to 32 keys before P.V.
// S = Q.K^T: C tiles 0-3 = 2 row tiles x 2 key panels, A tiles 4-5 = Q rows (32 dims), B tiles
// 6-7 = K panels (32 dims); 1x2 / 2x1 / 1x1 at the edges; C goes to the S scratch and the S
// epilogue of MicroBf16Dot follows (S = acc * scale2 + colb, -inf where colb is -inf).
// P.V: O *= alpha in fp32, then C tiles 0-3 = 2 row tiles x 2 tiles of 16 output columns loaded
// from O (on an item's first block, O is zero: the C tiles start at zero, no rescale; later blocks
// skip the rescale when every alpha is 1), A tiles 4-5 = P rows (32 keys), B tiles 6-7 = V pair
// rows (32 keys x 16 columns), stored back to O. Tiles are configured once per item (prepare_q,
// before its first block) and released after its last block (end_item, called by AttnKernel):
// ldtilecfg zeroes every tile and is not cheap, and a long causal item has up to Lk/64 blocks.
// Include only from an AMX / AVX-512 translation unit after its MMK_TARGET_* pragma.
#pragma once

#include "cpu/attention_bf16_pack.h"
#include "cpu/attention_kernel.h"
#include "cpu/vec_avx512.h"

namespace mmk {
namespace cpu {
namespace {

template <class Tile>
struct MicroAmxBf16 {
  static constexpr int W = 16;        // keys per K panel = columns per C tile
  static constexpr int kDAlign = 32;  // dims per A / B tile of S (KDim, AttnImpl::d_align)
  static constexpr int kKeys = 32;    // keys per A / B tile of P.V (V pack padding)
  using T = __m512;
  using KT = uint16_t;
  using QT = uint16_t;

  static int dk(int D) { return (int)round_up(D, kDAlign); }

  static void pack(const AttnParams& p, const AttnSeq& s, int kvh, void* kp, void* vp,
                   bool sanitize_v) {
    pack_bf16_pairs(p, s, kvh, (uint16_t*)kp, (uint16_t*)vp, sanitize_v, dk(p.D), kKeys);
  }

  // V pair rows: the block's first key k0 (even) starts at k0 * Dvp elements.
  static const uint16_t* v_rows(const AttnParams& p, const AttnSeq&, int, const void* vp,
                                int64_t* ldv, bool) {
    *ldv = round_up(p.Dv, W);
    return (const uint16_t*)vp;
  }

  static inline __mmask32 lanes32(int n) {
    return n <= 0 ? (__mmask32)0 : n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1u);
  }

  // True from prepare_q (called once per item, before its blocks) until the item's first
  // pv_block: O is still the zero AttnKernel wrote, so that block starts its C tiles at zero
  // instead of rescaling O and loading it.
  static bool& first_block() {
    static thread_local bool first = false;
    return first;
  }

  static const QT* prepare_q(const AttnParams& p, const AttnSeq& s, const AttnItem& it,
                             const AttnScratch& sc, int64_t* qs) {
    first_block() = true;
    Tile::configure();  // for the item's blocks; end_item releases
    const int D = p.D, Dk = dk(D), nq = it.nq, rows = (int)round_up(nq, 16);
    const uint16_t* src =
        (const uint16_t*)p.q + s.bq * p.q_sb + it.h * p.q_sh + (s.q_begin + it.q0) * p.q_ss;
    uint16_t* dst = (uint16_t*)sc.Qf;  // kBQ * Dk floats: room for the bf16 rows
    for (int r = 0; r < rows; ++r)
      for (int d = 0; d < Dk; d += 32) {
        const __m512i x = r < nq ? _mm512_maskz_loadu_epi16(lanes32(D - d), src + r * p.q_ss + d)
                                 : _mm512_setzero_si512();
        _mm512_storeu_si512((void*)(dst + r * Dk + d), x);
      }
    *qs = Dk;
    return dst;
  }

  // C tiles (0, 1; 2, 3) = Q rows [0, 16 R) . K panels [0, NP) over Dk dims, stored into S.
  template <int R, int NP>
  static inline void s_tile(const uint16_t* q, int64_t qs, const uint16_t* kp, int Dk, float* S) {
    Tile::template zero<0>();
    if constexpr (NP == 2) Tile::template zero<1>();
    if constexpr (R == 2) Tile::template zero<2>();
    if constexpr (R == 2 && NP == 2) Tile::template zero<3>();
    for (int d = 0; d < Dk; d += 32) {
      Tile::template load<4>(q + d, qs * 2);
      if constexpr (R == 2) Tile::template load<5>(q + 16 * qs + d, qs * 2);
      Tile::template load<6>(kp + d * W, 64);
      if constexpr (NP == 2) Tile::template load<7>(kp + ((int64_t)Dk + d) * W, 64);
      Tile::template dp_bf16<0, 4, 6>();
      if constexpr (NP == 2) Tile::template dp_bf16<1, 4, 7>();
      if constexpr (R == 2) Tile::template dp_bf16<2, 5, 6>();
      if constexpr (R == 2 && NP == 2) Tile::template dp_bf16<3, 5, 7>();
    }
    constexpr int64_t ss = kLDS * 4;
    Tile::template store<0>(S, ss);
    if constexpr (NP == 2) Tile::template store<1>(S + W, ss);
    if constexpr (R == 2) Tile::template store<2>(S + 16 * kLDS, ss);
    if constexpr (R == 2 && NP == 2) Tile::template store<3>(S + 16 * kLDS + W, ss);
  }

  // The epilogue of MicroBf16Dot::s_tile on `rows` rows of np panels: S = acc * scale2 + colb,
  // -inf where colb is -inf (even if q.k is NaN or +inf: a masked key is never read).
  static inline void s_epilogue(float* S, const float* colb, int rows, int np, float scale2) {
    const __m512 sc2 = _mm512_set1_ps(scale2);
    for (int c = 0; c < np; ++c) {
      const __m512 cb = _mm512_loadu_ps(colb + c * W);
      const __mmask16 dead = V512::neginf_lanes(cb);
      for (int r = 0; r < rows; ++r) {
        float* s = S + r * kLDS + c * W;
        _mm512_storeu_ps(s, V512::set_neginf(_mm512_fmadd_ps(_mm512_loadu_ps(s), sc2, cb), dead));
      }
    }
  }

  // S[r][0 : npan*W] = (q_r . k_j) * scale2 + colb[j] for r < nq and the npan panels at kp.
  static void s_block(const uint16_t* q, int64_t qs, const uint16_t* kp, int Dk, int nq, int npan,
                      float* S, const float* colb, float scale2) {
    const int nrt = (int)ceil_div(nq, 16);
    for (int rt = 0; rt < nrt; rt += 2) {
      const bool r2 = rt + 2 <= nrt;
      const uint16_t* qr = q + rt * 16 * qs;
      float* Sr = S + rt * 16 * kLDS;
      const int rows = (int)imin(nq - rt * 16, r2 ? 32 : 16);
      for (int pn = 0; pn < npan; pn += 2) {
        const bool p2 = pn + 2 <= npan;
        const uint16_t* kpn = kp + (int64_t)pn * Dk * W;
        if (r2 && p2)
          s_tile<2, 2>(qr, qs, kpn, Dk, Sr + pn * W);
        else if (r2)
          s_tile<2, 1>(qr, qs, kpn, Dk, Sr + pn * W);
        else if (p2)
          s_tile<1, 2>(qr, qs, kpn, Dk, Sr + pn * W);
        else
          s_tile<1, 1>(qr, qs, kpn, Dk, Sr + pn * W);
        s_epilogue(Sr + pn * W, colb + pn * W, rows, p2 ? 2 : 1, scale2);
      }
    }
  }

  // P as bf16 rows (attention_bf16_pack.h, as MicroBf16Dot).
  static inline void store_p(float* P, int r, int jv, __m512 e) { store_p_bf16(P, r, jv, e); }
  static inline void zero_p(float* P, int r, int n) { zero_p_bf16(P, r, n); }

  // C tiles (0, 1; 2, 3) = O rows [0, 16 R) x columns [0, 16 C) += P . V over nkc chunks of 32
  // keys; vp = the block's first V pair row, offset to the first column.
  template <int R, int C>
  static inline void pv_tile(const uint16_t* P, const uint16_t* vp, int Dvp, int nkc, float* O,
                             bool fresh) {
    const int64_t os = (int64_t)Dvp * 4, vs = (int64_t)Dvp * 4;
    constexpr int64_t ps = kLDS * 2;
    if (fresh) {  // O == 0
      Tile::template zero<0>();
      if constexpr (C == 2) Tile::template zero<1>();
      if constexpr (R == 2) Tile::template zero<2>();
      if constexpr (R == 2 && C == 2) Tile::template zero<3>();
    } else {
      Tile::template load<0>(O, os);
      if constexpr (C == 2) Tile::template load<1>(O + W, os);
      if constexpr (R == 2) Tile::template load<2>(O + 16 * Dvp, os);
      if constexpr (R == 2 && C == 2) Tile::template load<3>(O + 16 * Dvp + W, os);
    }
    for (int kc = 0; kc < nkc; ++kc) {
      const uint16_t* vk = vp + (int64_t)kc * kKeys * Dvp;
      Tile::template load<4>(P + kc * kKeys, ps);
      if constexpr (R == 2) Tile::template load<5>(P + 16 * kLDS + kc * kKeys, ps);
      Tile::template load<6>(vk, vs);
      if constexpr (C == 2) Tile::template load<7>(vk + 2 * W, vs);
      Tile::template dp_bf16<0, 4, 6>();
      if constexpr (C == 2) Tile::template dp_bf16<1, 4, 7>();
      if constexpr (R == 2) Tile::template dp_bf16<2, 5, 6>();
      if constexpr (R == 2 && C == 2) Tile::template dp_bf16<3, 5, 7>();
    }
    Tile::template store<0>(O, os);
    if constexpr (C == 2) Tile::template store<1>(O + W, os);
    if constexpr (R == 2) Tile::template store<2>(O + 16 * Dvp, os);
    if constexpr (R == 2 && C == 2) Tile::template store<3>(O + 16 * Dvp + W, os);
  }

  // O[r] = O[r]*alpha[r] + sum_{j < kb} P[r][j] V[j] for r < nq; vp = V pair row of the block's
  // first key (k0 is even). Rows [nq, round_up(nq, 16)) of O are scratch the tiles also compute.
  static void pv_block(const float* P_, const uint16_t* vp, int64_t, int Dvp, int nq, int kb,
                       float* O, const float* alpha) {
    // The A tiles read P rows up to a multiple of 16 and keys up to a multiple of 32: zero what
    // the softmax did not write (P is the item's scratch, AttnScratch::P).
    uint16_t* P = (uint16_t*)P_;
    const int nq16 = (int)round_up(nq, 16), kbp = (int)round_up(kb, W);
    const int kb32 = (int)round_up(kb, kKeys);
    if (kb32 > kbp)
      for (int r = 0; r < nq; ++r) std::memset(P + r * kLDS + kbp, 0, (size_t)(kb32 - kbp) * 2);
    for (int r = nq; r < nq16; ++r) std::memset(P + r * kLDS, 0, (size_t)kb32 * 2);

    // O *= alpha, unless O is still zero (first block) or no row's max moved (every alpha 1).
    const bool fresh = first_block();
    first_block() = false;
    bool rescale = false;
    for (int r = 0; r < nq && !fresh; ++r) rescale |= alpha[r] != 1.f;
    if (rescale)
      for (int r = 0; r < nq; ++r) {
        const __m512 a = _mm512_set1_ps(alpha[r]);
        for (int c = 0; c < Dvp; c += W)
          _mm512_storeu_ps(O + r * Dvp + c, _mm512_mul_ps(_mm512_loadu_ps(O + r * Dvp + c), a));
      }

    const int nrt = nq16 / 16, nct = Dvp / W, nkc = kb32 / kKeys;
    for (int rt = 0; rt < nrt; rt += 2) {
      const bool r2 = rt + 2 <= nrt;
      const uint16_t* Pr = P + rt * 16 * kLDS;
      float* Or = O + rt * 16 * Dvp;
      for (int ct = 0; ct < nct; ct += 2) {
        const bool c2 = ct + 2 <= nct;
        const uint16_t* vc = vp + 2 * ct * W;
        if (r2 && c2)
          pv_tile<2, 2>(Pr, vc, Dvp, nkc, Or + ct * W, fresh);
        else if (r2)
          pv_tile<2, 1>(Pr, vc, Dvp, nkc, Or + ct * W, fresh);
        else if (c2)
          pv_tile<1, 2>(Pr, vc, Dvp, nkc, Or + ct * W, fresh);
        else
          pv_tile<1, 1>(Pr, vc, Dvp, nkc, Or + ct * W, fresh);
      }
    }
  }

  // After the item's last block (AttnKernel::run): the tiles are released.
  static void end_item() { Tile::release(); }
};

}  // namespace
}  // namespace cpu
}  // namespace mmk
