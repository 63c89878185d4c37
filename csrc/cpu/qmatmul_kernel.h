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

// out[m, n] = act(v (+ bias[n])) in the output dtype.
inline void store_scalar(const Out& o, int64_t m, int64_t n, float v) {
  if (o.bias) v += o.bias[n];
  if (o.dtype == kF32 && o.act == kActNone) {
    ((float*)o.y)[m * o.ldo + n] = v;
  } else {
    // One out-of-line call for the 16-bit dtypes and the activations: a second call site here
    // changed the register allocation of the row-dot blocks that inline this and slowed the int8
    // GEMV by ~7%.
    store_general(o, m, n, v);
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
    case 5:  f(m, std::integral_constant<int, 5>()); break;
    case 4:  f(m, std::integral_constant<int, 4>()); break;
    case 3:  f(m, std::integral_constant<int, 3>()); break;
    case 2:  f(m, std::integral_constant<int, 2>()); break;
    case 1:  f(m, std::integral_constant<int, 1>()); break;
    default: break;
  }
}

}  // namespace
}  // namespace qmm
}  // namespace cpu
}  // namespace mmk
