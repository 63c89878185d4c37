// Token-reduction primitives on the CPU: the plain-pointer interface between the torch glue
// (reduce_torch.cpp), the ISA choice (reduce.cpp) and the kernels of each path
// (reduce_{avx512,avx2,scalar}.cpp). No torch headers here.
#pragma once

#include <cstdint>

namespace mmk {
namespace cpu {
namespace reduce {

enum Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// B-side layout of the similarity kernel: tiles of 16 tokens, tile t holds C rows of 16 floats
// (packed[t][k][lane] = normalised B token t*16+lane, channel k; lanes past nb are zero).
constexpr int kTile = 16;
// A rows are processed 8 at a time; A buffers are padded (with zero rows) to a multiple of 8.
constexpr int kRowBlock = 8;

// One batch row of a merge: sources of output slot s are list[off[s] .. off[s+1]) (token
// indices, ascending); w[i] = size of token i (fp32), wsum[s] = sum of w over slot s's sources
// (accumulated in token order). x rows have stride sxn elements, channels contiguous; out rows
// are contiguous (stride C).
struct MergeRow {
  const void* x;
  int64_t sxn;
  void* out;
  int64_t C;
  int dtype;
  const int32_t* off;
  const int32_t* list;
  const float* w;
  const float* wsum;
};

struct ReduceImpl {
  const char* name;
  // dst[q * stride] = v[q] / max(||v||, 1e-12) for q < c (a true division): ||v|| is the sum of
  // squares in double over 16 chains (chain q: channels k = q mod 16, in order) added as a fixed
  // tree, its sqrt in double rounded once to float. The same bits on every path.
  void (*normalize_row)(const float* v, int64_t c, float* dst, int64_t stride);
  // For A rows [a0, a1) (a0, a1 multiples of kRowBlock, A padded): best[i] = max_j dot(A_i, B_j),
  // arg[i] = the first j attaining it, j over the nb packed B tokens (nb >= 1).
  void (*sim_argmax)(const float* a, int64_t c, int64_t a0, int64_t a1, const float* b_packed,
                     int64_t nb, float* best, int32_t* arg);
  // out[s] = (sum over sources i, in order, of w[i] * x[i]) / wsum[s] for slots [s0, s1); the
  // products and sums are rounded in fp32 one by one (no FMA), like the reference.
  void (*merge_slots)(const MergeRow& p, int64_t s0, int64_t s1);
  // Optional (nullptr: the glue's plain loop): B tiles [t0, t1) of the packed layout above from
  // nb normalised token rows (row-major, c floats each), lanes past nb zero. A copy: the values
  // are the rows' bits.
  void (*pack_b_tiles)(const float* rows, int64_t c, int64_t nb, int64_t t0, int64_t t1,
                       float* b_packed) = nullptr;
};

const ReduceImpl* reduce_impl_avx512();  // nullptr when not compiled for x86
const ReduceImpl* reduce_impl_avx2();    // nullptr when not compiled for x86
const ReduceImpl* reduce_impl_scalar();

// The path to use now (cpu_features.h: CPUID, lowered by MMKERNELS_CPU_ISA). Sets *error (static
// string) and returns nullptr when MMKERNELS_CPU_ISA is invalid.
const ReduceImpl* reduce_impl(const char** error);

// Name of that path: "avx512", "avx2" or "scalar" ("" with *error set).
const char* reduce_cpu_isa(const char** error);

}  // namespace reduce
}  // namespace cpu
}  // namespace mmk
