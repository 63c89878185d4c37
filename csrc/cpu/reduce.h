// Token-reduction primitives on the CPU (csrc/cpu/reduce*.cpp): the torch-facing entry points
// registered in csrc/ops.cpp as mmkernels_C::reduce_*. Semantics: mmkernels/reduce/reference.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace mmk {
namespace cpu {

// (src_to_out (B,N), keep_idx (B,N-r), src_idx (B,r), dst_idx (B,r)), int64. metric float32,
// bfloat16 or float16, any strides.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reduce_tome_plan(
    const at::Tensor& metric, int64_t r, int64_t protect_first);

// (x_out (B,n_out,C) in x.dtype, size_out (B,n_out) in size.dtype). x float32/bfloat16/float16
// with stride(-1) == 1; src_to_out int64 (B,N); size floating (B,N), any strides.
std::tuple<at::Tensor, at::Tensor> reduce_tome_merge(const at::Tensor& x,
                                                      const at::Tensor& src_to_out, int64_t n_out,
                                                      const at::Tensor& size);

// out[b, j] = x[b, idx[b, j]] (rows copied as bytes: any dtype). x needs stride(-1) == 1.
at::Tensor reduce_gather_rows(const at::Tensor& x, const at::Tensor& idx);

// (B,k) int64 ascending: the first protect_first indices + the best k - protect_first of the
// rest (descending score, ties to the lower index). scores float32/bfloat16/float16/float64.
at::Tensor reduce_select_tokens(const at::Tensor& scores, int64_t k, int64_t protect_first);

// Name of the code path the reduce kernels use now ("avx512" or "scalar").
std::string reduce_cpu_isa();

}  // namespace cpu
}  // namespace mmk
