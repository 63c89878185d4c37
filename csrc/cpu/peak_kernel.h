// The FMA peak loop written once over vector traits (vec_avx512.h, vec_avx2.h, vec_scalar.h).
// Include ONLY from an ISA translation unit, after its MMK_TARGET_* pragma and traits header.
#pragma once

#include <cstdint>

namespace mmk {
namespace cpu {
namespace peak {
namespace {

template <class V>
struct FmaKernel {
  // Enough independent chains to cover the FMA latency (4-5 cycles) on two FMA pipes.
  static constexpr int kChains = 12;

  static double loop(int64_t iterations, float* sink) {
    typename V::T acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = V::set1(1.0f + 1e-3f * i);
    const typename V::T a = V::set1(0.999999f), b = V::set1(1e-7f);
    for (int64_t it = 0; it < iterations; ++it)
      for (int i = 0; i < kChains; ++i) acc[i] = V::fmadd(acc[i], a, b);
    typename V::T sum = acc[0];
    for (int i = 1; i < kChains; ++i) sum = V::add(sum, acc[i]);
    *sink = V::hsum(sum);
    return 2.0 * V::W * kChains * (double)iterations;
  }
};

}  // namespace
}  // namespace peak
}  // namespace cpu
}  // namespace mmk
