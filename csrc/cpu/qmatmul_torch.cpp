// Quantized matmul on the CPU, torch glue: argument checks, prepacking (the cached weight
// layouts), activation staging, per-thread scratch and the work split over OpenMP threads, then
// the kernels of the selected path (qmatmul.h); registered as mmkernels_C::qmatmul_* (schemas in
// csrc/ops.cpp). Semantics: mmkernels/quant/reference.py; weight buffers:
// mmkernels/quant/packing.py.
//
// Which kernel runs (weight-only):
//   * no prepacked weight given (the Python glue passes one only for M >= its GEMM threshold):
//     rowdot on the canonical layout, every M;
//   * prepacked weight given and the ISA path has a gemm kernel: gemm.
// W8A8: the SIMD paths need the prepacked VNNI-blocked weight; the scalar path reads qweight.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/qmatmul.h"
#include "cpu/qmatmul_kernel.h"  // store_scalar: the scalar output epilogue (bias, activation)
#include "cpu/torch_entry_points.h"

namespace mmk {
namespace cpu {
namespace qmm {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

const QmmImpl* select_impl() {
  const char* err = nullptr;
  const QmmImpl* impl = qmm_impl(&err);
  TORCH_CHECK(err == nullptr, "qmatmul (CPU): ", err ? err : "");
  return impl;
}

// ---------------------------------------------------------------------------------------------
// Scratch: grow-only, per calling thread (fresh large allocations would page-fault on every call).
// ---------------------------------------------------------------------------------------------

struct Scratch {
  void* p = nullptr;
  size_t cap = 0;
  ~Scratch() { std::free(p); }
  char* get(size_t bytes) {
    bytes = (bytes + 4095) / 4096 * 4096;
    if (bytes > cap) {
      std::free(p);
      p = std::aligned_alloc(64, bytes);
      TORCH_CHECK(p != nullptr, "qmatmul (CPU): out of memory for ", bytes, " bytes of scratch");
      cap = bytes;
    }
    return (char*)p;
  }
};

thread_local Scratch tl_scratch;

int64_t align64(int64_t b) { return (b + 63) / 64 * 64; }

int num_threads(int64_t work_items) {
  int nt = at::get_num_threads();
  if (nt < 1) nt = 1;
  if (work_items < nt) nt = work_items > 0 ? (int)work_items : 1;
  return nt;
}

// Rows of one GEMM work item (a multiple of the kernels' row block `rb`, QmmImpl::item_rows): up
// to max_rows (a multiple of rb), so that a decoded / packed weight strip is reused for many rows,
// but small enough that M's row blocks times the S column strips give every thread at least two
// items. Sets *mblocks.
int64_t rows_per_item(int64_t M, int64_t S, int64_t max_rows, int64_t rb, int64_t* mblocks) {
  const int nt_max = std::max(1, at::get_num_threads());
  int64_t mb = ceil_div(M, max_rows);
  if (mb * S < 2 * nt_max) mb = std::min(ceil_div(M, rb), ceil_div(2 * nt_max, S));
  const int64_t rows = ceil_div(ceil_div(M, mb), rb) * rb;
  *mblocks = ceil_div(M, rows);
  return rows;
}

// The GEMM's work items: blocks of `rows` rows x the S strips of 64 output channels, on nt
// threads with per_thread bytes of scratch each (j.a_dtype decides the scratch size).
struct GemmSplit {
  int64_t rows, items, S, per_thread;
  int nt;
};

GemmSplit split_gemm(const QmmImpl* impl, const GemmJob& j) {
  GemmSplit g;
  g.S = ceil_div(j.N, kStrip);
  int64_t mblocks = 0;
  g.rows = rows_per_item(j.M, g.S, 192, impl->item_rows, &mblocks);
  g.items = mblocks * g.S;
  g.nt = num_threads(g.items);
  g.per_thread = align64(impl->gemm_scratch_bytes(j, g.rows));
  return g;
}

// Every item of j (a / lda / a_dtype set) on g.nt OpenMP threads; thread_mem holds
// g.per_thread * g.nt bytes.
void run_gemm(const QmmImpl* impl, const GemmJob& j, const GemmSplit& g, char* thread_mem) {
#pragma omp parallel num_threads(g.nt)
  {
    void* scratch = thread_mem + g.per_thread * omp_get_thread_num();
#pragma omp for schedule(static)
    for (int64_t it = 0; it < g.items; ++it) {
      const int64_t mb = it / g.S, st = it % g.S;
      impl->gemm_item(j, mb * g.rows, std::min(j.M, (mb + 1) * g.rows), st, scratch);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// torch-facing checks
// ---------------------------------------------------------------------------------------------

int dtype_code(const at::Tensor& t) {
  const auto st = t.scalar_type();
  return st == at::kFloat ? kF32 : st == at::kHalf ? kF16 : kBF16;
}

void check_x_out(const at::Tensor& x2, const at::Tensor& out, int64_t N, int64_t K) {
  TORCH_CHECK(x2.device().is_cpu() && out.device().is_cpu(),
              "qmatmul (CPU): x2 and out must be CPU tensors");
  TORCH_CHECK(x2.scalar_type() == at::kFloat || x2.scalar_type() == at::kBFloat16 ||
                  x2.scalar_type() == at::kHalf,
              "qmatmul (CPU): x2 must be float32, bfloat16 or float16 (float64 is served by the "
              "reference), got ",
              x2.scalar_type());
  TORCH_CHECK(x2.dim() == 2 && x2.size(1) == K, "qmatmul (CPU): x2 must be (M, K=", K, "), got ",
              x2.sizes());
  TORCH_CHECK(x2.size(1) <= 1 || x2.stride(1) == 1,
              "qmatmul (CPU): x2 needs stride(1) == 1, got strides ", x2.strides());
  TORCH_CHECK(out.scalar_type() == x2.scalar_type() && out.dim() == 2 &&
                  out.size(0) == x2.size(0) && out.size(1) == N && (N <= 1 || out.stride(1) == 1),
              "qmatmul (CPU): out must be ", x2.scalar_type(), " (", x2.size(0), ", ", N,
              ") with stride(1) == 1, got ", out.scalar_type(), " ", out.sizes());
}

QWeight check_weight(const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "qmatmul (CPU): bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qweight.device().is_cpu() && qweight.dim() == 2 && qweight.is_contiguous(),
              "qmatmul (CPU): qweight must be a contiguous 2-D CPU tensor, got ", qweight.sizes());
  const bool sym = !zeros.has_value();
  const auto want = (bits == 8 && sym) ? at::kChar : at::kByte;
  TORCH_CHECK(qweight.scalar_type() == want, "qmatmul (CPU): qweight must be ", want, " for ", bits,
              "-bit ", sym ? "symmetric" : "asymmetric", " weights, got ", qweight.scalar_type());
  const int64_t N = qweight.size(0), K = qweight.size(1) * (bits == 4 ? 2 : 1);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.size(0) == N &&
                  scales.size(1) >= 1 && K % scales.size(1) == 0 && scales.is_contiguous(),
              "qmatmul (CPU): scales must be contiguous float32 (N, G) with G dividing K, got ",
              scales.scalar_type(), " ", scales.sizes());
  const int64_t G = scales.size(1);
  TORCH_CHECK(G == 1 || (K / G) % 2 == 0, "qmatmul (CPU): group size must be even, got ", K / G);
  if (!sym) {
    TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->sizes() == scales.sizes() &&
                    zeros->is_contiguous(),
                "qmatmul (CPU): zeros must be contiguous uint8 ", scales.sizes(), ", got ",
                zeros->scalar_type(), " ", zeros->sizes());
  }
  QWeight w;
  w.q = (const uint8_t*)qweight.data_ptr();
  w.scales = scales.data_ptr<float>();
  w.zeros = sym ? nullptr : zeros->data_ptr<uint8_t>();
  w.bits = (int)bits;
  w.N = N;
  w.K = K;
  w.G = G;
  w.gs = K / G;
  return w;
}

const float* vec_f32(const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == n &&
                  t->is_contiguous() && t->device().is_cpu(),
              "qmatmul (CPU): ", name, " must be contiguous float32 (", n, ",), got ",
              t->scalar_type(), " ", t->sizes());
  return t->data_ptr<float>();
}

void check_act(int64_t act) {
  TORCH_CHECK(act >= 0 && act < kActCount, "qmatmul / linear (CPU): act must be in [0, ", kActCount,
              ") (qmm::Act), got ", act);
}

// act: checked by check_act.
Out make_out(const at::Tensor& out, const float* bias, int64_t act) {
  Out o;
  o.y = out.data_ptr();
  o.ldo = out.stride(0);
  o.dtype = dtype_code(out);
  o.bias = bias;
  o.act = (int)act;
  return o;
}

// Row m of x2 as fp32 (impl->widen_row: exact, F16C for float16 on the SIMD paths) into buf (K).
const float* x_row_f32(const QmmImpl* impl, const at::Tensor& x2, int dt, int64_t m, float* buf) {
  const int64_t K = x2.size(1);
  const char* src = (const char*)x2.data_ptr() + m * x2.stride(0) * x2.element_size();
  if (dt == kF32) return (const float*)src;
  impl->widen_row(src, dt, K, buf);
  return buf;
}

// fp32 copy of x (/ smooth) into dst (M, K) (int4 rowdot: even / odd halves, each (M, K/2)).
void stage_fp32(const QmmImpl* impl, const at::Tensor& x2, const float* smooth, float* dst,
                bool split, int nt) {
  const int64_t M = x2.size(0), K = x2.size(1);
  const int dt = dtype_code(x2);
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> buf(dt == kF32 ? 0 : K);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      if (!split && !smooth && dt != kF32) {  // widened straight into place
        x_row_f32(impl, x2, dt, m, dst + m * K);
        continue;
      }
      const float* x = x_row_f32(impl, x2, dt, m, buf.data());
      for (int64_t k = 0; k < K; ++k) {
        float v = x[k];
        if (smooth) v = v / smooth[k];
        if (split) {
          dst[(k & 1) * M * (K / 2) + m * (K / 2) + k / 2] = v;
        } else {
          dst[m * K + k] = v;
        }
      }
    }
  }
}

