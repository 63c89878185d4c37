// AMX attention path: not written yet (the AVX-512 kernels serve every dtype).
#include "cpu/attention.h"

namespace mmk {
namespace cpu {
const AttnImpl* attn_impl_amx(int) { return nullptr; }
const AttnImpl* attn_impl_amx_emulated(int) { return nullptr; }
}  // namespace cpu
}  // namespace mmk
