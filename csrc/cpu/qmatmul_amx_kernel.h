// AMX kernels of the quantized matmul, written once over tile traits: TileAmx (tile_amx.h, the
// real tmm registers; qmatmul_amx.cpp, table "amx") and TileEmu (tile_emu.h, plain C++;
// qmatmul_amx_emu.cpp, table "amx_emulated", for tests on CPUs without AMX). Only the emulated
// instantiation has been run (the machine this was written on has no AMX).
//
// Both tables are the AVX-512 bf16 table (rowdot, a8_quantize, the fp32 gemm) with two items on
// tiles; rows that do not fill a 16-row tile go to the AVX-512 items. Every tile is 16 rows x 64
// bytes; C 0-3 = 2 row tiles x 2 column tiles (32 rows x 32 channels), A 4-5, B 6-7.
//  * a8 (W8A8, tdpbusd / tdpbsud): the a8 prepacked weight w[strip][t][lane][0..3] is the B-tile
//    layout: quads t0 .. t0+15 of channels 16c .. 16c+15 are 16 rows of 64 bytes at
//    w + ((strip T + t0) 64 + 16c) 4, stride 256. A tiles are rows of aq (stride 4T). Symmetric:
//    aq = x_q + 128 (unsigned) . w (signed), tdpbusd, minus 128 colsum as on AVX-512. Asymmetric:
//    x_q (signed) . w (unsigned), tdpbsud, minus zp rowsum as on AVX-512. The int32 sums are
//    exact, so they equal the vpdpbusd ones, and the epilogue is the AVX-512 one (a8_store16):
//    bit-identical output. K tail (T not a multiple of 16): the last A and B tiles are staged with
//    zero bytes past T, so no tile reads past aq or the pack.
//  * gemm, bf16 x (tdpbf16ps): the bf16 panel of the AVX-512 gemm (pairs (u - z) as bf16, 64
//    channels x 4 bytes per pair) is the B-tile layout too (16 pairs x 16 channels, stride 256);
//    A tiles are 32 bf16 features of 16 rows of x. Per group the C tiles start at zero and sum
//    the group's pairs in order (fp32; a group larger than a panel block carries C through a
//    buffer), then the group sum is scaled into the fp32 accumulator with AVX-512 (per channel:
//    one sum over K, scaled in the output epilogue). A group end that is not a multiple of 32
//    features: the last A tile is staged with zeros past it (so the next group's pairs in the B
//    tile, finite integers, add exact zeros); the panel has 16 zeroed pairs past its end.
//    fp32 x, and fp16 x (staged as fp32 by the driver: a_dtype kF32), keep the AVX-512 FMA gemm
//    (bf16 tiles would round x).
//
// Include ONLY after the file's MMK_TARGET_* pragma and the tile traits: internal linkage.
#pragma once

#include "cpu/qmatmul_avx512_kernel.h"

namespace mmk {
namespace cpu {
namespace qmm {
namespace {

constexpr int64_t kBStride = kStripK * 4;  // bytes per B-tile row in both prepacked layouts

// A tile's image: 16 rows of 64 bytes.
struct alignas(64) TileImage {
  uint8_t b[16][64];
};

// Rows r of t = `len` bytes at src + r * stride, then zeros.
inline void stage_tile(TileImage& t, const uint8_t* src, int64_t stride, int64_t len) {
  for (int r = 0; r < 16; ++r) {
    std::memcpy(t.b[r], src + r * stride, len);
    std::memset(t.b[r] + len, 0, 64 - len);
  }
}

template <class Tile>
struct AmxKernels {
  static const QmmImpl& avx512() { return *qmm_impl_avx512(true); }

  template <int c, int a, int b, bool SYM>
  static void dp8() {
    if (SYM)
      Tile::template dp_u8s8<c, a, b>();
    else
      Tile::template dp_s8u8<c, a, b>();
  }

  // ---- a8 ------------------------------------------------------------------------------------