// x (/ smooth) in the phase-8 layout of RowdotJob::x8 (small M: single-threaded).
void stage_x8(const QmmImpl* impl, const at::Tensor& x2, const float* smooth, float* dst,
              int64_t ld) {
  const int64_t M = x2.size(0), K = x2.size(1);
  const int dt = dtype_code(x2);
  std::vector<float> buf(dt == kF32 ? 0 : K);
  for (int64_t m = 0; m < M; ++m) {
    const float* x = x_row_f32(impl, x2, dt, m, buf.data());
    float* row = dst + m * ld;
    for (int64_t blk = 0; blk < ld; blk += 128)
      for (int64_t i = 0; i < 16; ++i)
        for (int64_t p = 0; p < 8; ++p) {
          const int64_t k = blk + 8 * i + p;
          float v = 0.f;
          if (k < K) {
            v = x[k];
            if (smooth) v = v / smooth[k];
          }
          row[blk + 16 * p + i] = v;
        }
  }
}

// ---------------------------------------------------------------------------------------------
// The ops (mmkernels_C::qmatmul_*)
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Prepacking (one-time per weight; the Python glue caches the results)
// ---------------------------------------------------------------------------------------------

// Weight-only prepacked layout: (w uint8, sT float32 (G, Npad), zT int32 (G, Npad)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> qmatmul_prepack_wo(
    const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
    int64_t bits) {
  const QWeight w = check_weight(qweight, scales, zeros, bits);
  const int64_t N = w.N, K = w.K, G = w.G, Npad = ceil_div(N, kStrip) * kStrip;
  const int64_t P = ceil_div(K, 2), unit = bits == 4 ? 1 : 2, S = Npad / kStrip;
  const bool sym = w.zeros == nullptr;
  const int zsym = bits == 4 ? 8 : 128;
  at::Tensor pw = at::zeros({S, P, kStrip * unit}, qweight.options().dtype(at::kByte));
  at::Tensor sT = at::zeros({G, Npad}, scales.options());
  at::Tensor zT = at::zeros({G, Npad}, scales.options().dtype(at::kInt));
  uint8_t* dst = pw.data_ptr<uint8_t>();
  float* s = sT.data_ptr<float>();
  int32_t* z = zT.data_ptr<int32_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      s[g * Npad + n] = w.scales[n * G + g];
      z[g * Npad + n] = sym ? zsym : (int32_t)w.zeros[n * G + g];
    }
  const uint8_t flip = sym ? (bits == 4 ? 0x88 : 0x80) : 0;
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t st = s0; st < s1; ++st)
      for (int64_t lane = 0; lane < kStrip; ++lane) {
        const int64_t n = st * kStrip + lane;
        if (n >= N) break;
        uint8_t* col = dst + st * P * kStrip * unit + lane * unit;
        if (bits == 4) {
          const uint8_t* row = w.q + n * (K / 2);
          for (int64_t p = 0; p < P; ++p) col[p * kStrip] = row[p] ^ flip;
        } else {
          const uint8_t* row = w.q + n * K;
          const uint8_t pad = (uint8_t)z[(G - 1) * Npad + n];  // odd K: one feature of value z
          for (int64_t p = 0; p < P; ++p) {
            col[p * kStrip * 2] = row[2 * p] ^ flip;
            col[p * kStrip * 2 + 1] = 2 * p + 1 < K ? (uint8_t)(row[2 * p + 1] ^ flip) : pad;
          }
        }
      }
  });
  return {pw, sT, zT};
}

