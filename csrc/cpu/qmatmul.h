// Quantized matmul on the CPU: the plain-pointer interface between the torch glue
// (qmatmul_torch.cpp), the ISA choice (qmatmul.cpp) and the kernels of each path
// (qmatmul_{amx,amx_emu,avx512,avx2,scalar}.cpp). No torch headers here. Semantics:
// mmkernels/quant/reference.py.
//
// Three kinds of kernels:
//  * rowdot   weight-only, small M (decode): reads the canonical weight layout of
//             mmkernels/quant/packing.py row by row (no repacking); each output channel's weights
//             are decoded once per block of up to 4 activation rows and dotted with them.
//  * gemm     weight-only, larger M: a strip of 64 output channels of a prepacked weight is
//             decoded block by block (KC input features) into an L2-resident panel, then a
//             register-tiled micro-kernel (fp32 FMA or bf16 dot products) runs every row of x
//             over it.
//  * a8       W8A8: per-token int8 quantization of x, int32 dot products on a prepacked
//             VNNI-blocked weight, fused float epilogue.
// The AMX tables ("amx", "amx_emulated": qmatmul_amx_kernel.h) are the AVX-512 bf16 table with the
// a8 item on tdpbusd / tdpbssd and the bf16-x gemm item on tdpbf16ps, in blocks of 32 rows x 32
// channels (2 x 2 tiles of 16 x 16): both prepacked layouts below are already AMX B tiles (16
// quads / pairs x 16 channels, stride 256 bytes); rows past whole 16-row tiles and fp32 x (fp16 x:
// staged as fp32) take the AVX-512 items. Tested over emulated tiles only (no AMX CPU was at hand).
#pragma once

#include <cstdint>
#include <cstring>

