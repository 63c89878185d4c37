// Quantized matmul on the CPU (csrc/cpu/qmatmul*.cpp): the torch-facing entry points registered
// in csrc/ops.cpp as mmkernels_C::qmatmul_*. Semantics: mmkernels/quant/reference.py; weight
// buffers: mmkernels/quant/format.py; prepacked layouts: csrc/cpu/qmatmul_kernel.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace mmk {
namespace cpu {

// Weight-only prepacked layout: (w uint8, sT float32 (G, Npad), zT int32 (G, Npad)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> qmatmul_prepack_wo(
    const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
    int64_t bits);

// W8A8 prepacked (VNNI-blocked) layout: (w uint8, colsum int32 (Npad), zp int32 (Npad),
// sw float32 (Npad)). qweight must be 8-bit per channel.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qmatmul_prepack_a8(
    const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros);

// out (M, N) = x2 (M, K) @ w_hat.T (+ bias), weight-only. x2: float32 / bfloat16 with
// stride(1) == 1; out: x2's dtype, stride(1) == 1; bias / smooth float32 contiguous. With the
// prepacked (pw, psT, pzT) the larger-M GEMM kernel may run; without, the row-dot kernel does.
void qmatmul_wo(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
                const std::optional<at::Tensor>& zeros, int64_t bits,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& smooth,
                const std::optional<at::Tensor>& pw, const std::optional<at::Tensor>& psT,
                const std::optional<at::Tensor>& pzT, const at::Tensor& out);

// out (M, N) = W8A8 product of x2 with an 8-bit per-channel weight (reference.py's definition).
// The SIMD paths need the prepacked (pw, colsum, zp, sw); the scalar path reads qweight.
void qmatmul_w8a8(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
                  const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& smooth, const std::optional<at::Tensor>& pw,
                  const std::optional<at::Tensor>& colsum, const std::optional<at::Tensor>& zp,
                  const std::optional<at::Tensor>& sw, const at::Tensor& out);

// Name of the code path the qmatmul kernels use now: "avx512_bf16", "avx512", "avx2" or "scalar"
// (MMKERNELS_CPU_ISA lowers it). The AVX-512 paths use vpdpbusd for W8A8 when the CPU has
// AVX512-VNNI, else the AVX2 W8A8 kernel.
std::string qmatmul_cpu_isa();

}  // namespace cpu
}  // namespace mmk
