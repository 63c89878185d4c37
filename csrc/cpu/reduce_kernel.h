// Token-reduction kernels written once over a vector-traits class `V` (vec_avx512.h, vec_avx2.h)
// and instantiated in reduce_avx512.cpp / reduce_avx2.cpp (contracts in reduce.h).
//
// Include this ONLY from an ISA translation unit, after its MMK_TARGET_* pragma and its traits
// header: everything here has internal linkage (see cpu_features.h).
//
// normalize_row: one token row divided by its norm (reduce.h's sum order; the division in vectors).
// sim_argmax: R A rows x 2 vectors of B tokens of accumulators; every dot product is summed channel
//   by channel with FMA (the order of a GEMM micro-kernel), so every path gives the same sums. Per
//   A row and lane a running (max, token index): B tokens reach a lane in increasing order and
//   only a strictly greater value replaces the current one, so the lowest index among the lanes
//   holding the final max is the first argmax.
// merge_slots: the products w * x and their sums rounded in fp32 one by one, in source order, then
//   one division (as the reference).
#pragma once

#include <cstdint>

#include "cpu/reduce.h"

namespace mmk {
namespace cpu {
namespace reduce {
namespace {

template <class V, int R>  // R: A rows per register block
struct ReduceKernel {
  static constexpr int W = V::W;
  static constexpr int VT = kTile / W;  // vectors per packed B tile
  using T = typename V::T;
  using I = typename V::I;
  using Mask = typename V::Mask;
  static_assert(kRowBlock % R == 0, "A rows come in blocks of kRowBlock");
  static_assert(kTile % W == 0, "a packed B tile is whole vectors");

  // ---- row normalisation (reduce.h) -------------------------------------------------------------

  static void normalize_row(const float* v, int64_t c, float* dst, int64_t stride) {
    // float * float is exact in double, so FMA contraction cannot change these sums
    double ss[16] = {};
    int64_t k = 0;
    for (; k + 16 <= c; k += 16)
      for (int q = 0; q < 16; ++q) ss[q] += (double)v[k + q] * (double)v[k + q];
    for (int q = 0; k + q < c; ++q) ss[q] += (double)v[k + q] * (double)v[k + q];
    for (int h = 8; h >= 1; h /= 2)
      for (int q = 0; q < h; ++q) ss[q] += ss[q + h];
    const float nrm = (float)__builtin_sqrt(ss[0]);
    const float norm = nrm < 1e-12f ? 1e-12f : nrm;  // std::max: a NaN norm stays NaN
    const T vn = V::set1(norm);
    if (stride == 1) {
      int64_t q = 0;
      for (; q + W <= c; q += W) V::store(dst + q, V::div(V::load(v + q), vn));
      if (q < c) V::storen(dst + q, V::div(V::loadn(v + q, (int)(c - q)), vn), (int)(c - q));
      return;
    }
    alignas(64) float u[W];
    int64_t q0 = 0;
    for (; q0 + W <= c; q0 += W) {
      V::store(u, V::div(V::load(v + q0), vn));
      float* d = dst + q0 * stride;
#pragma GCC unroll 16
      for (int q = 0; q < W; ++q) d[q * stride] = u[q];
    }
    if (q0 < c) {
      const int n = (int)(c - q0);
      V::store(u, V::div(V::loadn(v + q0, n), vn));
      for (int q = 0; q < n; ++q) dst[(q0 + q) * stride] = u[q];
    }
  }

  // ---- B tiles (reduce.h) ---------------------------------------------------------------------

  // 16 token rows at a time through a register transpose (V::pack_panel32): only where a vector
  // is a tile's width (the other paths leave ReduceImpl::pack_b_tiles null: the glue's copy).
  static void pack_b_tiles(const float* rows, int64_t c, int64_t nb, int64_t t0, int64_t t1,
                           float* bp) {
    static_assert(V::kPanel32 && W == kTile, "pack_b_tiles needs tile-wide vectors");
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * kTile;
      const int n = (int)(nb - j0 < kTile ? nb - j0 : kTile);
      V::pack_panel32(rows + j0 * c, c * 4, n, (int)c, bp + t * c * kTile);
    }
  }

  // ---- cosine max / first argmax ---------------------------------------------------------------

  // NV vectors of B tokens from token j0 (a multiple of W) against R rows of A.
  template <int NV>
  static inline void sim_pass(const float* ar, int64_t c, const float* bp, int64_t nb, int64_t j0,
                              T (&vmax)[R][VT], I (&vidx)[R][VT]) {
    const float* b[NV];
    for (int v = 0; v < NV; ++v) {
      const int64_t j = j0 + v * W;
      b[v] = bp + (j / kTile) * c * kTile + j % kTile;
    }
    T acc[R][NV];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
    for (int64_t k = 0; k < c; ++k) {
      T vb[NV];
      for (int v = 0; v < NV; ++v) vb[v] = V::load(b[v] + k * kTile);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const T va = V::set1(ar[r * c + k]);
        for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(va, vb[v], acc[r][v]);
      }
    }
    for (int v = 0; v < NV; ++v) {
      const int64_t j = j0 + v * W;
      const Mask valid = V::first_lanes(nb - j);
      const I idx = V::add_i(V::set1_i((int32_t)j), V::iota_i());
      const int t = (int)((j / W) % VT);  // lane group of the running max this vector updates
      for (int r = 0; r < R; ++r) {
        const Mask gt = V::mask_and(V::gt(acc[r][v], vmax[r][t]), valid);
        vmax[r][t] = V::select(gt, acc[r][v], vmax[r][t]);
        vidx[r][t] = V::select_i(gt, idx, vidx[r][t]);
      }
    }
  }

