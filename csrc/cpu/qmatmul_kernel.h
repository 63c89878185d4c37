// The parts of the quantized-matmul kernels that every ISA file shares (the per-ISA parts differ in
// algorithm, not only in vector width: int4 decode by vpermps table lookups vs shifts and masks,
// vpdpbusd vs vpmaddwd for W8A8, bf16 dot products only on AVX-512). Contracts and layouts:
// qmatmul.h.
//
// Include this ONLY after the file's MMK_TARGET_* pragma (or in a baseline file): everything here
// has internal linkage (see cpu_features.h).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu/qmatmul.h"

namespace mmk {
namespace cpu {
namespace qmm {
namespace {

// out[m, n] = v (+ bias[n]) in the output dtype.
inline void store_scalar(const Out& o, int64_t m, int64_t n, float v) {
  if (o.bias) v += o.bias[n];
  if (o.dtype == kF32) {
    ((float*)o.y)[m * o.ldo + n] = v;
  } else {
    ((uint16_t*)o.y)[m * o.ldo + n] = f32_to_bf16(v);
  }
}

// Rows [m0, m1) in register tiles of MR rows, then one tile of the rest:
// f(m, std::integral_constant<int, R>) with R = MR, ..., R < MR once at the end.
template <int MR, typename F>
void for_row_tiles(int64_t m0, int64_t m1, F&& f) {
  static_assert(MR <= 6, "tails up to 5 rows");
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) f(m, std::integral_constant<int, MR>());
  switch (m1 - m) {
    case 5: f(m, std::integral_constant<int, 5>()); break;
    case 4: f(m, std::integral_constant<int, 4>()); break;
    case 3: f(m, std::integral_constant<int, 3>()); break;
    case 2: f(m, std::integral_constant<int, 2>()); break;
    case 1: f(m, std::integral_constant<int, 1>()); break;
    default: break;
  }
}

// The rowdot blocking, shared by the ISA paths: output channels [n0, n1) for every row of x, in
// blocks of MB <= 4 rows x NB channels (4 for a single row, else 2; then single channels).
// Blocks::block<NB, MB>(j, kind, n, m) computes one block; kind = Blocks::kind(j) (which
// row-dot kernel the weight format takes), computed once per row block.
template <class Blocks, int MB>
void rowdot_rows(const RowdotJob& j, int64_t n0, int64_t n1, int64_t m) {
  constexpr int NB = MB == 1 ? 4 : 2;
  const int kind = Blocks::kind(j);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) Blocks::template block<NB, MB>(j, kind, n, m);
  for (; n < n1; ++n) Blocks::template block<1, MB>(j, kind, n, m);
}

template <class Blocks>
void rowdot_blocks(const RowdotJob& j, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= j.M; m += 4) rowdot_rows<Blocks, 4>(j, n0, n1, m);
  switch (j.M - m) {
    case 3: rowdot_rows<Blocks, 3>(j, n0, n1, m); break;
    case 2: rowdot_rows<Blocks, 2>(j, n0, n1, m); break;
    case 1: rowdot_rows<Blocks, 1>(j, n0, n1, m); break;
    default: break;
  }
}

}  // namespace
}  // namespace qmm
}  // namespace cpu
}  // namespace mmk
