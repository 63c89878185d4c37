// The schemas of the compiled ops of mmkernels._C, all in one place. Each family registers its CPU
// kernels beside its torch glue (csrc/cpu/<family>_torch.cpp, TORCH_LIBRARY_IMPL):
//   mmkernels_C::attention_fwd  fused attention forward (csrc/cpu/attention*.cpp), contract in
//                               docs/attention_kernel_contract.md; attention_any_nonfinite is the
//                               torch backend's NaN / inf pre-check (mmkernels/attention/sdpa.py)
//   mmkernels_C::reduce_*       token-reduction primitives (csrc/cpu/reduce*.cpp), semantics in
//                               mmkernels/reduce/reference.py
//   mmkernels_C::qmatmul_*      quantized matmul (csrc/cpu/qmatmul*.cpp): prepack_wo / prepack_a8
//                               build the cached weight layouts, wo / w8a8 run weight-only and W8A8
//                               products into out
//   mmkernels_C::linear_*       dense fp32 Linear on the same GEMM micro-kernels (mmkernels.linear,
//                               csrc/cpu/qmatmul_torch.cpp): linear_prepack lays the weight out as
//                               the kernels' panels, linear_f32 runs the product (+ bias, then
//                               an activation: qmm::Act) into out
//   mmkernels_C::*cpu_isa       name of the CPU code path each family uses now (MMKERNELS_CPU_ISA
//                               lowers it)
//   mmkernels_C::fma_peak_gflops  the machine's float32 FMA peak, measured (csrc/cpu/peak*.cpp)
//   mmkernels_C::dot_peak_gops    the bf16 / int8 peak of the path's AMX tiles or AVX-512 BF16 /
//   VNNI
//                               dot products, measured
//   mmkernels_C::cpu_features   what the CPUID probe found (csrc/cpu/cpu_features.cpp), one line
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#include "cpu/attention.h"
#include "cpu/cpu_features.h"
#include "cpu/peak.h"
#include "cpu/qmatmul.h"
#include "cpu/reduce.h"
#include "cpu/torch_entry_points.h"

namespace {

// A *_cpu_isa function of a family as an op: its path's name, or its error as a RuntimeError.
template <const char* (*Fn)(const char**)>
std::string isa_op() {
  const char* err = nullptr;
  const char* name = Fn(&err);
  TORCH_CHECK(err == nullptr, err ? err : "");
  return name;
}

// The machine's float32 FMA peak (GFLOP/s, all OpenMP threads) on the path MMKERNELS_CPU_ISA
// allows.
double fma_peak_op(int64_t iterations, int64_t repeats) {
  TORCH_CHECK(iterations > 0 && repeats > 0, "fma_peak_gflops: iterations and repeats must be > 0");
  const char* err = nullptr;
  const double gflops = mmk::cpu::peak::fma_peak_gflops(iterations, repeats, &err);
  TORCH_CHECK(err == nullptr, err ? err : "");
  return gflops;
}

// The bf16 (kind 0) / int8 (kind 1) peak (GOP/s, all OpenMP threads) of the path's AMX tiles or
// AVX-512 BF16 / VNNI dot products; an error on paths without them.
double dot_peak_op(int64_t kind, int64_t iterations, int64_t repeats) {
  TORCH_CHECK(kind == 0 || kind == 1, "dot_peak_gops: kind must be 0 (bf16) or 1 (int8)");
  TORCH_CHECK(iterations > 0 && repeats > 0, "dot_peak_gops: iterations and repeats must be > 0");
  const char* err = nullptr;
  const double gops = mmk::cpu::peak::dot_peak_gops((int)kind, iterations, repeats, &err);
  TORCH_CHECK(err == nullptr, err ? err : "");
  return gops;
}

// "avx2=yes avx512=yes avx512_bf16=yes avx512_vnni=yes avx512_fp16=no amx=no (why)": the probe's
// flags, for `mmkernels info` (avx512_fp16 is reported only; no kernel uses it).
std::string cpu_features_op() {
  const mmk::cpu::CpuFeatures& f = mmk::cpu::cpu_features();
  auto yn = [](bool b) { return b ? "yes" : "no"; };
  std::string s = std::string("avx2=") + yn(f.avx2) + " avx512=" + yn(f.avx512) +
                  " avx512_bf16=" + yn(f.avx512_bf16) + " avx512_vnni=" + yn(f.avx512_vnni) +
                  " avx512_fp16=" + yn(f.avx512_fp16) + " amx=" + yn(f.amx);
  if (!f.amx) s += std::string(" (") + f.amx_reason + ")";
  return s;
}

}  // namespace

TORCH_LIBRARY(mmkernels_C, m) {
  m.def(
      "attention_fwd(Tensor q4, Tensor k4, Tensor v4, Tensor? bias3, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale, "
      "int scores_mode, Tensor(a!) out4, Tensor(b!)? lse3, Tensor(c!)? scores2) -> ()");
  m.def("attention_any_nonfinite(Tensor[] tensors) -> bool");
  m.def("cpu_isa() -> str", &isa_op<mmk::cpu::attention_cpu_isa>);
  m.def(
      "reduce_tome_plan(Tensor metric, int r, int protect_first) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "reduce_tome_merge(Tensor x, Tensor src_to_out, int n_out, Tensor size) "
      "-> (Tensor, Tensor)");
  m.def("reduce_gather_rows(Tensor x, Tensor idx) -> Tensor");
  m.def("reduce_select_tokens(Tensor scores, int k, int protect_first) -> Tensor");
  m.def("reduce_cpu_isa() -> str", &isa_op<mmk::cpu::reduce::reduce_cpu_isa>);
  m.def(
      "qmatmul_prepack_wo(Tensor qweight, Tensor scales, Tensor? zeros, int bits) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "qmatmul_prepack_a8(Tensor qweight, Tensor scales, Tensor? zeros) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "qmatmul_wo(Tensor x2, Tensor qweight, Tensor scales, Tensor? zeros, int bits, "
      "Tensor? bias, Tensor? smooth, Tensor? pw, Tensor? psT, Tensor? pzT, Tensor(a!) out, "
      "int act) -> ()");
  m.def(
      "qmatmul_w8a8(Tensor x2, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, "
      "Tensor? smooth, Tensor? pw, Tensor? colsum, Tensor? zp, Tensor? sw, Tensor(a!) out, "
      "int act) -> ()");
  m.def("qmatmul_cpu_isa() -> str", &isa_op<mmk::cpu::qmm::qmatmul_cpu_isa>);
  m.def("linear_prepack(Tensor weight) -> Tensor");
  m.def("linear_f32(Tensor x2, Tensor packed, Tensor? bias, Tensor(a!) out, int act) -> ()");
  m.def("fma_peak_gflops(int iterations, int repeats) -> float", &fma_peak_op);
  m.def("dot_peak_gops(int kind, int iterations, int repeats) -> float", &dot_peak_op);
  m.def("cpu_features() -> str", &cpu_features_op);
}

// The hot kernels again, bound directly (csrc/cpu/torch_entry_points.h), the GIL released while
// they run as the ops' binding does; a failed TORCH_CHECK raises RuntimeError with the same
// message. The Python glue (mmkernels._extension: Extension.kernel) calls these; tests and
// torch.compile graphs call the ops.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using released = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("attention_fwd", &mmk::cpu::attention_fwd_cpu, released());
  m.def("qmatmul_wo", &mmk::cpu::qmm::qmatmul_wo, released());
  m.def("qmatmul_w8a8", &mmk::cpu::qmm::qmatmul_w8a8, released());
  m.def("linear_f32", &mmk::cpu::qmm::linear_f32, released());
}