// W8A8 prepacked (VNNI-blocked) layout: (w uint8, colsum int32 (Npad), zp int32 (Npad),
// sw float32 (Npad)). qweight must be 8-bit per channel.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qmatmul_prepack_a8(
    const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros) {
  const QWeight w = check_weight(qweight, scales, zeros, 8);
  TORCH_CHECK(w.G == 1, "qmatmul (CPU): W8A8 needs per-channel scales, got G=", w.G);
  const int64_t N = w.N, K = w.K, Npad = ceil_div(N, kStrip) * kStrip, T = ceil_div(K, 4);
  const int64_t S = Npad / kStrip;
  const bool sym = w.zeros == nullptr;
  at::Tensor pw = at::zeros({S, T, kStrip * 4}, qweight.options().dtype(at::kByte));
  at::Tensor colsum = at::zeros({Npad}, scales.options().dtype(at::kInt));
  at::Tensor zp = at::zeros({Npad}, scales.options().dtype(at::kInt));
  at::Tensor sw = at::zeros({Npad}, scales.options());
  uint8_t* dst = pw.data_ptr<uint8_t>();
  int32_t* cs = colsum.data_ptr<int32_t>();
  int32_t* z = zp.data_ptr<int32_t>();
  float* s = sw.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = w.q + n * K;
      uint8_t* col = dst + (n / kStrip) * T * kStrip * 4 + (n % kStrip) * 4;
      int32_t sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        col[(k / 4) * kStrip * 4 + (k % 4)] = row[k];
        sum += sym ? (int32_t)(int8_t)row[k] : (int32_t)row[k];
      }
      cs[n] = sum;
      z[n] = sym ? 0 : (int32_t)w.zeros[n];
      s[n] = w.scales[n];
    }
  });
  return {pw, colsum, zp, sw};
}

