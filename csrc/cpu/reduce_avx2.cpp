// AVX2 + FMA token-reduction path: reduce_kernel.h over 8-lane vectors (compiled for AVX2 + FMA by
// MMK_TARGET_AVX2, cpu_features.h; chosen at run time on CPUs without AVX-512). Lane for lane the
// arithmetic of the AVX-512 path, so both give the same plans and merged values. No torch headers.
#include "cpu/cpu_features.h"
#include "cpu/reduce.h"

#ifdef MMK_X86
#include <immintrin.h>

#include <cstdint>

MMK_TARGET_AVX2
#include "cpu/reduce_kernel.h"
#include "cpu/vec_avx2.h"

namespace mmk {
namespace cpu {
namespace reduce {
namespace {

using Kernel = ReduceKernel<V256, 4>;  // 4 A rows x 16 B tokens = 8 accumulators
const ReduceImpl kImpl = {"avx2", &Kernel::normalize_row, &Kernel::sim_argmax,
                          &Kernel::merge_slots};

}  // namespace

const ReduceImpl* reduce_impl_avx2() { return &kImpl; }

}  // namespace reduce
}  // namespace cpu
}  // namespace mmk

#else  // not x86
namespace mmk {
namespace cpu {
namespace reduce {
const ReduceImpl* reduce_impl_avx2() { return nullptr; }
}  // namespace reduce
}  // namespace cpu
}  // namespace mmk
#endif