  // C (int32, 64 per row) columns 32h .. 32h + 31 of RT row tiles = a . b over T quads: the
  // T16 = T / 16 * 16 full quads from aq rows a (stride lda) and B rows b (stride 256), then the
  // staged tails atail / btail.
  template <int RT, bool SYM>
  static void a8_half(const uint8_t* a, int64_t lda, const uint8_t* b, int64_t T16,
                      const TileImage* atail, const uint8_t* btail, int32_t* C) {
    Tile::template zero<0>();
    Tile::template zero<1>();
    if (RT == 2) {
      Tile::template zero<2>();
      Tile::template zero<3>();
    }
    auto step = [&](const uint8_t* a0, const uint8_t* a1, int64_t as, const uint8_t* bt) {
      Tile::template load<6>(bt, kBStride);
      Tile::template load<7>(bt + 64, kBStride);
      Tile::template load<4>(a0, as);
      dp8<0, 4, 6, SYM>();
      dp8<1, 4, 7, SYM>();
      if (RT == 2) {
        Tile::template load<5>(a1, as);
        dp8<2, 5, 6, SYM>();
        dp8<3, 5, 7, SYM>();
      }
    };
    for (int64_t t0 = 0; t0 < T16; t0 += 16)
      step(a + 4 * t0, a + 16 * lda + 4 * t0, lda, b + t0 * kBStride);
    if (btail) step(atail[0].b[0], atail[1].b[0], 64, btail);
    Tile::template store<0>(C, kBStride);
    Tile::template store<1>(C + 16, kBStride);
    if (RT == 2) {
      Tile::template store<2>(C + 16 * kStripK, kBStride);
      Tile::template store<3>(C + 16 * kStripK + 16, kBStride);
    }
  }

  // Rows [m0, m1) (a multiple of 16) x one strip.
  template <bool SYM>
  static void a8_tiles(const A8Job& j, int64_t m0, int64_t m1, int64_t strip) {
    const int64_t T = j.p.T, T16 = T / 16 * 16, tail = T - T16, lda = 4 * T;
    const uint8_t* w = j.p.w + strip * T * kBStride;
    // The K tail's B tile, staged with zero quads past T (no tile load reads past the pack).
    alignas(64) uint8_t btail_buf[16 * kBStride];
    const uint8_t* btail = nullptr;
    if (tail) {
      std::memcpy(btail_buf, w + T16 * kBStride, tail * kBStride);
      std::memset(btail_buf + tail * kBStride, 0, (16 - tail) * kBStride);
      btail = btail_buf;
    }
    const int64_t n0 = strip * kStripK;
    __m512 sw[4];
    __m512i corr[4];
    for (int c = 0; c < 4; ++c) {
      sw[c] = _mm512_loadu_ps(j.p.sw + n0 + 16 * c);
      corr[c] = SYM ? _mm512_slli_epi32(_mm512_loadu_si512(j.p.colsum + n0 + 16 * c), 7)
                    : _mm512_loadu_si512(j.p.zp + n0 + 16 * c);
    }
    alignas(64) int32_t C[32 * kStripK];
    TileImage atail[2];
    Tile::configure();
    for (int64_t m = m0; m < m1; m += 32) {
      const int rt = m1 - m >= 32 ? 2 : 1;
      const uint8_t* a = j.aq + m * lda;
      if (tail)
        for (int i = 0; i < rt; ++i)
          stage_tile(atail[i], a + 16 * i * lda + 4 * T16, lda, 4 * tail);
      for (int h = 0; h < 2; ++h) {
        const uint8_t* bh = w + 128 * h;
        const uint8_t* th = btail ? btail + 128 * h : nullptr;
        if (rt == 2)
          a8_half<2, SYM>(a, lda, bh, T16, atail, th, C + 32 * h);
        else
          a8_half<1, SYM>(a, lda, bh, T16, atail, th, C + 32 * h);
      }
      for (int r = 0; r < 16 * rt; ++r) {
        const __m512i rs = _mm512_set1_epi32(j.rowsum[m + r]);
        const __m512 sx = _mm512_set1_ps(j.sx[m + r]);
        for (int c = 0; c < 4; ++c)
          a8_store16<SYM>(j, m + r, n0 + 16 * c, _mm512_load_si512(C + r * kStripK + 16 * c),
                          corr[c], rs, sx, sw[c]);
      }
    }
    Tile::release();
  }

