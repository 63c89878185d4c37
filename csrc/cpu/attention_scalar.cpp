// Portable attention path (baseline flags): the same algorithm over an 8-lane array "vector"
// that the compiler may map to SSE2. Used when the CPU has no AVX2+FMA, or when forced with
// MMKERNELS_CPU_ISA=scalar. No torch headers in this file (see attention.h).
#include <math.h>

#include "cpu/attention.h"
#include "cpu/attention_kernel.h"
#include "cpu/vec_scalar.h"

namespace mmk {
namespace cpu {
namespace {

// Attention's register tiles on the 8-lane array.
struct AttnVScalar : VScalar {
  static constexpr int RS = 4;
  static constexpr int RPV = 4;
  static constexpr int CPV = 2;
};

using KScalar = AttnKernel<AttnVScalar, MicroF32<AttnVScalar>>;
const AttnImpl kImpl = {"scalar", 8, 4, 4, &KScalar::pack, &KScalar::run, &any_nonfinite};

}  // namespace

const AttnImpl* attn_impl_scalar(int) { return &kImpl; }

}  // namespace cpu
}  // namespace mmk
