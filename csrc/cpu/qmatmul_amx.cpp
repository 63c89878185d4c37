// AMX quantized-matmul path: not written yet (the AVX-512 kernels serve every call).
#include "cpu/qmatmul.h"

namespace mmk {
namespace cpu {
namespace qmm {
const QmmImpl* qmm_impl_amx() { return nullptr; }
const QmmImpl* qmm_impl_amx_emulated() { return nullptr; }
}  // namespace qmm
}  // namespace cpu
}  // namespace mmk
