// AMX tile peak loop: peak_tile_kernel.h over the real tiles (compiled for AMX by MMK_TARGET_AMX,
// cpu_features.h; only run when cpu_features().amx). No torch headers.
#include "cpu/cpu_features.h"
#include "cpu/peak.h"

#ifdef MMK_X86
#include <cstdint>
#include <cstring>

MMK_TARGET_AMX
#include "cpu/peak_tile_kernel.h"
#include "cpu/tile_amx.h"

namespace mmk {
namespace cpu {
namespace peak {

DotLoop tile_loop_amx() { return &TileKernel<TileAmx>::loop; }

}  // namespace peak
}  // namespace cpu
}  // namespace mmk

#else  // not x86
namespace mmk {
namespace cpu {
namespace peak {
DotLoop tile_loop_amx() { return nullptr; }
}  // namespace peak
}  // namespace cpu
}  // namespace mmk
#endif
