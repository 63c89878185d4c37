// Quantized matmul on the CPU, torch-free part: the ISA choice and the shared bf16 / fp16 helpers
// (baseline flags). The kernels are in qmatmul_{avx512,avx2,scalar}.cpp behind qmatmul.h; the
// torch glue (checks, prepacking, work split) in qmatmul_torch.cpp.
#include "cpu/qmatmul.h"

#include <cmath>
#include <cstring>

#include "cpu/cpu_features.h"
#include "cpu/fp16.h"

namespace mmk {
namespace cpu {
namespace qmm {

float bf16_to_f32(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u | 0x00400000u) >> 16);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

float half_to_f32(uint16_t h) { return f16_to_f32(h); }

uint16_t f32_to_16bit(float f, int dtype) {
  return dtype == kBF16 ? f32_to_bf16(f) : f32_to_f16(f);
}

namespace {

// x * sigmoid(a) with the exponential of a non-positive argument only (none below e^-700: no
// underflow in double).
double times_sigmoid(double x, double a) {
  const double e = std::fabs(a) > 700.0 ? 0.0 : std::exp(-std::fabs(a));
  return a >= 0.0 ? x / (1.0 + e) : x * e / (1.0 + e);
}

}  // namespace

float act_f32(float v, int act) {
  const double x = v;
  double r = x;
  switch (act) {
    case kActRelu: return v < 0.f ? 0.f : v;  // NaN and -0 kept
    case kActGelu: {
      // |x| / sqrt 2 > 9: gelu(x) is x or (-x below 1e-35) 0, as in the SIMD epilogue
      const double z = std::fabs(x) * 0.70710678118654752440;
      r = z > 9.0 ? x * (x >= 0.0 ? 1.0 : 0.0) : 0.5 * x * std::erfc(-x * 0.70710678118654752440);
      break;
    }
    case kActGeluTanh:  // 1 + tanh(u) = 2 sigmoid(2u)
      r = times_sigmoid(x, 1.5957691216057307 * (x + 0.044715 * x * x * x));
      break;
    case kActQuickGelu: r = times_sigmoid(x, 1.702 * x); break;
    case kActSilu:      r = times_sigmoid(x, x); break;
    default:            return v;
  }
  // a result below float's normal range is 0 (no underflow, as the SIMD epilogue)
  return (float)(std::fabs(r) < 1.1754943508222875e-38 ? std::copysign(0.0, r) : r);
}

void store_general(const Out& o, int64_t m, int64_t n, float v) {
  v = act_f32(v, o.act);
  if (o.dtype == kF32)
    ((float*)o.y)[m * o.ldo + n] = v;
  else
    ((uint16_t*)o.y)[m * o.ldo + n] = f32_to_16bit(v, o.dtype);
}

namespace {

// AVX-512 tables with the AVX2 W8A8 kernel, for AVX-512 CPUs without VNNI.
QmmImpl with_avx2_a8(const QmmImpl* base) {
  QmmImpl r = *base;
  const QmmImpl* a2 = qmm_impl_avx2();
  r.a8_quantize = a2->a8_quantize;
  r.a8_item = a2->a8_item;
  r.a8_shifted = a2->a8_shifted;
  r.a8_elem_bytes = a2->a8_elem_bytes;
  return r;
}

}  // namespace

const QmmImpl* qmm_impl(const char** error) {
  const Isa isa = selected_isa(error);
  if (*error != nullptr) return nullptr;
  const QmmImpl* impl = nullptr;
  switch (isa) {
    case Isa::AmxEmulated:
    case Isa::Amx:
      // Both need AVX-512 BF16 and VNNI (cpu_features.cpp), the AVX-512 table's requirements.
      impl = isa == Isa::Amx ? qmm_impl_amx() : qmm_impl_amx_emulated();
      if (impl == nullptr) impl = qmm_impl_avx512(true);
      break;
    case Isa::Avx512Bf16:
    case Isa::Avx512:     {
      const bool bf16 = isa == Isa::Avx512Bf16;
      impl = qmm_impl_avx512(bf16);
      if (impl && !cpu_features().avx512_vnni) {
        static const QmmImpl novnni_bf16 = with_avx2_a8(qmm_impl_avx512(true));
        static const QmmImpl novnni = with_avx2_a8(qmm_impl_avx512(false));
        impl = bf16 ? &novnni_bf16 : &novnni;
      }
      break;
    }
    case Isa::Avx2: impl = qmm_impl_avx2(); break;
    default:        break;
  }
  return impl ? impl : qmm_impl_scalar();
}

const char* qmatmul_cpu_isa(const char** error) {
  const QmmImpl* impl = qmm_impl(error);
  return impl ? impl->name : "";
}

}  // namespace qmm
}  // namespace cpu
}  // namespace mmk
