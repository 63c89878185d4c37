// The AMX tile traits of tile_amx.h in plain C++: eight 1 KiB tiles per thread and the
// instructions' arithmetic as the Intel SDM defines it (tdpbf16ps: bf16 inputs with denormals
// read as zero, the two products of a pair added one at a time in fp32 round-to-nearest, results
// flushed to zero; tdpbusd / tdpbssd / tdpbsud: exact int32 sums, wrapping). The "amx_emulated"
// path runs the AMX kernels over these on any AVX-512 BF16 CPU, so that their packing, tiling,
// softmax and epilogues are tested where no AMX exists (slow: for tests only). Same rules as
// tile_amx.h.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace mmk {
namespace cpu {
namespace {

struct TileEmu {
  static constexpr bool kEmulated = true;
  struct alignas(64) State {
    uint8_t t[8][16][64];
    bool configured;
  };
  static inline State& state() {
    static thread_local State s;
    return s;
  }
  static inline void configure() { state().configured = true; }
  static inline void release() { state().configured = false; }
  // On the hardware a tile instruction without a loaded configuration (before ldtilecfg, after
  // tilerelease) raises #UD (SIGILL): the emulation stops the process the same way, so that a
  // kernel that forgets to configure fails its tests here too.
  static inline State& configured_state() {
    State& s = state();
    if (!s.configured) {
      std::fputs("mmkernels: emulated AMX tile instruction without a tile configuration\n", stderr);
      std::abort();
    }
    return s;
  }
  template <int t>
  static inline void load(const void* base, int64_t stride) {
    for (int r = 0; r < 16; ++r)
      std::memcpy(configured_state().t[t][r], (const uint8_t*)base + r * stride, 64);
  }
  template <int t>
  static inline void store(void* base, int64_t stride) {
    for (int r = 0; r < 16; ++r)
      std::memcpy((uint8_t*)base + r * stride, configured_state().t[t][r], 64);
  }
  template <int t>
  static inline void zero() {
    std::memset(configured_state().t[t], 0, 16 * 64);
  }

  static inline float bf16_daz(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    if ((h & 0x7f80u) == 0) h &= 0x8000u;  // denormal -> signed zero
    const uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static inline float ftz(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
    std::memcpy(&x, &u, 4);
    return x;
  }
  template <int c, int a, int b>
  static inline void dp_bf16() {
    State& s = configured_state();
    for (int m = 0; m < 16; ++m) {
      float acc[16];
      std::memcpy(acc, s.t[c][m], 64);
      for (int k = 0; k < 16; ++k) {
        const float a0 = bf16_daz(&s.t[a][m][4 * k]), a1 = bf16_daz(&s.t[a][m][4 * k + 2]);
        for (int n = 0; n < 16; ++n) {
          acc[n] = ftz(acc[n] + a0 * bf16_daz(&s.t[b][k][4 * n]));
          acc[n] = ftz(acc[n] + a1 * bf16_daz(&s.t[b][k][4 * n + 2]));
        }
      }
      std::memcpy(s.t[c][m], acc, 64);
    }
  }
  template <bool ASigned, int c, int a, int b, bool BSigned = true>
  static inline void dp_int8() {
    State& s = configured_state();
    for (int m = 0; m < 16; ++m) {
      uint32_t acc[16];
      std::memcpy(acc, s.t[c][m], 64);
      for (int k = 0; k < 16; ++k)
        for (int n = 0; n < 16; ++n) {
          int32_t dot = 0;
          for (int i = 0; i < 4; ++i) {
            const uint8_t ab = s.t[a][m][4 * k + i];
            const int32_t av = ASigned ? (int32_t)(int8_t)ab : (int32_t)ab;
            const uint8_t bb = s.t[b][k][4 * n + i];
            dot += av * (BSigned ? (int32_t)(int8_t)bb : (int32_t)bb);
          }
          acc[n] += (uint32_t)dot;
        }
      std::memcpy(s.t[c][m], acc, 64);
    }
  }
  template <int c, int a, int b>
  static inline void dp_u8s8() {
    dp_int8<false, c, a, b>();
  }
  template <int c, int a, int b>
  static inline void dp_s8s8() {
    dp_int8<true, c, a, b>();
  }
  template <int c, int a, int b>
  static inline void dp_s8u8() {
    dp_int8<true, c, a, b, false>();
  }
};

}  // namespace
}  // namespace cpu
}  // namespace mmk
