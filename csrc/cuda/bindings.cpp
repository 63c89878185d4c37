// Torch bindings of the CUDA kernels (built into mmkernels._cuda only when torch is a CUDA build and a
// CUDA toolkit is found; see setup.py). The kernels themselves live in csrc/cuda/*.cu behind the
// plain-pointer launchers of launchers.h.
//
//   torch.ops.mmkernels_cuda.merge_attention_states(o1, lse1, o2, lse2) -> (o, lse)
//     o1, o2: (rows, heads, head_dim) float16 / bfloat16 / float32, any strides, same shape/dtype
//     lse1, lse2: (rows, heads) float32, any strides
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <tuple>

#include "cuda/launchers.h"

namespace {

mmkernels::cuda::DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return mmkernels::cuda::DType::kFloat32;
    case at::kHalf: return mmkernels::cuda::DType::kFloat16;
    case at::kBFloat16: return mmkernels::cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "merge_attention_states: o1 dtype must be float16, bfloat16 or float32, got ",
                         t.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states(const at::Tensor& o1, const at::Tensor& lse1,
                                                          const at::Tensor& o2, const at::Tensor& lse2) {
  TORCH_CHECK(o1.is_cuda() && o2.is_cuda() && lse1.is_cuda() && lse2.is_cuda(),
              "merge_attention_states: all tensors must be CUDA tensors");
  TORCH_CHECK(o1.dim() == 3, "merge_attention_states: o1 must be (rows, heads, head_dim), got ", o1.sizes());
  TORCH_CHECK(o2.sizes() == o1.sizes(), "merge_attention_states: o2 shape ", o2.sizes(), " != o1 shape ",
              o1.sizes());
  TORCH_CHECK(o2.scalar_type() == o1.scalar_type(), "merge_attention_states: o2 dtype ", o2.scalar_type(),
              " != o1 dtype ", o1.scalar_type());
  const auto rows = o1.size(0), heads = o1.size(1), head_dim = o1.size(2);
  for (const auto* l : {&lse1, &lse2}) {
    TORCH_CHECK(l->scalar_type() == at::kFloat, "merge_attention_states: lse must be float32, got ",
                l->scalar_type());
    TORCH_CHECK(l->dim() == 2 && l->size(0) == rows && l->size(1) == heads,
                "merge_attention_states: lse must be (rows, heads) = (", rows, ", ", heads, "), got ",
                l->sizes());
  }
  const c10::cuda::CUDAGuard guard(o1.device());
  auto o = at::empty_like(o1, at::MemoryFormat::Contiguous);
  auto lse = at::empty({rows, heads}, lse1.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t so[3] = {o.stride(0), o.stride(1), o.stride(2)};
  const int64_t so1[3] = {o1.stride(0), o1.stride(1), o1.stride(2)};
  const int64_t so2[3] = {o2.stride(0), o2.stride(1), o2.stride(2)};
  const int64_t sl[2] = {lse.stride(0), lse.stride(1)};
  const int64_t sl1[2] = {lse1.stride(0), lse1.stride(1)};
  const int64_t sl2[2] = {lse2.stride(0), lse2.stride(1)};
  const cudaError_t err = mmkernels::cuda::merge_attention_states(
      to_dtype(o1), o.data_ptr(), lse.data_ptr<float>(), o1.data_ptr(), lse1.data_ptr<float>(),
      o2.data_ptr(), lse2.data_ptr<float>(), rows, heads, head_dim, so, so1, so2, sl, sl1, sl2,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "merge_attention_states: launch failed: ", cudaGetErrorString(err));
  return {o, lse};
}

}  // namespace

TORCH_LIBRARY(mmkernels_cuda, m) {
  m.def("merge_attention_states(Tensor o1, Tensor lse1, Tensor o2, Tensor lse2) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmkernels_cuda, CUDA, m) {
  m.impl("merge_attention_states", &merge_attention_states);
}
