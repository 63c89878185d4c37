// merge_attention_states: combine two partial attention results over disjoint key sets.
//
// Split-KV / chunked-prefill attention computes softmax(QK^T)V over key subsets separately; each
// part returns its output o_i (normalised within the part) and the row log-sum-exp lse_i. The exact
// result over the union is the LSE-weighted combination:
//   lse = log(exp(lse1) + exp(lse2)) = m + log(exp(lse1 - m) + exp(lse2 - m)),  m = max(lse1, lse2)
//   o   = o1 * exp(lse1 - lse) + o2 * exp(lse2 - lse)
// A part with no key (lse = -inf) gets weight 0; both -inf -> o = 0, lse = -inf.
//
// One warp-sized group of threads per (row, head); each thread handles head_dim / blockDim.x
// elements. The weights are computed once per (row, head) in float32.
#include "launchers.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace mmkernels {
namespace cuda {
namespace {

template <typename T>
struct Convert;
template <>
struct Convert<float> {
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <>
struct Convert<__half> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Convert<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

struct Strides3 {
  int64_t s0, s1, s2;
};
struct Strides2 {
  int64_t s0, s1;
};

// blockDim = (32, HEADS_PER_BLOCK): x walks head_dim, y picks the head; grid.x covers rows*heads.
template <typename T>
__global__ void merge_attention_states_kernel(
    T* __restrict__ o, float* __restrict__ lse_out, const T* __restrict__ o1,
    const float* __restrict__ lse1, const T* __restrict__ o2, const float* __restrict__ lse2,
    int64_t rows, int64_t heads, int64_t head_dim, Strides3 so, Strides3 so1, Strides3 so2,
    Strides2 sl, Strides2 sl1, Strides2 sl2) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (pair >= rows * heads) return;
  const int64_t r = pair / heads;
  const int64_t h = pair - r * heads;

  const float a = lse1[r * sl1.s0 + h * sl1.s1];
  const float b = lse2[r * sl2.s0 + h * sl2.s1];
  const float m = fmaxf(a, b);
  float w1 = 0.f, w2 = 0.f, lse = -INFINITY;
  if (m != -INFINITY) {  // at least one part saw a key (m == +inf / NaN inputs propagate as given)
    const float e1 = __expf(a - m);  // exp(-inf) = 0 for an empty part
    const float e2 = __expf(b - m);
    const float s = e1 + e2;
    lse = m + __logf(s);
    w1 = e1 / s;
    w2 = e2 / s;
  }
  if (lse_out != nullptr && threadIdx.x == 0) lse_out[r * sl.s0 + h * sl.s1] = lse;

  const T* p1 = o1 + r * so1.s0 + h * so1.s1;
  const T* p2 = o2 + r * so2.s0 + h * so2.s1;
  T* po = o + r * so.s0 + h * so.s1;
  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    // A zero weight must not read its part: the empty part's o may hold anything (even NaN).
    float acc = 0.f;
    if (w1 != 0.f) acc += w1 * Convert<T>::load(p1[d * so1.s2]);
    if (w2 != 0.f) acc += w2 * Convert<T>::load(p2[d * so2.s2]);
    po[d * so.s2] = Convert<T>::store(acc);
  }
}

template <typename T>
cudaError_t launch(void* o, float* lse_out, const void* o1, const float* lse1, const void* o2,
                   const float* lse2, int64_t rows, int64_t heads, int64_t head_dim,
                   const int64_t* so, const int64_t* so1, const int64_t* so2, const int64_t* sl,
                   const int64_t* sl1, const int64_t* sl2, cudaStream_t stream) {
  const int64_t pairs = rows * heads;
  if (pairs == 0) return cudaSuccess;
  constexpr int kHeadsPerBlock = 8;
  const dim3 block(32, kHeadsPerBlock);
  const int64_t blocks = (pairs + kHeadsPerBlock - 1) / kHeadsPerBlock;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const Strides2 lse_strides = lse_out ? Strides2{sl[0], sl[1]} : Strides2{0, 0};
  merge_attention_states_kernel<T><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
      static_cast<T*>(o), lse_out, static_cast<const T*>(o1), lse1, static_cast<const T*>(o2), lse2,
      rows, heads, head_dim, Strides3{so[0], so[1], so[2]}, Strides3{so1[0], so1[1], so1[2]},
      Strides3{so2[0], so2[1], so2[2]}, lse_strides, Strides2{sl1[0], sl1[1]},
      Strides2{sl2[0], sl2[1]});
  return cudaGetLastError();
}

}  // namespace

cudaError_t merge_attention_states(DType dtype, void* o, float* lse_out, const void* o1,
                                   const float* lse1, const void* o2, const float* lse2,
                                   int64_t rows, int64_t heads, int64_t head_dim,
                                   const int64_t o_strides[3], const int64_t o1_strides[3],
                                   const int64_t o2_strides[3], const int64_t lse_out_strides[2],
                                   const int64_t lse1_strides[2], const int64_t lse2_strides[2],
                                   cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(o, lse_out, o1, lse1, o2, lse2, rows, heads, head_dim, o_strides,
                           o1_strides, o2_strides, lse_out_strides, lse1_strides, lse2_strides,
                           stream);
    case DType::kFloat16:
      return launch<__half>(o, lse_out, o1, lse1, o2, lse2, rows, heads, head_dim, o_strides,
                            o1_strides, o2_strides, lse_out_strides, lse1_strides, lse2_strides,
                            stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(o, lse_out, o1, lse1, o2, lse2, rows, heads, head_dim, o_strides,
                                   o1_strides, o2_strides, lse_out_strides, lse1_strides,
                                   lse2_strides, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace mmkernels
