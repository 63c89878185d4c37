// Plain-pointer launchers of the CUDA kernels in csrc/cuda/*.cu.
//
// No torch headers here: every .cu file compiles stand-alone with nvcc (the CI compile gate,
// `python -m mmkernels.compile_gate`), and csrc/cuda/bindings.cpp wraps these for torch when a CUDA
// build of torch is present.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace mmkernels {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Merge two partial attention results computed over disjoint key sets of the same queries.
//
//   lse = logaddexp(lse1, lse2)
//   o   = o1 * exp(lse1 - lse) + o2 * exp(lse2 - lse)
//
// Both lse inputs -inf (no key in either part) -> o = 0, lse = -inf (never NaN).
// o1, o2, o: (rows, heads, head_dim) with element strides (any, may differ per tensor; the last
// stride may be anything too). lse1, lse2, lse_out: float32 (rows, heads) with element strides;
// lse_out may be nullptr. o1 / o2 / o share `dtype`; math is float32.
// Returns the launch error (cudaSuccess when queued).
cudaError_t merge_attention_states(DType dtype, void* o, float* lse_out, const void* o1,
                                   const float* lse1, const void* o2, const float* lse2,
                                   int64_t rows, int64_t heads, int64_t head_dim,
                                   const int64_t o_strides[3], const int64_t o1_strides[3],
                                   const int64_t o2_strides[3], const int64_t lse_out_strides[2],
                                   const int64_t lse1_strides[2], const int64_t lse2_strides[2],
                                   cudaStream_t stream);

// int4 weight GEMV for decode, fp16 / bf16 activations (csrc/cuda/qgemv_int4.cu):
//
//   out[m, n] = sum_k x[m, k] * (q[n, k] - z[n, k / group_size]) * scales[n, k / group_size]
//               + bias[n]
//
// qweight: (n, k/2) uint8, contiguous, element 2j in the low nibble of byte j (the format of
// mmkernels/quant/packing.py): two's-complement nibbles when zeros == nullptr (symmetric), else
// unsigned with zeros (n, k / group_size) uint8. scales: (n, k / group_size) float32, contiguous.
// group_size: 32, 64, 128 or 0 (= k, per output channel). x: (batch, k) rows ldx elements apart,
// contiguous along k; out: (batch, n) rows ldo apart; both `dtype` (kFloat16 / kBFloat16).
// bias: float32 (n) or nullptr. 1 <= batch <= kQGemvInt4MaxBatch, k even. fp32 accumulation.
// Returns cudaErrorInvalidValue for arguments outside these, else the launch error.
constexpr int64_t kQGemvInt4MaxBatch = 8;

cudaError_t qgemv_int4(DType dtype, void* out, int64_t ldo, const void* x, int64_t ldx,
                       const uint8_t* qweight, const float* scales, const uint8_t* zeros,
                       const float* bias, int64_t batch, int64_t n, int64_t k, int64_t group_size,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace mmkernels
