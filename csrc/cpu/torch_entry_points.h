// The kernels' torch entry points that are also bound directly with pybind11 (csrc/ops.cpp:
// mmkernels._C.<name>, the same C++ function as the op mmkernels_C::<name> without the
// dispatcher's boxing of its arguments, ~2 us less a call). Defined in the families' torch glue
// (csrc/cpu/<family>_torch.cpp), which also registers them as the ops' CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace mmk {
namespace cpu {

void attention_fwd_cpu(const at::Tensor& q4, const at::Tensor& k4, const at::Tensor& v4,
                       const std::optional<at::Tensor>& bias3,
                       const std::optional<at::Tensor>& cu_seqlens_q,
                       const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                       int64_t max_seqlen_k, bool causal, double scale, int64_t scores_mode,
                       const at::Tensor& out4, const std::optional<at::Tensor>& lse3,
                       const std::optional<at::Tensor>& scores2);

namespace qmm {

void qmatmul_wo(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
                const std::optional<at::Tensor>& zeros, int64_t bits,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& smooth,
                const std::optional<at::Tensor>& pw, const std::optional<at::Tensor>& psT,
                const std::optional<at::Tensor>& pzT, const at::Tensor& out, int64_t act);

void qmatmul_w8a8(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
                  const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& smooth, const std::optional<at::Tensor>& pw,
                  const std::optional<at::Tensor>& colsum, const std::optional<at::Tensor>& zp,
                  const std::optional<at::Tensor>& sw, const at::Tensor& out, int64_t act);

void linear_f32(const at::Tensor& x2, const at::Tensor& packed,
                const std::optional<at::Tensor>& bias, const at::Tensor& out, int64_t act);

}  // namespace qmm
}  // namespace cpu
}  // namespace mmk
