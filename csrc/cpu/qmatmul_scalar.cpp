// Portable quantized-matmul path (baseline flags; any CPU, or MMKERNELS_CPU_ISA=scalar): w_hat =
// float(q - z) * s per element, 8 interleaved fp32 partial sums per dot product; W8A8 in exact
// int32 on the canonical layout (no prepacked weight, no gemm kernel). See qmatmul.h.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/qmatmul.h"
#include "cpu/qmatmul_kernel.h"

namespace mmk {
namespace cpu {
namespace qmm {
namespace {

// Stored integer of weight (n, k) and its zero point, as in format.py.
inline int weight_int(const QWeight& w, int64_t n, int64_t k) {
  if (w.bits == 8) {
    const uint8_t raw = w.q[n * w.K + k];
    return w.zeros ? (int)raw : (int)(int8_t)raw;
  }
  const uint8_t byte = w.q[n * (w.K / 2) + k / 2];
  const int u = (k & 1) ? byte >> 4 : byte & 15;
  return w.zeros ? u : (u >= 8 ? u - 16 : u);
}

inline int zero_point(const QWeight& w, int64_t n, int64_t g) {
  return w.zeros ? (int)w.zeros[n * w.G + g] : 0;
}

// Row n of w_hat (K floats), group by group.
void dequant_row(const QWeight& w, int64_t n, float* out) {
  for (int64_t g = 0; g < w.G; ++g) {
    const int z = zero_point(w, n, g);
    const float s = w.scales[n * w.G + g];
    const int64_t k0 = g * w.gs, k1 = k0 + w.gs;
    if (w.bits == 8) {
      const uint8_t* q = w.q + n * w.K;
      for (int64_t k = k0; k < k1; ++k)
        out[k] = (float)((w.zeros ? (int)q[k] : (int)(int8_t)q[k]) - z) * s;
    } else {
      const uint8_t* q = w.q + n * (w.K / 2);
      const int flip = w.zeros ? 0 : 8, zz = w.zeros ? z : 8;  // signed nibble v = (u ^ 8) - 8
      for (int64_t k = k0; k < k1; k += 2) {
        const int byte = q[k / 2];
        out[k] = (float)(((byte & 15) ^ flip) - zz) * s;
        out[k + 1] = (float)(((byte >> 4) ^ flip) - zz) * s;
      }
    }
  }
}

void rowdot_scalar(const RowdotJob& j, int64_t n0, int64_t n1) {
  const QWeight& w = j.w;
  const int64_t K = w.K;
  std::vector<float> wrow((size_t)K);
  for (int64_t n = n0; n < n1; ++n) {
    dequant_row(w, n, wrow.data());
    for (int64_t m = 0; m < j.M; ++m) {
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (w.bits == 4) {  // x split into even / odd features
        const float* xe = j.xe + m * j.ldx;
        const float* xo = j.xo + m * j.ldx;
        for (int64_t i = 0; i < K / 2; ++i) {
          part[(2 * i) & 7] += wrow[2 * i] * xe[i];
          part[(2 * i + 1) & 7] += wrow[2 * i + 1] * xo[i];
        }
      } else {
        const float* x = j.xe + m * j.ldx;
        for (int64_t k = 0; k < K; ++k) part[k & 7] += wrow[k] * x[k];
      }
      const float v =
          ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
      store_scalar(j.out, m, n, v);
    }
  }
}

float load_act(const A8Job& j, int64_t m, int64_t k) {
  const float v = x_elem_f32(j.x, j.x_dtype, m * j.ldx + k);
  return j.smooth ? v / j.smooth[k] : v;
}

void a8_quantize_scalar(const A8Job& j, int64_t m0, int64_t m1) {
  const int64_t K4 = j.p.T * 4;
  for (int64_t m = m0; m < m1; ++m) {
    uint32_t amax = 0;  // bits of max |v| (see a8_scale)
    for (int64_t k = 0; k < j.K; ++k) {
      const float v = load_act(j, m, k);
      uint32_t u;
      std::memcpy(&u, &v, 4);
      amax = std::max(amax, u & 0x7fffffffu);
    }
    const float s = a8_scale(amax);
    int8_t* dst = (int8_t*)j.aq + m * K4;
    int32_t sum = 0;
    for (int64_t k = 0; k < j.K; ++k) {
      float q = std::nearbyint(load_act(j, m, k) / s);  // default rounding: half to even
      q = std::min(127.f, std::max(-127.f, q));
      dst[k] = (int8_t)q;
      sum += (int32_t)q;
    }
    for (int64_t k = j.K; k < K4; ++k) dst[k] = 0;
    j.sx[m] = s;
    j.rowsum[m] = sum;
  }
}

void a8_item_scalar(const A8Job& j, int64_t m0, int64_t m1, int64_t strip) {
  const int64_t n0 = strip * kStrip, n1 = std::min(j.N, n0 + kStrip), K4 = j.p.T * 4;
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* a = (const int8_t*)j.aq + m * K4;
    for (int64_t n = n0; n < n1; ++n) {
      const int z = zero_point(j.w, n, 0);
      int32_t acc = 0;
      for (int64_t k = 0; k < j.K; ++k) acc += (int32_t)a[k] * (weight_int(j.w, n, k) - z);
      const float y = ((float)acc * j.sx[m]) * j.w.scales[n];
      store_scalar(j.out, m, n, y);
    }
  }
}

void widen_row_scalar(const void* x, int dtype, int64_t n, float* dst) {
  for (int64_t k = 0; k < n; ++k) dst[k] = x_elem_f32(x, dtype, k);
}

const QmmImpl kImpl = {"scalar", rowdot_scalar,      false,          nullptr, nullptr,
                       false,    a8_quantize_scalar, a8_item_scalar, false,   1,
                       6,        widen_row_scalar};

}  // namespace

const QmmImpl* qmm_impl_scalar() { return &kImpl; }

}  // namespace qmm
}  // namespace cpu
}  // namespace mmk
