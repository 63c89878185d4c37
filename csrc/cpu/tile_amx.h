// AMX tile traits: the "Tile" of the kernels written once over tile operations (attention_amx.h,
// qmatmul_amx.h), on the real tmm registers. tile_emu.h gives the same interface in plain C++
// (the "amx_emulated" path that tests the kernels on CPUs without AMX).
//
// Every kernel uses one shape: all 8 tiles hold 16 rows x 64 bytes (palette 1), so a C tile is
// 16 x 16 fp32 / int32, an A tile 16 rows x 32 bf16 (or 64 int8), a B tile 16 rows of 16 column
// pairs (bf16) or quads (int8): B row k holds elements (2k, 2k + 1) (bf16) or (4k .. 4k + 3)
// (int8) of the contraction for each of the 16 columns ("VNNI" layout).
// Include only from an AMX translation unit, after MMK_TARGET_AMX (cpu_features.h); internal
// linkage throughout. The process must have the tile-data permission (cpu_features().amx).
#pragma once

#include <cstdint>
#include <cstring>

namespace mmk {
namespace cpu {
namespace {

// ldtilecfg's 64-byte operand.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline TileConfig full_tile_config() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  return c;
}

// The tile register is part of the instruction ("%c" prints the template constant); every
// instruction that touches memory clobbers it, so that the compiler never moves the stores that
// fill a buffer past the tile load that reads it (GCC's own _tile_loadd macros lack the clobber).
struct TileAmx {
  static constexpr bool kEmulated = false;
  static inline void configure() {
    static const TileConfig cfg = full_tile_config();
    __asm__ volatile("ldtilecfg %0" ::"m"(cfg) : "memory");
  }
  static inline void release() { __asm__ volatile("tilerelease" ::: "memory"); }
  template <int t>
  static inline void load(const void* base, int64_t stride) {
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride), "i"(t) : "memory");
  }
  template <int t>
  static inline void store(void* base, int64_t stride) {
    __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(stride), "i"(t) : "memory");
  }
  template <int t>
  static inline void zero() {
    __asm__ volatile("tilezero %%tmm%c0" ::"i"(t));
  }
  // c += a . b over bf16 pairs, fp32 accumulation.
  template <int c, int a, int b>
  static inline void dp_bf16() {
    __asm__ volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(c), "i"(a), "i"(b));
  }
  // c += a . b over int8 quads, int32 accumulation: a unsigned, b signed (tdpbusd) / both signed
  // (tdpbssd).
  template <int c, int a, int b>
  static inline void dp_u8s8() {
    __asm__ volatile("tdpbusd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(c), "i"(a), "i"(b));
  }
  template <int c, int a, int b>
  static inline void dp_s8s8() {
    __asm__ volatile("tdpbssd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(c), "i"(a), "i"(b));
  }
  // a signed, b unsigned (tdpbsud).
  template <int c, int a, int b>
  static inline void dp_s8u8() {
    __asm__ volatile("tdpbsud %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(c), "i"(a), "i"(b));
  }
};

}  // namespace
}  // namespace cpu
}  // namespace mmk