// ---------------------------------------------------------------------------------------------
// Weight-only
// ---------------------------------------------------------------------------------------------

}  // namespace

// out (M, N) = act(x2 (M, K) @ w_hat.T (+ bias)), weight-only (act: qmm::Act). x2: float32 /
// bfloat16 / float16 with stride(1) == 1; out: x2's dtype, stride(1) == 1; bias / smooth float32
// contiguous. With the prepacked (pw, psT, pzT) the larger-M GEMM kernel may run; without, the
// row-dot kernel does.
void qmatmul_wo(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
                const std::optional<at::Tensor>& zeros, int64_t bits,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& smooth,
                const std::optional<at::Tensor>& pw, const std::optional<at::Tensor>& psT,
                const std::optional<at::Tensor>& pzT, const at::Tensor& out, int64_t act) {
  check_act(act);
  const QWeight w = check_weight(qweight, scales, zeros, bits);
  check_x_out(x2, out, w.N, w.K);
  const float* b = vec_f32(bias, w.N, "bias");
  const float* sm = vec_f32(smooth, w.K, "smooth");
  const int64_t M = x2.size(0), N = w.N, K = w.K;
  if (M == 0 || N == 0) return;
  const QmmImpl* impl = select_impl();
  const int dt = dtype_code(x2);
  const Out o = make_out(out, b, act);

  if (pw.has_value() && impl->gemm_item != nullptr) {
    TORCH_CHECK(psT.has_value() && pzT.has_value(), "qmatmul (CPU): pw needs psT and pzT");
    GemmJob j;
    j.p.Npad = ceil_div(N, kStrip) * kStrip;
    j.p.P = ceil_div(K, 2);
    TORCH_CHECK(pw->scalar_type() == at::kByte && pw->is_contiguous() &&
                    pw->numel() == j.p.Npad * j.p.P * (bits == 4 ? 1 : 2) &&
                    psT->scalar_type() == at::kFloat && psT->is_contiguous() &&
                    psT->numel() == w.G * j.p.Npad && pzT->scalar_type() == at::kInt &&
                    pzT->is_contiguous() && pzT->numel() == w.G * j.p.Npad,
                "qmatmul (CPU): prepacked weight does not match qweight (use qmatmul_prepack_wo)");
    j.p.w = pw->data_ptr<uint8_t>();
    j.p.sT = psT->data_ptr<float>();
    j.p.zT = pzT->data_ptr<int32_t>();
    j.bits = (int)bits;
    j.N = N;
    j.K = K;
    j.G = w.G;
    j.gs = w.gs;
    j.M = M;
    j.out = o;
    // float16 x: staged as fp32 (the fp32 gemm; bf16 dot products would round x to bf16)
    const bool use_bf16 = impl->gemm_bf16 && dt == kBF16 && sm == nullptr && K % 2 == 0;
    const bool stage = !use_bf16 && (dt != kF32 || sm != nullptr);
    j.a_dtype = use_bf16 ? kBF16 : kF32;
    const GemmSplit g = split_gemm(impl, j);
    const int64_t stage_bytes = stage ? align64(M * K * 4) : 0;
    char* mem = tl_scratch.get(stage_bytes + g.per_thread * g.nt);
    if (stage) {
      stage_fp32(impl, x2, sm, (float*)mem, false, num_threads(M));
      j.a = mem;
      j.lda = K;
    } else {
      j.a = x2.data_ptr();
      j.lda = x2.stride(0);
    }
    run_gemm(impl, j, g, mem + stage_bytes);
    return;
  }

  // rowdot on the canonical layout: x staged as fp32 (int4: split into even / odd features).
  RowdotJob j;
  j.w = w;
  j.M = M;
  j.out = o;
  j.x8 = nullptr;
  j.ldx8 = 0;
  const bool split = bits == 4;
  if (impl->rowdot_x8 && rowdot_x8_layout(w)) {
    j.ldx8 = ceil_div(K, 128) * 128;
    float* mem = (float*)tl_scratch.get(M * j.ldx8 * 4);
    stage_x8(impl, x2, sm, mem, j.ldx8);
    j.x8 = mem;
    j.xe = j.xo = nullptr;
    j.ldx = 0;
  } else if (!split && dt == kF32 && sm == nullptr) {
    j.xe = j.xo = x2.data_ptr<float>();
    j.ldx = x2.stride(0);
  } else {
    float* mem = (float*)tl_scratch.get(M * K * 4);
    stage_fp32(impl, x2, sm, mem, split, num_threads(M * K / 4096));
    j.xe = mem;
    j.xo = split ? mem + M * (K / 2) : mem;
    j.ldx = split ? K / 2 : K;
  }
  // Chunks of output channels, a few per thread (dynamic: the machine may be shared).
  const int nt_max = std::max(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(16, ceil_div(ceil_div(N, 4 * nt_max), 4) * 4);
  const int64_t nchunks = ceil_div(N, chunk);
  const int nt = num_threads(std::min<int64_t>(nchunks, ceil_div(M * N * K, 1 << 16)));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < nchunks; ++c) impl->rowdot(j, c * chunk, std::min(N, (c + 1) * chunk));
}

