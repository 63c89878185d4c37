// qgemv_int4: int4 weights x fp16 / bf16 activations for decode (batch 1 .. 8).
//
//   out[m, n] = sum_k x[m, k] * (q[n, k] - z[n, g]) * s[n, g] + bias[n],   g = k / group_size
//
// Storage (mmkernels/quant/packing.py): qweight (N, K/2) uint8, element 2j in the LOW nibble of
// byte j; symmetric values are two's-complement nibbles (zero point 0), asymmetric ones unsigned
// with a uint8 zero point per group; scales float32 (N, G); group_size 32 / 64 / 128 or K.
//
// Work split: a block is 4 warps; each warp owns ROWS consecutive output channels n and streams
// their packed rows. Lane l takes 32-element chunks l, l + 32, l + 64, ... of the row: one 128-bit
// load of 16 bytes per row and chunk, so a warp reads 512 contiguous bytes of a row per step.
// Groups are at least 32 wide and chunks start at multiples of 32, so a chunk lies in one group:
// its dot products are accumulated unscaled (exact integers times x) and scaled once per chunk.
// Lanes keep fp32 partial sums per (row, batch row); a warp-shuffle reduction finishes them.
//
// Dequantisation without int -> float conversions (I2F runs at quarter rate): a nibble v at bit
// position 4i (i = 0..3) of a 16-bit half-word is OR-ed into the mantissa of 2^23,
//     float((w & (0xF << 4i)) | 0x4B000000) = 2^23 + v * 16^i         (exact: v 16^i < 2^16)
// and 2^23 + z * 16^i is subtracted, which leaves (v - z) * 16^i exactly. The factor 16^i is
// undone by multiplying the matching x by 16^-i once per chunk (shared by all ROWS rows): power of
// two scalings do not change the rounding of the fp32 FMAs. So each weight costs one LOP3
// (mask + or), one FADD and one FFMA per batch row. Symmetric nibbles are XOR-ed with 8 first
// (two's complement v -> v + 8, unsigned) and use the zero point 8.
//
// Loads: weights use ld.global.cs (streamed once); x uses the read-only path (every warp reads it).
// When K is not a multiple of 32 or a pointer is not 16-byte aligned the kernel instantiated with
// VEC = false reads bytes / single elements instead (same arithmetic).
#include "launchers.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace mmkernels {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 32;                // int4 elements per lane and step (16 bytes)
constexpr uint32_t kMagic = 0x4B000000u;  // bit pattern of 2^23

struct QGemvParams {
  void* out;
  int64_t ldo;
  const void* x;
  int64_t ldx;
  const uint8_t* qweight;
  const float* scales;
  const uint8_t* zeros;  // nullptr: symmetric
  const float* bias;     // nullptr: no bias
  int batch;
  int64_t n, k, group_size, groups;
};

