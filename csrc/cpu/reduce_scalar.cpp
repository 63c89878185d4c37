// Portable token-reduction kernels (baseline flags; any CPU, or MMKERNELS_CPU_ISA=scalar): the
// same arithmetic as the SIMD paths (FMA-free sums in the order of reduce.h's contract). bf16 /
// fp16 values convert through c10's header-only types (round to nearest even, as torch).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/reduce.h"

namespace mmk {
namespace cpu {
namespace reduce {
namespace {

void normalize_row_scalar(const float* v, int64_t c, float* dst, int64_t stride) {
  double ss[16] = {};  // the chains and tree of reduce.h (float * float is exact in double)
  int64_t k = 0;
  for (; k + 16 <= c; k += 16)
    for (int q = 0; q < 16; ++q) ss[q] += (double)v[k + q] * (double)v[k + q];
  for (int q = 0; k + q < c; ++q) ss[q] += (double)v[k + q] * (double)v[k + q];
  for (int h = 8; h >= 1; h /= 2)
    for (int q = 0; q < h; ++q) ss[q] += ss[q + h];
  const float norm = std::max((float)std::sqrt(ss[0]), 1e-12f);
  for (int64_t q = 0; q < c; ++q) dst[q * stride] = v[q] / norm;
}

void sim_argmax_scalar(const float* a, int64_t c, int64_t a0, int64_t a1, const float* bp,
                       int64_t nb, float* best, int32_t* arg) {
  float acc[kTile];
  for (int64_t i = a0; i < a1; ++i) {
    const float* ar = a + i * c;
    float m = -INFINITY;
    int32_t mj = 0;
    for (int64_t t = 0; t * kTile < nb; ++t) {
      const float* b = bp + t * c * kTile;
      for (int l = 0; l < kTile; ++l) acc[l] = 0.f;
      for (int64_t k = 0; k < c; ++k)
        for (int l = 0; l < kTile; ++l) acc[l] += ar[k] * b[k * kTile + l];
      const int64_t nl = std::min<int64_t>(kTile, nb - t * kTile);
      for (int l = 0; l < nl; ++l)
        if (acc[l] > m) {
          m = acc[l];
          mj = (int32_t)(t * kTile + l);
        }
    }
    best[i] = m;
    arg[i] = mj;
  }
}

template <typename T>
void merge_slots_scalar_t(const MergeRow& p, int64_t s0, int64_t s1) {
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  std::vector<float> acc(p.C);
  for (int64_t s = s0; s < s1; ++s) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int32_t q = p.off[s]; q < p.off[s + 1]; ++q) {
      const int64_t i = p.list[q];
      const float w = p.w[i];
      const T* xi = x + i * p.sxn;
      for (int64_t ch = 0; ch < p.C; ++ch) {
        const float prod = static_cast<float>(xi[ch]) * w;
        acc[ch] = acc[ch] + prod;
      }
    }
    const float den = p.wsum[s];
    for (int64_t ch = 0; ch < p.C; ++ch) out[s * p.C + ch] = static_cast<T>(acc[ch] / den);
  }
}

void merge_slots_scalar(const MergeRow& p, int64_t s0, int64_t s1) {
  switch (p.dtype) {
    case kF32:  merge_slots_scalar_t<float>(p, s0, s1); break;
    case kBF16: merge_slots_scalar_t<c10::BFloat16>(p, s0, s1); break;
    default:    merge_slots_scalar_t<c10::Half>(p, s0, s1); break;
  }
}

const ReduceImpl kImpl = {"scalar", &normalize_row_scalar, &sim_argmax_scalar, &merge_slots_scalar};

}  // namespace

const ReduceImpl* reduce_impl_scalar() { return &kImpl; }

}  // namespace reduce
}  // namespace cpu
}  // namespace mmk