  static void sim_argmax(const float* a, int64_t c, int64_t a0, int64_t a1, const float* bp,
                         int64_t nb, float* best, int32_t* arg) {
    const int64_t ntok = (nb + kTile - 1) / kTile * kTile;  // packed tokens (zero padded)
    for (int64_t i0 = a0; i0 < a1; i0 += R) {
      const float* ar = a + i0 * c;
      T vmax[R][VT];
      I vidx[R][VT];
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < VT; ++t) {
          vmax[r][t] = V::set1(-__builtin_inff());
          vidx[r][t] = V::set1_i(0);
        }
      int64_t j0 = 0;
      for (; j0 + 2 * W <= ntok; j0 += 2 * W) sim_pass<2>(ar, c, bp, nb, j0, vmax, vidx);
      for (; j0 < ntok; j0 += W) sim_pass<1>(ar, c, bp, nb, j0, vmax, vidx);
      for (int r = 0; r < R; ++r) {
        float m = V::hmax(vmax[r][0]);
        for (int t = 1; t < VT; ++t) m = fmax_(m, V::hmax(vmax[r][t]));
        const T mv = V::set1(m);
        int32_t j = INT32_MAX;  // the lowest index among the lanes holding the max
        for (int t = 0; t < VT; ++t) {
          const int32_t jt = V::hmin_i(V::eq(vmax[r][t], mv), vidx[r][t]);
          j = jt < j ? jt : j;
        }
        best[i0 + r] = m;
        arg[i0 + r] = j == INT32_MAX ? 0 : j;
      }
    }
  }

  static inline float fmax_(float a, float b) { return a > b ? a : b; }

  // ---- merge
  // -------------------------------------------------------------------------------------

  template <int DT>
  static inline T load(const void* base, int64_t off, int n) {
    if (DT == kF32) {
      const float* p = static_cast<const float*>(base) + off;
      return n >= W ? V::load(p) : V::loadn(p, n);
    }
    const uint16_t* p = static_cast<const uint16_t*>(base) + off;
    return DT == kF16 ? V::load_f16(p, n) : V::load_bf16(p, n);
  }

  template <int DT>
  static inline void store(void* base, int64_t off, T v, int n) {
    if (DT == kF32) {
      float* p = static_cast<float*>(base) + off;
      if (n >= W)
        V::store(p, v);
      else
        V::storen(p, v, n);
      return;
    }
    uint16_t* p = static_cast<uint16_t*>(base) + off;
    if (DT == kF16)
      V::store_f16(p, v, n);
    else
      V::store_bf16_torch(p, v, n);
  }

  // w * x rounded to fp32 on its own (never fused with the following add).
  static inline T mul_rounded(T a, T b) {
    T p = V::mul(a, b);
    V::opaque(p);
    return p;
  }

  // One slot's channels [c0, c0 + U * W) (n_last < W: the last vector holds n_last channels):
  // out = (sum over its nsrc sources, in order, of w[i] * x[i]) / den.
  template <int DT, int U>
  static inline void merge_block(const void* x, int64_t sxn, const int32_t* src, int nsrc,
                                 const float* w, T den, void* out, int64_t c0, int n_last) {
    T acc[U];
    for (int u = 0; u < U; ++u) acc[u] = V::zero();
    for (int q = 0; q < nsrc; ++q) {
      const int64_t i = src[q];
      const T wi = V::set1(w[i]);
      for (int u = 0; u < U; ++u)
        acc[u] = V::add(
            acc[u], mul_rounded(load<DT>(x, i * sxn + c0 + u * W, u == U - 1 ? n_last : W), wi));
    }
    for (int u = 0; u < U; ++u)
      store<DT>(out, c0 + u * W, V::div(acc[u], den), u == U - 1 ? n_last : W);
  }

  template <int DT>
  static void merge_slots_t(const MergeRow& p, int64_t s0, int64_t s1) {
    constexpr int U = 4;  // vectors of channels per pass
    const int64_t c = p.C, sxn = p.sxn;
    const int64_t esz = DT == kF32 ? 4 : 2;
    const void* x = p.x;
    const float* w = p.w;
    for (int64_t s = s0; s < s1; ++s) {
      const int32_t* src = p.list + p.off[s];
      const int nsrc = p.off[s + 1] - p.off[s];
      const T den = V::set1(p.wsum[s]);
      void* out = static_cast<char*>(p.out) + s * c * esz;
      int64_t c0 = 0;
      for (; c0 + U * W <= c; c0 += U * W)
        merge_block<DT, U>(x, sxn, src, nsrc, w, den, out, c0, W);
      for (; c0 < c; c0 += W)
        merge_block<DT, 1>(x, sxn, src, nsrc, w, den, out, c0, (int)(c - c0 < W ? c - c0 : W));
    }
  }

  static void merge_slots(const MergeRow& p, int64_t s0, int64_t s1) {
    switch (p.dtype) {
      case kF32:  merge_slots_t<kF32>(p, s0, s1); break;
      case kBF16: merge_slots_t<kBF16>(p, s0, s1); break;
      default:    merge_slots_t<kF16>(p, s0, s1); break;
    }
  }
};

}  // namespace
}  // namespace reduce
}  // namespace cpu
}  // namespace mmk
