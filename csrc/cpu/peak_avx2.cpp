// AVX2 FMA peak loop: peak_kernel.h over the AVX2 vector traits (compiled for AVX2 by
// MMK_TARGET_AVX2, cpu_features.h; chosen at run time). No torch headers.
#include "cpu/cpu_features.h"
#include "cpu/peak.h"

#ifdef MMK_X86
#include <immintrin.h>

#include <cstdint>

MMK_TARGET_AVX2
#include "cpu/peak_kernel.h"
#include "cpu/vec_avx2.h"

namespace mmk {
namespace cpu {
namespace peak {

FmaLoop fma_loop_avx2() { return &FmaKernel<V256>::loop; }

}  // namespace peak
}  // namespace cpu
}  // namespace mmk

#else  // not x86
namespace mmk {
namespace cpu {
namespace peak {
FmaLoop fma_loop_avx2() { return nullptr; }
}  // namespace peak
}  // namespace cpu
}  // namespace mmk
#endif
