// The AMX tile peak loop written once over tile traits (tile_amx.h, tile_emu.h): four independent
// accumulators (tmm0-3) fed by two A tiles (tmm4-5) and two B tiles (tmm6-7), the 2x2 blocking the
// AMX kernels use, with no memory traffic inside the loop. Include after the traits header.
#pragma once

#include <cstdint>

namespace mmk {
namespace cpu {
namespace peak {
namespace {

template <class Tile>
struct TileKernel {
  // kind 0: tdpbf16ps (flops: 16 x 16 x 32 multiply-adds per instruction); kind 1: tdpbusd
  // (int8 ops: 16 x 16 x 64 multiply-adds). Returns the operations done; *sink gets a C value.
  static double loop(int kind, int64_t iterations, float* sink) {
    alignas(64) static thread_local uint8_t buf[16 * 64];
    for (int i = 0; i < 16 * 64; ++i) buf[i] = (uint8_t)(i * 7 + 1) & 0x3f;  // small finite bf16
    Tile::configure();
    Tile::template zero<0>();
    Tile::template zero<1>();
    Tile::template zero<2>();
    Tile::template zero<3>();
    Tile::template load<4>(buf, 64);
    Tile::template load<5>(buf, 64);
    Tile::template load<6>(buf, 64);
    Tile::template load<7>(buf, 64);
    if (kind == 0) {
      for (int64_t it = 0; it < iterations; ++it) {
        Tile::template dp_bf16<0, 4, 6>();
        Tile::template dp_bf16<1, 4, 7>();
        Tile::template dp_bf16<2, 5, 6>();
        Tile::template dp_bf16<3, 5, 7>();
      }
    } else {
      for (int64_t it = 0; it < iterations; ++it) {
        Tile::template dp_u8s8<0, 4, 6>();
        Tile::template dp_u8s8<1, 4, 7>();
        Tile::template dp_u8s8<2, 5, 6>();
        Tile::template dp_u8s8<3, 5, 7>();
      }
    }
    alignas(64) float out[16 * 16];
    Tile::template store<0>(out, 64);
    Tile::release();
    *sink = out[0];
    const double k = kind == 0 ? 32.0 : 64.0;
    return 4.0 * 2.0 * 16.0 * 16.0 * k * (double)iterations;
  }
};

}  // namespace
}  // namespace peak
}  // namespace cpu
}  // namespace mmk