// ---------------------------------------------------------------------------------------------
// W8A8
// ---------------------------------------------------------------------------------------------

// out (M, N) = act(W8A8 product of x2 with an 8-bit per-channel weight (+ bias)) (reference.py's
// definition; act: qmm::Act).
// The SIMD paths need the prepacked (pw, colsum, zp, sw); the scalar path reads qweight.
void qmatmul_w8a8(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
                  const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& smooth, const std::optional<at::Tensor>& pw,
                  const std::optional<at::Tensor>& colsum, const std::optional<at::Tensor>& zp,
                  const std::optional<at::Tensor>& sw, const at::Tensor& out, int64_t act) {
  check_act(act);
  const QWeight w = check_weight(qweight, scales, zeros, 8);
  TORCH_CHECK(w.G == 1, "qmatmul (CPU): W8A8 needs per-channel weight scales, got G=", w.G);
  TORCH_CHECK(w.K <= 66000, "qmatmul (CPU): W8A8 accumulates in int32, K must be <= 66000, got ",
              w.K);
  check_x_out(x2, out, w.N, w.K);
  const float* b = vec_f32(bias, w.N, "bias");
  const float* sm = vec_f32(smooth, w.K, "smooth");
  const int64_t M = x2.size(0), N = w.N, K = w.K;
  if (M == 0 || N == 0) return;
  const QmmImpl* impl = select_impl();

  A8Job j;
  j.x = x2.data_ptr();
  j.ldx = x2.stride(0);
  j.x_dtype = dtype_code(x2);
  j.smooth = sm;
  j.M = M;
  j.K = K;
  j.N = N;
  j.w = w;
  j.symmetric = w.zeros == nullptr;
  j.out = make_out(out, b, act);
  j.p.Npad = ceil_div(N, kStrip) * kStrip;
  j.p.T = ceil_div(K, 4);
  if (impl != qmm_impl_scalar()) {
    TORCH_CHECK(pw.has_value() && colsum.has_value() && zp.has_value() && sw.has_value(),
                "qmatmul (CPU): the ", impl->name,
                " W8A8 kernel needs the prepacked weight "
                "(qmatmul_prepack_a8)");
    TORCH_CHECK(pw->scalar_type() == at::kByte && pw->is_contiguous() &&
                    pw->numel() == j.p.Npad * j.p.T * 4 && colsum->scalar_type() == at::kInt &&
                    colsum->numel() == j.p.Npad && zp->scalar_type() == at::kInt &&
                    zp->numel() == j.p.Npad && sw->scalar_type() == at::kFloat &&
                    sw->numel() == j.p.Npad && colsum->is_contiguous() && zp->is_contiguous() &&
                    sw->is_contiguous(),
                "qmatmul (CPU): prepacked W8A8 weight does not match qweight");
    j.p.w = pw->data_ptr<uint8_t>();
    j.p.colsum = colsum->data_ptr<int32_t>();
    j.p.zp = zp->data_ptr<int32_t>();
    j.p.sw = sw->data_ptr<float>();
  } else {
    j.p.w = nullptr;
    j.p.colsum = j.p.zp = nullptr;
    j.p.sw = nullptr;
  }

  const int64_t aq_bytes = align64(M * j.p.T * 4 * impl->a8_elem_bytes);
  char* mem = tl_scratch.get(aq_bytes + align64(M * 4) * 2);
  j.aq = (uint8_t*)mem;
  j.sx = (float*)(mem + aq_bytes);
  j.rowsum = (int32_t*)(mem + aq_bytes + align64(M * 4));

  const int64_t S = j.p.Npad / kStrip;
  int64_t mblocks = 0;
  const int64_t rows = rows_per_item(M, S, 96, impl->item_rows, &mblocks);
  const int64_t items = mblocks * S;
  const int nt = num_threads(std::max<int64_t>(1, std::min<int64_t>(items, M * N * K >> 16)));
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) impl->a8_quantize(j, m, m + 1);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t mb = it / S, st = it % S;
      impl->a8_item(j, mb * rows, std::min(M, (mb + 1) * rows), st);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dense fp32 weight (mmkernels.linear): the weight-only GEMM's fp32 micro-kernels reading the