  static void a8_item(const A8Job& j, int64_t m0, int64_t m1, int64_t strip) {
    const int64_t mt = m0 + (m1 - m0) / 16 * 16;
    if (mt > m0) {
      if (j.symmetric)
        a8_tiles<true>(j, m0, mt, strip);
      else
        a8_tiles<false>(j, m0, mt, strip);
    }
    if (mt < m1) avx512().a8_item(j, mt, m1, strip);
  }

  // ---- gemm, bf16 x ----------------------------------------------------------------------------

  // Scratch of the tile path: the panel (KC_BF16 / 2 pairs + 16 zeroed ones), the fp32
  // accumulator and the group partial sums (rows x 64 each), 2 staged A tiles.
  static int64_t gemm_scratch_bytes(const GemmJob& j, int64_t rows) {
    const int64_t tiles = (KC_BF16 / 2 + 16) * kBStride + 2 * rows * kStripK * 4 +
                          2 * (int64_t)sizeof(TileImage) + 64;
    return std::max(avx512().gemm_scratch_bytes(j, rows), tiles);
  }

  // Features [ga, gb) of one group of RT row tiles (rows m, x = bf16 rows at a, stride lda
  // elements) x channels 32h .. 32h + 31 of the panel (pair 0 = feature k0), accumulated onto
  // part (fp32, 64 per row) unless `first`. The features of a last partial chunk are in atail.
  template <int RT>
  static void gemm_half(const uint16_t* a, int64_t lda, const uint8_t* panel, int64_t k0,
                        int64_t ga, int64_t gb, bool first, const TileImage* atail, float* part) {
    if (first) {
      Tile::template zero<0>();
      Tile::template zero<1>();
      if (RT == 2) {
        Tile::template zero<2>();
        Tile::template zero<3>();
      }
    } else {
      Tile::template load<0>(part, kBStride);
      Tile::template load<1>(part + 16, kBStride);
      if (RT == 2) {
        Tile::template load<2>(part + 16 * kStripK, kBStride);
        Tile::template load<3>(part + 16 * kStripK + 16, kBStride);
      }
    }
    auto step = [&](const void* a0, const void* a1, int64_t as, int64_t k) {
      const uint8_t* bt = panel + (k - k0) / 2 * kBStride;
      Tile::template load<6>(bt, kBStride);
      Tile::template load<7>(bt + 64, kBStride);
      Tile::template load<4>(a0, as);
      Tile::template dp_bf16<0, 4, 6>();
      Tile::template dp_bf16<1, 4, 7>();
      if (RT == 2) {
        Tile::template load<5>(a1, as);
        Tile::template dp_bf16<2, 5, 6>();
        Tile::template dp_bf16<3, 5, 7>();
      }
    };
    int64_t k = ga;
    for (; k + 32 <= gb; k += 32) step(a + k, a + 16 * lda + k, 2 * lda, k);
    if (k < gb) step(atail[0].b[0], atail[1].b[0], 64, k);
    Tile::template store<0>(part, kBStride);
    Tile::template store<1>(part + 16, kBStride);
    if (RT == 2) {
      Tile::template store<2>(part + 16 * kStripK, kBStride);
      Tile::template store<3>(part + 16 * kStripK + 16, kBStride);
    }
  }