namespace mmk {
namespace cpu {
namespace qmm {

// x / out dtypes. kF16 (IEEE binary16): x is widened to fp32 (exact; F16C in the SIMD paths)
// wherever a kernel reads it, the math is the fp32 math of kF32, and the output is rounded to
// binary16 (nearest even, NaN kept): the reference's float32 compute for float16 x. It never takes
// the bf16 dot products (bf16 would round x).
enum Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Output channels per strip of both prepacked layouts (4 AVX-512 vectors of fp32 / int32).
constexpr int kStrip = 64;

// ---- canonical weight (mmkernels/quant/packing.py) ---------------------------------------------
// q: int8 (N, K) / uint8 (N, K) / packed int4 uint8 (N, K/2), rows contiguous. scales (N, G)
// float32; zeros (N, G) uint8 or nullptr (symmetric). gs = K / G (group size; K if per channel).
struct QWeight {
  const uint8_t* q;
  const float* scales;
  const uint8_t* zeros;
  int bits;
  int64_t N, K, G, gs;
};

// ---- weight-only prepacked layout ("wo") -----------------------------------------------------
// Strips of 64 output channels; within a strip, for each pair of input features (k = 2p, 2p + 1)
// one unit per channel:
//   int4: 1 byte = the canonical byte (low nibble: k = 2p, high nibble: k = 2p + 1), and
//   int8: 2 bytes (k = 2p, then k = 2p + 1),
//   w[strip][p][lane] with lanes = channels strip*64 .. strip*64 + 63 (padding channels are 0).
// Every value is stored UNSIGNED with an int32 zero point: symmetric int4 nibbles are flipped
// with ^0x8 (zero point 8), symmetric int8 bytes with ^0x80 (zero point 128), so one decode
// serves all four formats: w_hat = (u - z) * s. sT, zT: (G, Npad) transposed scales / zero points
// (padding channels: scale 0, zero point 0). An odd K is padded with one feature of value z.
struct WoPacked {
  const uint8_t* w;
  const float* sT;
  const int32_t* zT;
  int64_t Npad, P;  // P = ceil(K / 2) pairs
};

// ---- W8A8 prepacked layout ("a8", VNNI-blocked) -------------------------------------------------
// Strips of 64 output channels; within a strip, for each quad of input features
// (k = 4t .. 4t + 3) 64 lanes x 4 bytes: w[strip][t][lane][0..3] (the operand layout of
// vpdpbusd: one 32-bit lane per channel holds 4 consecutive features). Bytes are the stored
// values (int8 symmetric, uint8 asymmetric), K padded with zero bytes to a multiple of 4.
// colsum[n] = sum_k w[n, k] (symmetric), zp[n] = zero point (asymmetric; else 0),
// sw[n] = weight scale (padding channels: 0).
struct A8Packed {
  const uint8_t* w;
  const int32_t* colsum;
  const int32_t* zp;
  const float* sw;
  int64_t Npad, T;  // T = ceil(K / 4) quads
};

// Activation applied to each output after the bias (mmkernels.linear's ``activation``; semantics:
// mmkernels/linear/reference.py, docs/nan_semantics.md), in fp32 before the output's rounding:
//   kActRelu       max(v, 0) (NaN kept)
//   kActGelu       v / 2 * (1 + erf(v / sqrt 2))
//   kActGeluTanh   v / 2 * (1 + tanh(sqrt(2 / pi) * (v + 0.044715 v^3)))  (= v * sigmoid(2 * that))
//   kActQuickGelu  v * sigmoid(1.702 v)
//   kActSilu       v * sigmoid(v)
enum Act : int {
  kActNone = 0,
  kActRelu = 1,
  kActGelu = 2,
  kActGeluTanh = 3,
  kActQuickGelu = 4,
  kActSilu = 5
};
constexpr int kActCount = 6;

// Output: rows of out (M, N), row stride ldo elements, dtype kF32 / kBF16 / kF16; bias fp32 (N) or
// null; act: an Act, applied after the bias.
struct Out {
  void* y;
  int64_t ldo;
  int dtype;
  const float* bias;
  int act = kActNone;
};

// rowdot: x as fp32, prepared by the driver. int4: xe / xo = the even / odd columns of each row
// (M, K/2) (so a byte's low nibble pairs with xe, its high nibble with xo); int8: xe = x (M, K).
// Row stride ldx elements. x8 (int4, only when the impl asks for it with rowdot_x8 and
// rowdot_x8_layout(w) holds): x in blocks of 128 features, each stored as 8 phases of 16,
// x8[m][blk][p][i] = x[m][128 blk + 8 i + p] (zero past K), row stride ldx8 = 128 * ceil(K / 128):
// the order in which the 16 32-bit lanes of 64 weight bytes yield their nibbles (lane i holds
// bytes 4i .. 4i+3, i.e. features 8i .. 8i+7, nibble p at bits 4p .. 4p+3).
struct RowdotJob {
  QWeight w;
  const float* xe;
  const float* xo;
  int64_t ldx, M;
  const float* x8;
  int64_t ldx8;
  Out out;
};

// The phase-8 layout serves int4 rows whose groups span whole 64-byte blocks (per channel, or a
// group size that is a multiple of 128).
inline bool rowdot_x8_layout(const QWeight& w) {
  return w.bits == 4 && (w.G == 1 || w.gs % 128 == 0);
}

// gemm: a = x rows (M, K) with row stride lda elements; a_dtype kF32 (FMA path on a panel of
// w_hat in fp32) or kBF16 (needs K even: dot products of bf16 pairs with the exact integers
// (u - z) in bf16, fp32 accumulation per group, scaled per group).
// Dense fp32 weight (mmkernels.linear): dense != nullptr points to the weight prepacked as the fp32
// panels themselves, dense[strip][k][lane] = W[64 strip + lane, k] (S, K, 64), padding channels 0
// (linear_prepack); a_dtype is kF32, p / bits / G / gs are unused, nothing is decoded or scaled.
struct GemmJob {
  const float* dense = nullptr;
  WoPacked p;
  int bits;
  int64_t N, K, G, gs;
  const void* a;
  int64_t lda;
  int a_dtype;
  int64_t M;
  Out out;
};

// a8: x rows (M, K) (stride ldx, fp32 / bf16 / fp16), optional smooth (K) fp32. Workspace filled by
// a8_quantize: aq (M, 4T) elements of a8_elem_bytes (row stride 4T elements), sx (M) activation
// scales, rowsum (M) = sum_k x_q[m, k]. For the scalar path p is unused and w is read in the
// canonical layout.
struct A8Job {
  const void* x;
  int64_t ldx;
  int x_dtype;
  const float* smooth;
  int64_t M, K, N;
  QWeight w;
  A8Packed p;
  bool symmetric;
  uint8_t* aq;
  float* sx;
  int32_t* rowsum;
  Out out;
};

struct QmmImpl {
  const char* name;
  // Output channels [n0, n1) for every row of x.
  void (*rowdot)(const RowdotJob& j, int64_t n0, int64_t n1);
  // rowdot reads x8 (see RowdotJob) when rowdot_x8_layout(w) holds.
  bool rowdot_x8;
  // Rows [m0, m1) x channels of one strip; scratch: gemm_scratch_bytes per thread (64-aligned).
  // nullptr: no gemm on this path (the driver uses rowdot for every M).
  void (*gemm_item)(const GemmJob& j, int64_t m0, int64_t m1, int64_t strip, void* scratch);
  int64_t (*gemm_scratch_bytes)(const GemmJob& j, int64_t rows);
  // gemm_item accepts a_dtype == kBF16 (bf16 dot products); false: the driver passes fp32 rows.
  bool gemm_bf16;
  // Quantize rows [m0, m1) of x into aq / sx / rowsum.
  void (*a8_quantize)(const A8Job& j, int64_t m0, int64_t m1);
  // Rows [m0, m1) x channels of one strip (scalar path: strip = channels [64 s, 64 s + 64)).
  void (*a8_item)(const A8Job& j, int64_t m0, int64_t m1, int64_t strip);
  // a8_quantize stores x_q + 128 as uint8 for symmetric weights (vpdpbusd's unsigned operand);
  // false: plain int8 x_q.
  bool a8_shifted;
  // Bytes per element of aq: 1 (int8 / uint8) or 2 (int16, for vpmaddwd).
  int a8_elem_bytes;
  // The driver gives gemm_item / a8_item row ranges of a multiple of this many rows (but the last
  // one): the kernels' row block (6-row register tiles; AMX: 2 tiles of 16 rows).
  int item_rows;
  // dst[0 .. n) = the n elements of x (dtype kF32 / kBF16 / kF16) as fp32, exactly (fp16: F16C on
  // the SIMD paths): the driver's staging of x for rowdot and the fp32 gemm.
  void (*widen_row)(const void* x, int dtype, int64_t n, float* dst);
};

const QmmImpl* qmm_impl_avx512(bool bf16);  // nullptr when not compiled for x86
const QmmImpl* qmm_impl_avx2();             // nullptr when not compiled for x86
const QmmImpl* qmm_impl_scalar();
// AMX tiles (qmatmul_amx.cpp) and the same kernels over emulated tiles (qmatmul_amx_emu.cpp,
// tile_emu.h); nullptr when not compiled for x86.
const QmmImpl* qmm_impl_amx();
const QmmImpl* qmm_impl_amx_emulated();

// The path to use now (cpu_features.h: CPUID, lowered by MMKERNELS_CPU_ISA); the AVX-512 paths
// use vpdpbusd for W8A8 when the CPU has AVX512-VNNI, else the AVX2 W8A8 kernel. Sets *error
// (static string) and returns nullptr when MMKERNELS_CPU_ISA is invalid.
const QmmImpl* qmm_impl(const char** error);

// Name of that path: "amx", "avx512_bf16", "avx512", "avx2", "scalar" or "amx_emulated" ("" with
// *error set).
const char* qmatmul_cpu_isa(const char** error);

// W8A8 per-token scale from the bits of max_k |x[t, k]| taken as an integer max (NaN > inf > every
// finite value, so no NaN is dropped): amax / 127, 1 for an all-zero row, NaN for a row holding a
// NaN or inf (its output row is NaN; docs/nan_semantics.md). static: no cross-ISA merging.
static inline float a8_scale(uint32_t amax_bits) {
  if (amax_bits >= 0x7f800000u) return __builtin_nanf("");
  float am;
  std::memcpy(&am, &amax_bits, 4);
  return am > 0.f ? am / 127.f : 1.f;
}

// Shared helpers (defined in qmatmul.cpp, baseline flags).
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);  // round to nearest even (NaN stays NaN)
float half_to_f32(uint16_t h);  // binary16, exact (fp16.h)
// f32_to_bf16 (kBF16), or binary16 rounded to nearest even, overflow to inf, NaN kept (kF16,
// fp16.h)
uint16_t f32_to_16bit(float f, int dtype);
// The activation act (an Act) of v, computed in double with libm (erfc, exp) and rounded to fp32:
// the scalar paths' epilogue and the SIMD paths' scalar stores. NaN gives NaN.
float act_f32(float v, int act);
// out[m, n] = act(v) in the output dtype (v: bias already added): the out-of-line half of
// store_scalar (qmatmul_kernel.h) for 16-bit outputs and activations.
void store_general(const Out& o, int64_t m, int64_t n, float v);

// Element off of x (dtype kF32 / kBF16 / kF16) as fp32 (exact).
inline float x_elem_f32(const void* x, int dtype, int64_t off) {
  if (dtype == kF32) return ((const float*)x)[off];
  const uint16_t h = ((const uint16_t*)x)[off];
  return dtype == kBF16 ? bf16_to_f32(h) : half_to_f32(h);
}

}  // namespace qmm
}  // namespace cpu
}  // namespace mmk
