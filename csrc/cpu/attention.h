// Fused attention forward on CPU: plain-pointer interface shared by the driver (attention.cpp), the
// per-ISA kernels (attention_{avx512,avx2,scalar}.cpp) and the torch binding (ops.cpp).
// No torch headers here: the ISA translation units include this file.
// Semantics: docs/attention_kernel_contract.md.
#pragma once

#include <cstdint>

namespace mmk {
namespace cpu {

// kF16 (IEEE half) is widened to fp32 with F16C and computed by the fp32 micro-kernels on every
// path; the output is rounded back to half (nearest even).
enum AttnDtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Strides are in elements. The innermost stride of q/k/v/out/bias is 1 (checked in ops.cpp).
struct AttnParams {
  int dtype = kF32;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  int64_t q_sb = 0, q_sh = 0, q_ss = 0;
  int64_t k_sb = 0, k_sh = 0, k_ss = 0;
  int64_t v_sb = 0, v_sh = 0, v_ss = 0;
  int64_t o_sb = 0, o_sh = 0, o_ss = 0;
  const float* bias = nullptr;  // (Bb, Hq, Sk); bias_sb = 0 when Bb == 1 in dense mode
  int64_t bias_sb = 0, bias_sh = 0;
  float* lse = nullptr;  // (B', Hq, Sq)
  int64_t lse_sb = 0, lse_sh = 0, lse_ss = 0;
  float* scores = nullptr;  // (B', Sk)
  int64_t sc_sb = 0, sc_ss = 0;
  const int32_t* cu_q = nullptr;  // varlen when non-null (then cu_k too)
  const int32_t* cu_k = nullptr;
  int64_t nseq = 0;        // number of sequences
  int64_t Sq = 0, Sk = 0;  // dense lengths (per-sequence in dense mode)
  int Hq = 0, Hkv = 0, D = 0, Dv = 0;
  bool causal = false;
  float scale = 1.f;
  int scores_mode = 0;  // 0 none, 1 cls, 2 last, 3 mean
  int nthreads = 1;
};

// One sequence's placement.
struct AttnSeq {
  int64_t bq;       // batch index into q/out/lse (0 in varlen mode)
  int64_t bk;       // batch index into k/v/bias (0 in varlen mode)
  int64_t q_begin;  // first query row in the Sq axis
  int64_t k_begin;  // first key row in the Sk axis
  int64_t Lq, Lk;
};

// One unit of parallel work: query rows [q0, q0 + nq) of sequence `seq`, head h.
struct AttnItem {
  int64_t seq;
  int32_t h;
  int32_t q0, nq;
  float*
      part;  // scores partial row for this item (mean mode) or for (seq, h) (cls/last); may be null
};

// Per-thread scratch, allocated by the driver (sizes from the block constants below).
struct AttnScratch {
  float* S;       // BQ * kLDS logits of the current block
  float* P;       // BQ * kLDS probabilities (fp32, or bf16 pairs for the dot-product path)
  float* O;       // BQ * Dvp  output accumulator
  float* Qf;      // BQ * D    query rows converted to float (bf16 input on non-bf16 paths)
  float* rowbuf;  // kRowBuf   m, l, alpha, limits (BQ each), then the block's column terms (kLDS)
  float* keep;    // BQ * ldk  kept probabilities for scores (rows that contribute), may be null
  float* keep_m;  // BQ * nkb  running max at the time each block's probabilities were kept
  int64_t ldk;    // row stride of keep (>= Lk max rounded up to BK)
  int64_t nkb;    // row stride of keep_m
  // Decode-shaped calls (kJitRows below): each key block's K / V packed here right before use
  // (kJitKeys keys in AttnImpl::pack's layout) instead of once per (sequence, kv head) into the
  // shared buffer; null otherwise (AttnImpl::run then reads the shared packs).
  void* kjit;
  void* vjit;
};

// Block sizes shared by every path (the driver sizes scratch with them).
constexpr int kBQ = 64;       // max query rows per item
constexpr int kBK = 64;       // keys per block (multiple of every panel width, even)
constexpr int kBKMerge = 16;  // a last block of <= kBK + kBKMerge keys is not split
// Items that see at most kBKOne keys (vision towers: 197, 257, ...) take them all in one block:
// one row max / row sum per row instead of one per 64 keys, no rescaling of O, and the P.V
// accumulators stay in registers over the whole key range. S and P rows then hold up to
// kBKOne floats (S: 64 x 336 floats = 86 KiB per thread, L2-resident).
constexpr int kBKOne = 320;
constexpr int kLDS = kBKOne + 16;  // row stride of the S / P scratch (>= kBK + kBKMerge, >= kBKOne)
constexpr int kRowBuf = 4 * kBQ + kLDS;  // floats of AttnScratch::rowbuf
// Calls whose (sequence, kv head) is read by at most kJitRows query rows (group * Lq: decoding,
// a few tokens of a short prompt) pack each key block per item into thread scratch (AttnScratch::
// kjit): a shared pack would write K / V once more and read them back for one row tile, about 3x
// the memory traffic of reading them in place (decode with a 2048-key cache: 1.7-3x SDPA's time).
constexpr int kJitRows = 16;
constexpr int kJitKeys = kBKOne;  // the longest block (>= kBK + kBKMerge; a multiple of 32)

// What one ISA path provides.
struct AttnImpl {
  const char* name;
  int W;           // key panel width (lanes); packs are sized for keys and Dv padded to it
  int elem_bytes;  // bytes per packed K/V element (4 float, 2 bf16 pairs)
  int row_tile;    // preferred query-row multiple for blocks
  // Packs K and V of (sequence, kv head) into kp (npanel*W*Dk elems, Dk below) and vp
  // (Lk_pad*Dvp elems), Lk_pad = round_up(Lk, W), Dvp = round_up(Dv, W); padding is zero.
  // sanitize_v: V is always packed (never read in place) and its NaN / inf values become 0 (the
  // rare path below).
  void (*pack)(const AttnParams& p, const AttnSeq& s, int kvh, void* kp, void* vp, bool sanitize_v);
  // Computes one item (out, lse, scores partial); v_sanitized: vp was packed with sanitize_v
  // (with sc.kjit set: kp / vp are unused and each block is packed with sanitize_v).
  // Returns true when a row that is not a NaN row came out non-finite: V held a NaN / inf among
  // the keys the item computed with (P = 0 of a masked key times NaN is NaN). The driver then
  // reruns the item on a sanitised pack and marks the columns of the rows that see such a key
  // (docs/nan_semantics.md). Nothing is scanned on the fast path.
  bool (*run)(const AttnParams& p, const AttnSeq& s, const AttnItem& it, const void* kp,
              const void* vp, const AttnScratch& sc, bool v_sanitized);
  // Whether any of nrows rows of n contiguous elements of dtype (row r at base + r * stride
  // elements) holds a NaN or +-inf: a test of the exponent field, integer operations only (no FP
  // flag is raised). The torch backend's pre-check (attention_any_nonfinite below).
  bool (*any_nonfinite)(const void* base, int dtype, int64_t nrows, int64_t n, int64_t stride);
  // Dk = D rounded up to this: K panels and the Qf scratch hold Dk dims (zero past D; AMX: 32).
  int d_align = 1;
};

// Implementations available in this build; nullptr if the path does not support the dtype.
const AttnImpl* attn_impl_scalar(int dtype);
const AttnImpl* attn_impl_avx2(int dtype);
const AttnImpl* attn_impl_avx512(int dtype, bool bf16_dot);
// AMX tiles (attention_amx.cpp) and the same kernel over emulated tiles (attention_amx_emu.cpp,
// tile_emu.h); nullptr for dtypes they do not serve (the AVX-512 kernels run those).
const AttnImpl* attn_impl_amx(int dtype);
const AttnImpl* attn_impl_amx_emulated(int dtype);

// Runs the op. Returns nullptr on success, else a static error message.
const char* attention_forward_cpu(const AttnParams& p);

// Whether a strided tensor of dtype (ndim <= 8 dims of sizes / strides in elements, base at its
// first element) holds a NaN or +-inf; dims of stride 0 are read once. Every address read is one
// of the tensor's elements. OpenMP (up to nthreads) over large tensors only. Returns nullptr on
// success (the answer in *found), else a static error message.
const char* attention_any_nonfinite(const void* base, int dtype, int ndim, const int64_t* sizes,
                                    const int64_t* strides, int nthreads, bool* found);

// Name of the path calls use now ("amx", "avx512_bf16", "avx512", "avx2", "scalar",
// "amx_emulated"); sets *error if MMKERNELS_CPU_ISA is invalid.
const char* attention_cpu_isa(const char** error);

}  // namespace cpu
}  // namespace mmk
