// Torch bindings of the CUDA kernels (built into mmkernels._cuda only when torch is a CUDA build
// and a CUDA toolkit is found; see setup.py). The kernels themselves live in csrc/cuda/*.cu behind
// the plain-pointer launchers of launchers.h.
//
//   torch.ops.mmkernels_cuda.merge_attention_states(o1, lse1, o2, lse2) -> (o, lse)
//     o1, o2: (rows, heads, head_dim) float16 / bfloat16 / float32, any strides, same shape/dtype
//     lse1, lse2: (rows, heads) float32, any strides
//   torch.ops.mmkernels_cuda.qgemv_int4(x, qweight, scales, zeros, bias, group_size) -> out
//     x: (M, K) float16 / bfloat16, M <= 8, unit stride along K; qweight (N, K/2) uint8, scales
//     (N, G) float32, zeros (N, G) uint8 or None (symmetric), bias (N,) float32 or None, all
//     contiguous; group_size 0 (per channel), 32, 64 or 128. out: (M, N) contiguous, x's dtype.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/types.h>

#include <optional>

#include <tuple>

#include "cuda/launchers.h"

namespace {

mmkernels::cuda::DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:    return mmkernels::cuda::DType::kFloat32;
    case at::kHalf:     return mmkernels::cuda::DType::kFloat16;
    case at::kBFloat16: return mmkernels::cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false,
                  "merge_attention_states: o1 dtype must be float16, bfloat16 or float32, got ",
                  t.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states(const at::Tensor& o1,
                                                          const at::Tensor& lse1,
                                                          const at::Tensor& o2,
                                                          const at::Tensor& lse2) {
  TORCH_CHECK(o1.is_cuda() && o2.is_cuda() && lse1.is_cuda() && lse2.is_cuda(),
              "merge_attention_states: all tensors must be CUDA tensors");
  TORCH_CHECK(o1.dim() == 3, "merge_attention_states: o1 must be (rows, heads, head_dim), got ",
              o1.sizes());
  TORCH_CHECK(o2.sizes() == o1.sizes(), "merge_attention_states: o2 shape ", o2.sizes(),
              " != o1 shape ", o1.sizes());
  TORCH_CHECK(o2.scalar_type() == o1.scalar_type(), "merge_attention_states: o2 dtype ",
              o2.scalar_type(), " != o1 dtype ", o1.scalar_type());
  const auto rows = o1.size(0), heads = o1.size(1), head_dim = o1.size(2);
  for (const auto* l : {&lse1, &lse2}) {
    TORCH_CHECK(l->scalar_type() == at::kFloat, "merge_attention_states: lse must be float32, got ",
                l->scalar_type());
    TORCH_CHECK(l->dim() == 2 && l->size(0) == rows && l->size(1) == heads,
                "merge_attention_states: lse must be (rows, heads) = (", rows, ", ", heads,
                "), got ", l->sizes());
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
  TORCH_CHECK(err == cudaSuccess,
              "merge_attention_states: launch failed: ", cudaGetErrorString(err));
  return {o, lse};
}

at::Tensor qgemv_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                      int64_t group_size) {
  TORCH_CHECK(x.is_cuda() && qweight.is_cuda() && scales.is_cuda(),
              "qgemv_int4: x, qweight and scales must be CUDA tensors");
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= mmkernels::cuda::kQGemvInt4MaxBatch,
              "qgemv_int4: x must be (M, K) with 1 <= M <= ", mmkernels::cuda::kQGemvInt4MaxBatch,
              ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "qgemv_int4: x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) == 1, "qgemv_int4: x must have unit stride along K");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k % 2 == 0, "qgemv_int4: K must be even, got ", k);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 &&
                  qweight.size(1) == k / 2 && qweight.is_contiguous(),
              "qgemv_int4: qweight must be contiguous uint8 (N, K/2) = (N, ", k / 2, "), got ",
              qweight.scalar_type(), qweight.sizes());
  const int64_t n = qweight.size(0);
  const int64_t groups = group_size == 0 ? 1 : k / group_size;
  TORCH_CHECK(group_size == 0 || ((group_size == 32 || group_size == 64 || group_size == 128) &&
                                  k % group_size == 0),
              "qgemv_int4: group_size must be 0 (per channel), 32, 64 or 128 dividing K = ", k,
              ", got ", group_size);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == n && scales.size(1) == groups,
              "qgemv_int4: scales must be contiguous float32 (", n, ", ", groups, "), got ",
              scales.scalar_type(), scales.sizes());
  const uint8_t* zp = nullptr;
  if (zeros.has_value()) {
    const auto& z = *zeros;
    TORCH_CHECK(z.is_cuda() && z.scalar_type() == at::kByte && z.is_contiguous() && z.dim() == 2 &&
                    z.size(0) == n && z.size(1) == groups,
                "qgemv_int4: zeros must be contiguous uint8 (", n, ", ", groups, "), got ",
                z.scalar_type(), z.sizes());
    zp = z.data_ptr<uint8_t>();
  }
  const float* bp = nullptr;
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK(b.is_cuda() && b.scalar_type() == at::kFloat && b.is_contiguous() && b.dim() == 1 &&
                    b.size(0) == n,
                "qgemv_int4: bias must be contiguous float32 (", n, "), got ", b.scalar_type(),
                b.sizes());
    bp = b.data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({m, n}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const cudaError_t err = mmkernels::cuda::qgemv_int4(
      to_dtype(x), out.data_ptr(), out.stride(0), x.data_ptr(), x.stride(0),
      qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(), zp, bp, m, n, k, group_size,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "qgemv_int4: launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY(mmkernels_cuda, m) {
  m.def(
      "merge_attention_states(Tensor o1, Tensor lse1, Tensor o2, Tensor lse2) -> (Tensor, Tensor)");
  m.def(
      "qgemv_int4(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, "
      "int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmkernels_cuda, CUDA, m) {
  m.impl("merge_attention_states", &merge_attention_states);
  m.impl("qgemv_int4", &qgemv_int4);
}

// `import mmkernels._cuda` needs a module init function; the ops register through TORCH_LIBRARY.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
