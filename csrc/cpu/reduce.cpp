// Token-reduction primitives on the CPU, torch-free part: the ISA choice (baseline flags). The
// kernels are in reduce_{avx512,avx2,scalar}.cpp behind reduce.h; the torch glue (checks,
// selection and index-map logic, work split) in reduce_torch.cpp.
#include "cpu/reduce.h"

#include "cpu/cpu_features.h"

namespace mmk {
namespace cpu {
namespace reduce {

const ReduceImpl* reduce_impl(const char** error) {
  const Isa isa = selected_isa(error);
  if (*error != nullptr) return nullptr;
  if (isa >= Isa::Avx512) {
    if (const ReduceImpl* p = reduce_impl_avx512()) return p;
  }
  if (isa >= Isa::Avx2) {
    if (const ReduceImpl* p = reduce_impl_avx2()) return p;
  }
  return reduce_impl_scalar();
}

const char* reduce_cpu_isa(const char** error) {
  const ReduceImpl* impl = reduce_impl(error);
  return impl ? impl->name : "";
}

}  // namespace reduce
}  // namespace cpu
}  // namespace mmk