// weight prepacked as their panels (GemmJob::dense); nothing decoded.
// ---------------------------------------------------------------------------------------------

// weight (N, K) float32, any strides -> (S, K, 64) float32, S = ceil(N / 64), padding channels 0.
at::Tensor linear_prepack(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2,
              "linear (CPU): weight must be a float32 (N, K) CPU tensor, got ",
              weight.scalar_type(), " ", weight.sizes(), " on ", weight.device());
  const int64_t N = weight.size(0), K = weight.size(1), S = ceil_div(N, kStrip);
  at::Tensor packed = at::zeros({S, K, kStrip}, weight.options());
  const float* w = weight.data_ptr<float>();
  const int64_t s0 = weight.stride(0), s1 = weight.stride(1);
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, S, 1, [&](int64_t a, int64_t b) {
    for (int64_t st = a; st < b; ++st)
      for (int64_t lane = 0; lane < kStrip && st * kStrip + lane < N; ++lane) {
        const float* row = w + (st * kStrip + lane) * s0;
        float* col = dst + st * K * kStrip + lane;
        for (int64_t k = 0; k < K; ++k) col[k * kStrip] = row[k * s1];
      }
  });
  return packed;
}

// out (M, N) = act(x2 (M, K) @ W.T (+ bias)), fp32, with W prepacked by linear_prepack. x2 / out:
// float32 with stride(1) == 1; bias float32 contiguous (N) or none; act an Act (qmatmul.h).
void linear_f32(const at::Tensor& x2, const at::Tensor& packed,
                const std::optional<at::Tensor>& bias, const at::Tensor& out, int64_t act) {
  check_act(act);
  TORCH_CHECK(x2.device().is_cpu() && x2.scalar_type() == at::kFloat && x2.dim() == 2 &&
                  (x2.size(1) <= 1 || x2.stride(1) == 1),
              "linear (CPU): x2 must be a float32 (M, K) CPU tensor with stride(1) == 1, got ",
              x2.scalar_type(), " ", x2.sizes(), " strides ", x2.strides());
  const int64_t M = x2.size(0), K = x2.size(1);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.dim() == 2 &&
                  out.size(0) == M && (out.size(1) <= 1 || out.stride(1) == 1),
              "linear (CPU): out must be a float32 (", M,
              ", N) CPU tensor with stride(1) == 1, got ", out.scalar_type(), " ", out.sizes(),
              " strides ", out.strides());
  const int64_t N = out.size(1), S = ceil_div(N, kStrip);
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kFloat &&
                  packed.is_contiguous() && packed.dim() == 3 && packed.size(0) == S &&
                  packed.size(1) == K && packed.size(2) == kStrip,
              "linear (CPU): packed must be linear_prepack's contiguous float32 (", S, ", ", K,
              ", ", kStrip, ") for N=", N, ", K=", K, ", got ", packed.scalar_type(), " ",
              packed.sizes());
  const float* b = vec_f32(bias, N, "bias");
  if (M == 0 || N == 0) return;
  const float* w = packed.data_ptr<float>();
  const float* x = x2.data_ptr<float>();
  const int64_t ldx = x2.stride(0);
  const Out o = make_out(out, b, act);
  if (K == 0) {  // the empty sum: act(bias), or act(0) (packed holds no data to point into)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) store_scalar(o, m, n, 0.f);
    return;
  }
  const QmmImpl* impl = select_impl();
  if (impl->gemm_item == nullptr) {
    // no GEMM kernel on this path (scalar): plain loops.
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = 0; n < N; ++n) {
          const float* col = w + (n / kStrip) * K * kStrip + n % kStrip;
          float acc = 0.f;
          for (int64_t k = 0; k < K; ++k) acc += x[m * ldx + k] * col[k * kStrip];
          store_scalar(o, m, n, acc);
        }
    });
    return;
  }
  GemmJob j;
  j.dense = w;
  j.p = WoPacked{};
  j.bits = 0;
  j.N = N;
  j.K = K;
  j.G = 1;
  j.gs = K;
  j.a = x;
  j.lda = ldx;
  j.a_dtype = kF32;
  j.M = M;
  j.out = o;
  const GemmSplit g = split_gemm(impl, j);
  run_gemm(impl, j, g, tl_scratch.get(g.per_thread * g.nt));
}

}  // namespace qmm
}  // namespace cpu
}  // namespace mmk

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) {
  m.impl("linear_prepack", &mmk::cpu::qmm::linear_prepack);
  m.impl("linear_f32", &mmk::cpu::qmm::linear_f32);
  m.impl("qmatmul_prepack_wo", &mmk::cpu::qmm::qmatmul_prepack_wo);
  m.impl("qmatmul_prepack_a8", &mmk::cpu::qmm::qmatmul_prepack_a8);
  m.impl("qmatmul_wo", &mmk::cpu::qmm::qmatmul_wo);
  m.impl("qmatmul_w8a8", &mmk::cpu::qmm::qmatmul_w8a8);
}
