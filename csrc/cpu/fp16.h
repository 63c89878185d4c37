// IEEE binary16 <-> fp32 in plain C++ for the baseline translation units (the scalar attention
// path, the driver's NaN marking). The SIMD paths convert with F16C instead (V::load_f16 /
// store_f16 in vec_avx512.h, vec_avx2.h); these give the same results: widening is exact, and
// narrowing rounds to nearest even, overflows to inf and keeps NaN quiet (0x7e00 for the default
// NaN, the top mantissa bits otherwise), like vcvtps2ph. No headers: safe to include anywhere.
#pragma once

#include <stdint.h>

namespace mmk {
namespace cpu {
namespace {

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {  // inf, NaN (made quiet, payload kept)
    u = sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0u);
  } else if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in fp32
    const float f = (float)man * 5.9604644775390625e-8f;
    return sign ? -f : f;
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {  // round to nearest even
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // quiet NaN
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal (or 0, or the smallest normal) in 2^-24 steps
    float mag;
    __builtin_memcpy(&mag, &a, 4);
    return (uint16_t)(sign | (uint16_t)__builtin_rintf(mag * 16777216.f));  // 2^24: exact
  }
  const uint32_t b = a - (112u << 23);  // rebias the exponent (127 -> 15)
  return (uint16_t)(sign | ((b + 0xfffu + ((b >> 13) & 1u)) >> 13));
}

}  // namespace
}  // namespace cpu
}  // namespace mmk