template <typename T>
struct Act;
template <>
struct Act<__half> {
  __device__ static float load(const __half* p) { return __half2float(*p); }
  __device__ static void load8(const __half* p, float f[8]) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __half22float2(h[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Act<__nv_bfloat16> {
  __device__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static void load8(const __nv_bfloat16* p, float f[8]) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __bfloat1622float2(h[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// 16 bytes of a packed row starting at byte 16 * chunk (zero past the row's end).
template <bool VEC>
__device__ __forceinline__ uint4 load_weight_chunk(const uint8_t* row, int64_t chunk,
                                                   int64_t row_bytes) {
  if (VEC) return __ldcs(reinterpret_cast<const uint4*>(row) + chunk);
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int b = 0; b < 16; ++b) {
    const int64_t idx = chunk * 16 + b;
    if (idx < row_bytes) w[b / 4] |= static_cast<uint32_t>(row[idx]) << (8 * (b % 4));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// x[k .. k + 8) of one batch row as floats, element i multiplied by 16^-(i % 4) (see the top).
template <typename T, bool VEC>
__device__ __forceinline__ void load_x8(const T* xrow, int64_t k, int64_t kmax, float f[8]) {
  if (VEC) {
    Act<T>::load8(xrow + k, f);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = (k + i < kmax) ? Act<T>::load(xrow + k + i) : 0.f;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] *= __int_as_float((127 - 4 * (i % 4)) << 23);  // 16^-(i % 4)
}

template <typename T, int BATCH, int ROWS, bool VEC>
__global__ void __launch_bounds__(kThreads) qgemv_int4_kernel(const QGemvParams p) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * ROWS;
  if (row0 >= p.n) return;  // the whole warp leaves together

  const int64_t row_bytes = p.k / 2;
  const int64_t chunks = (p.k + kChunk - 1) / kChunk;
  const bool symmetric = p.zeros == nullptr;
  const uint32_t flip = symmetric ? 0x88888888u : 0u;
  const T* x = static_cast<const T*>(p.x);

  float acc[ROWS][BATCH];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < BATCH; ++m) acc[r][m] = 0.f;

  for (int64_t c = lane; c < chunks; c += 32) {
    const int64_t k0 = c * kChunk;
    const int64_t g = k0 / p.group_size;
    uint32_t w[ROWS][4];
    float zmagic[ROWS][4];  // 2^23 + z * 16^i
    float scale[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int64_t n = row0 + r;
      if (n < p.n) {
        const uint4 v = load_weight_chunk<VEC>(p.qweight + n * row_bytes, c, row_bytes);
        w[r][0] = v.x ^ flip;
        w[r][1] = v.y ^ flip;
        w[r][2] = v.z ^ flip;
        w[r][3] = v.w ^ flip;
        scale[r] = __ldg(p.scales + n * p.groups + g);
        const float z = symmetric ? 8.f : static_cast<float>(__ldg(p.zeros + n * p.groups + g));
#pragma unroll
        for (int i = 0; i < 4; ++i) zmagic[r][i] = 8388608.f + z * static_cast<float>(1 << (4 * i));
      } else {  // past the last row: contribute nothing (never stored)
#pragma unroll
        for (int j = 0; j < 4; ++j) w[r][j] = 0u;
#pragma unroll
        for (int i = 0; i < 4; ++i) zmagic[r][i] = 8388608.f;
        scale[r] = 0.f;
      }
    }

    float part[ROWS][BATCH];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < BATCH; ++m) part[r][m] = 0.f;

#pragma unroll
    for (int j = 0; j < 4; ++j) {  // word j: elements k0 + 8j .. k0 + 8j + 7
      float xs[BATCH][8];
#pragma unroll
      for (int m = 0; m < BATCH; ++m) {
        if (m < p.batch) {
          load_x8<T, VEC>(x + m * p.ldx, k0 + 8 * j, p.k, xs[m]);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) xs[m][i] = 0.f;
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const uint32_t lo = w[r][j];        // elements 0..3 in bits 0..15
        const uint32_t hi = w[r][j] >> 16;  // elements 4..7
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t mask = 0xFu << (4 * i);
          const float f_lo = __uint_as_float((lo & mask) | kMagic) - zmagic[r][i];
          const float f_hi = __uint_as_float((hi & mask) | kMagic) - zmagic[r][i];
#pragma unroll
          for (int m = 0; m < BATCH; ++m) {
            part[r][m] = fmaf(f_lo, xs[m][i], part[r][m]);
            part[r][m] = fmaf(f_hi, xs[m][i + 4], part[r][m]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < BATCH; ++m) acc[r][m] = fmaf(part[r][m], scale[r], acc[r][m]);
  }

  // Warp reduction (every lane ends with the sum), then lane 0 writes.
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < BATCH; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[r][m] = v;
    }
  if (lane == 0) {
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int64_t n = row0 + r;
      if (n >= p.n) break;
      const float b = p.bias != nullptr ? p.bias[n] : 0.f;
#pragma unroll
      for (int m = 0; m < BATCH; ++m)
        if (m < p.batch) out[m * p.ldo + n] = Act<T>::store(acc[r][m] + b);
    }
  }
}

template <typename T, int BATCH, bool VEC>
cudaError_t launch(const QGemvParams& p, cudaStream_t stream) {
  // Fewer rows per warp for larger batches keeps the x fragments and accumulators in registers.
  constexpr int kRows = BATCH <= 2 ? 4 : 2;
  const int64_t blocks = (p.n + kWarps * kRows - 1) / (kWarps * kRows);
  qgemv_int4_kernel<T, BATCH, kRows, VEC>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool VEC>
cudaError_t dispatch_batch(const QGemvParams& p, cudaStream_t stream) {
  if (p.batch <= 1) return launch<T, 1, VEC>(p, stream);
  if (p.batch <= 2) return launch<T, 2, VEC>(p, stream);
  if (p.batch <= 4) return launch<T, 4, VEC>(p, stream);
  return launch<T, 8, VEC>(p, stream);
}

template <typename T>
cudaError_t dispatch_vec(const QGemvParams& p, bool vec, cudaStream_t stream) {
  return vec ? dispatch_batch<T, true>(p, stream) : dispatch_batch<T, false>(p, stream);
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace

cudaError_t qgemv_int4(DType dtype, void* out, int64_t ldo, const void* x, int64_t ldx,
                       const uint8_t* qweight, const float* scales, const uint8_t* zeros,
                       const float* bias, int64_t batch, int64_t n, int64_t k, int64_t group_size,
                       cudaStream_t stream) {
  if (batch < 1 || batch > kQGemvInt4MaxBatch || n < 0 || k <= 0 || (k % 2) != 0) {
    return cudaErrorInvalidValue;
  }
  if (group_size == 0) group_size = k;
  if (group_size % kChunk != 0 && group_size != k) return cudaErrorInvalidValue;
  if (k % group_size != 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  QGemvParams p{
      out, ldo, x,          ldx,           qweight, scales, zeros, bias, static_cast<int>(batch),
      n,   k,   group_size, k / group_size};
  // 128-bit loads: whole 16-byte chunks in every row, aligned rows and x rows.
  const bool vec = (k % kChunk) == 0 && aligned16(qweight) && aligned16(x) && (ldx % 8) == 0;
  switch (dtype) {
    case DType::kFloat16:  return dispatch_vec<__half>(p, vec, stream);
    case DType::kBFloat16: return dispatch_vec<__nv_bfloat16>(p, vec, stream);
    default:               return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace mmkernels
