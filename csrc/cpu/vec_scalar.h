// Portable 8-lane fp32 "vector" traits (an array the compiler may map to SSE2) for the baseline
// translation units: the same interface as vec_avx512.h / vec_avx2.h.
#pragma once

#include <math.h>

#include <cstdint>

#include "cpu/fp16.h"

namespace mmk {
namespace cpu {
namespace {

struct VScalar {
  static constexpr int W = 8;
  struct T {
    float v[8];
  };
  static inline T zero() {
    T r;
    for (int i = 0; i < 8; ++i) r.v[i] = 0.f;
    return r;
  }
  static inline T set1(float x) {
    T r;
    for (int i = 0; i < 8; ++i) r.v[i] = x;
    return r;
  }
  static inline T load(const float* p) {
    T r;
    for (int i = 0; i < 8; ++i) r.v[i] = p[i];
    return r;
  }
  static inline void store(float* p, T a) {
    for (int i = 0; i < 8; ++i) p[i] = a.v[i];
  }
  static inline T loadn(const float* p, int n) {
    T r;
    for (int i = 0; i < 8; ++i) r.v[i] = i < n ? p[i] : 0.f;
    return r;
  }
  static inline void storen(float* p, T a, int n) {
    for (int i = 0; i < 8 && i < n; ++i) p[i] = a.v[i];
  }
  static inline T fmadd(T a, T b, T c) {
    for (int i = 0; i < 8; ++i) c.v[i] = a.v[i] * b.v[i] + c.v[i];
    return c;
  }
  static inline T mul(T a, T b) {
    for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static inline T add(T a, T b) {
    for (int i = 0; i < 8; ++i) a.v[i] += b.v[i];
    return a;
  }
  static inline T sub(T a, T b) {
    for (int i = 0; i < 8; ++i) a.v[i] -= b.v[i];
    return a;
  }
  static inline T max(T a, T b) {
    for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  static inline float hmax(T a) {
    float m = a.v[0];
    for (int i = 1; i < 8; ++i) m = a.v[i] > m ? a.v[i] : m;
    return m;
  }
  static inline float hsum(T a) {
    float s = 0.f;
    for (int i = 0; i < 8; ++i) s += a.v[i];
    return s;
  }
  static inline float first(T a) { return a.v[0]; }
  static inline T mask_ge(T x, int n) {
    for (int i = 0; i < 8; ++i)
      if (i >= n) x.v[i] = -__builtin_inff();
    return x;
  }
  // Lanes of cb that are -inf, and x with those lanes set to -inf.
  struct Mask {
    bool b[8];
  };
  static inline Mask neginf_lanes(T cb) {
    Mask m;
    for (int i = 0; i < 8; ++i) m.b[i] = cb.v[i] == -__builtin_inff();
    return m;
  }
  static inline T set_neginf(T x, Mask m) {
    for (int i = 0; i < 8; ++i)
      if (m.b[i]) x.v[i] = -__builtin_inff();
    return x;
  }
  static inline bool any(Mask m) {
    for (int i = 0; i < 8; ++i)
      if (m.b[i]) return true;
    return false;
  }
  static inline T exp2(T x) {
    // 0 below -125 like the SIMD paths (no denormal / underflowing result); NaN goes to exp2f.
    for (int i = 0; i < 8; ++i) x.v[i] = x.v[i] < -125.f ? 0.f : exp2f(x.v[i]);
    return x;
  }
  // fp16 <-> fp32 for n lanes (fp16.h: round to nearest even, as F16C).
  static inline T load_f16(const uint16_t* p, int n) {
    T r;
    for (int i = 0; i < 8; ++i) r.v[i] = i < n ? f16_to_f32(p[i]) : 0.f;
    return r;
  }
  static inline void store_f16(uint16_t* p, T a, int n) {
    for (int i = 0; i < 8 && i < n; ++i) p[i] = f32_to_f16(a.v[i]);
  }
  static constexpr bool kPanel32 = false;
  static constexpr bool kBf16Vec = false;  // no load_bf16 / store_bf16: scalar conversions
  static void pack_panel32(const void*, int64_t, int, int, void*) {}
};

}  // namespace
}  // namespace cpu
}  // namespace mmk