  // Rows [m0, m1) (a multiple of 16) x one strip, bf16 x.
  static void gemm_tiles(const GemmJob& j, int64_t m0, int64_t m1, int64_t strip, void* scratch) {
    const int64_t rows = m1 - m0, K = j.K;
    uint8_t* panel = (uint8_t*)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float* acc = (float*)(panel + (KC_BF16 / 2 + 16) * kBStride);
    float* gpart = acc + rows * kStripK;
    TileImage* atail = (TileImage*)(gpart + rows * kStripK);
    const bool per_channel = j.G == 1;
    const int64_t gs = per_channel ? K : j.gs;
    float* part = per_channel ? acc : gpart;  // where the C tiles go between blocks
    const uint16_t* x = (const uint16_t*)j.a;
    Tile::configure();
    for (int64_t k0 = 0; k0 < K;) {
      // A block of whole groups, or a part of one group larger than KC_BF16.
      int64_t k1 = std::min(K, k0 + KC_BF16);
      if (!per_channel)
        k1 = gs <= KC_BF16 ? std::min(K, k0 + KC_BF16 / gs * gs) : std::min(k1, (k0 / gs + 1) * gs);
      const int64_t np = (k1 - k0) / 2;  // K and gs are even on this path
      decode_panel<true>(j, strip, k0 / 2, k0 / 2 + np, panel);
      std::memset(panel + np * kBStride, 0, 16 * kBStride);
      for (int64_t ga = k0; ga < k1;) {
        const int64_t g = ga / gs, gb = std::min(k1, (g + 1) * gs);
        const int64_t kt = ga + (gb - ga) / 32 * 32;  // start of a partial last chunk
        for (int64_t m = m0; m < m1; m += 32) {
          const int rt = m1 - m >= 32 ? 2 : 1;
          const uint16_t* a = x + m * j.lda;
          if (kt < gb)
            for (int i = 0; i < rt; ++i)
              stage_tile(atail[i], (const uint8_t*)(a + 16 * i * j.lda + kt), 2 * j.lda,
                         2 * (gb - kt));
          for (int h = 0; h < 2; ++h) {
            float* ph = part + (m - m0) * kStripK + 32 * h;
            if (rt == 2)
              gemm_half<2>(a, j.lda, panel + 128 * h, k0, ga, gb, ga == g * gs, atail, ph);
            else
              gemm_half<1>(a, j.lda, panel + 128 * h, k0, ga, gb, ga == g * gs, atail, ph);
          }
        }
        if (!per_channel && gb == (g + 1) * gs) {  // group done: acc (+)= sum * s, as AVX-512
          const float* s = j.p.sT + g * j.p.Npad + strip * kStripK;
          for (int64_t i = 0; i < rows * kStripK; i += 16) {
            const __m512 prev = g == 0 ? _mm512_setzero_ps() : _mm512_load_ps(acc + i);
            _mm512_store_ps(acc + i, _mm512_fmadd_ps(_mm512_load_ps(gpart + i),
                                                     _mm512_loadu_ps(s + i % kStripK), prev));
          }
        }
        ga = gb;
      }
      k0 = k1;
    }
    Tile::release();
    gemm_store(j, m0, m1, strip, acc, per_channel);
  }

  static void gemm_item(const GemmJob& j, int64_t m0, int64_t m1, int64_t strip, void* scratch) {
    const int64_t mt = m0 + (m1 - m0) / 16 * 16;
    if (j.a_dtype != kBF16 || mt == m0) {
      avx512().gemm_item(j, m0, m1, strip, scratch);
      return;
    }
    gemm_tiles(j, m0, mt, strip, scratch);
    if (mt < m1) avx512().gemm_item(j, mt, m1, strip, scratch);
  }

  static const QmmImpl* table(const char* name) {
    static const QmmImpl t = [name] {
      QmmImpl r = avx512();
      r.name = name;
      r.gemm_item = gemm_item;
      r.gemm_scratch_bytes = gemm_scratch_bytes;
      r.a8_item = a8_item;
      r.item_rows = 32;
      return r;
    }();
    return &t;
  }
};

}  // namespace
}  // namespace qmm
}  // namespace cpu
}  // namespace mmk
