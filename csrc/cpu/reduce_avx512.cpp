// AVX-512 token-reduction path: reduce_kernel.h over 16-lane vectors (its code is compiled for
// AVX-512 by MMK_TARGET_AVX512, cpu_features.h; chosen at run time). No torch headers.
#include "cpu/cpu_features.h"
#include "cpu/reduce.h"

#ifdef MMK_X86
// GCC 12 reports false "may be used uninitialized" inside its own _mm512_reduce_* intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>

MMK_TARGET_AVX512
#include "cpu/reduce_kernel.h"
#include "cpu/vec_avx512.h"

namespace mmk {
namespace cpu {
namespace reduce {
namespace {

using Kernel = ReduceKernel<V512, 8>;  // 8 A rows x 32 B tokens = 16 accumulators
const ReduceImpl kImpl = {"avx512", &Kernel::normalize_row, &Kernel::sim_argmax,
                          &Kernel::merge_slots, &Kernel::pack_b_tiles};

}  // namespace

const ReduceImpl* reduce_impl_avx512() { return &kImpl; }

}  // namespace reduce
}  // namespace cpu
}  // namespace mmk

#else  // not x86
namespace mmk {
namespace cpu {
namespace reduce {
const ReduceImpl* reduce_impl_avx512() { return nullptr; }
}  // namespace reduce
}  // namespace cpu
}  // namespace mmk
#endif
