// Fused attention forward on the CPU, torch glue: checks the tensors of
// mmkernels_C::attention_fwd (schema in csrc/ops.cpp), fills AttnParams and runs the driver
// (attention.cpp). Contract: docs/attention_kernel_contract.md.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>

#include "cpu/attention.h"
#include "cpu/torch_entry_points.h"

namespace mmk {
namespace cpu {
namespace {

using at::Tensor;

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "attention_fwd (CPU): ", name, " must be on the CPU, got ",
              t.device());
}

void check_last_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "attention_fwd (CPU): ", name,
              " must have stride(-1) == 1, got strides ", t.strides(),
              " (the Python glue makes such inputs contiguous)");
}

}  // namespace

void attention_fwd_cpu(const Tensor& q4, const Tensor& k4, const Tensor& v4,
                       const std::optional<Tensor>& bias3,
                       const std::optional<Tensor>& cu_seqlens_q,
                       const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                       int64_t max_seqlen_k, bool causal, double scale, int64_t scores_mode,
                       const Tensor& out4, const std::optional<Tensor>& lse3,
                       const std::optional<Tensor>& scores2) {
  TORCH_CHECK(q4.dim() == 4 && k4.dim() == 4 && v4.dim() == 4 && out4.dim() == 4,
              "attention_fwd (CPU): q4, k4, v4, out4 must be 4-D, got ", q4.sizes(), ", ",
              k4.sizes(), ", ", v4.sizes(), ", ", out4.sizes());
  check_cpu(q4, "q4");
  check_cpu(k4, "k4");
  check_cpu(v4, "v4");
  check_cpu(out4, "out4");
  const auto dt = q4.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "attention_fwd (CPU): q4 must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k4.scalar_type() == dt && v4.scalar_type() == dt && out4.scalar_type() == dt,
              "attention_fwd (CPU): q4, k4, v4 and out4 must share one dtype, got ", dt, ", ",
              k4.scalar_type(), ", ", v4.scalar_type(), ", ", out4.scalar_type());
  check_last_contiguous(q4, "q4");
  check_last_contiguous(k4, "k4");
  check_last_contiguous(v4, "v4");
  check_last_contiguous(out4, "out4");

  const int64_t Bq = q4.size(0), Hq = q4.size(1), Sq = q4.size(2), D = q4.size(3);
  const int64_t Bk = k4.size(0), Hkv = k4.size(1), Sk = k4.size(2);
  const int64_t Dv = v4.size(3);
  TORCH_CHECK(k4.size(3) == D, "attention_fwd (CPU): k4 head dim ", k4.size(3), " != q4 head dim ",
              D);
  TORCH_CHECK(v4.size(0) == Bk && v4.size(1) == Hkv && v4.size(2) == Sk, "attention_fwd (CPU): v4 ",
              v4.sizes(), " does not match k4 ", k4.sizes(), " in (B, Hkv, Sk)");
  TORCH_CHECK(D % 8 == 0 && D >= 8 && D <= 256 && Dv % 8 == 0 && Dv >= 8 && Dv <= 256,
              "attention_fwd (CPU): head dims must be multiples of 8 in [8, 256], got D=", D,
              ", Dv=", Dv);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "attention_fwd (CPU): Hq (", Hq,
              ") must be a multiple of Hkv (", Hkv, ")");
  TORCH_CHECK(out4.size(0) == Bq && out4.size(1) == Hq && out4.size(2) == Sq && out4.size(3) == Dv,
              "attention_fwd (CPU): out4 must be ", at::IntArrayRef({Bq, Hq, Sq, Dv}), ", got ",
              out4.sizes());
  TORCH_CHECK(scores_mode >= 0 && scores_mode <= 3,
              "attention_fwd (CPU): scores_mode must be 0..3, got ", scores_mode);
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0,
              "attention_fwd (CPU): max_seqlen_q/k must be >= 0");

  const bool varlen = cu_seqlens_q.has_value();
  TORCH_CHECK(varlen == cu_seqlens_k.has_value(),
              "attention_fwd (CPU): cu_seqlens_q and cu_seqlens_k must both be given or both None");
  int64_t nseq = Bq;
  if (varlen) {
    const Tensor& cq = *cu_seqlens_q;
    const Tensor& ck = *cu_seqlens_k;
    for (const Tensor* c : {&cq, &ck}) {
      check_cpu(*c, "cu_seqlens");
      TORCH_CHECK(
          c->scalar_type() == at::kInt && c->dim() == 1 && c->is_contiguous() && c->numel() >= 1,
          "attention_fwd (CPU): cu_seqlens must be contiguous 1-D int32 with B+1 entries, "
          "got ",
          c->scalar_type(), " ", c->sizes());
    }
    TORCH_CHECK(cq.numel() == ck.numel(), "attention_fwd (CPU): cu_seqlens_q has ", cq.numel(),
                " entries, cu_seqlens_k ", ck.numel());
    TORCH_CHECK(Bq == 1 && Bk == 1, "attention_fwd (CPU): varlen mode needs q4/k4 batch 1, got ",
                Bq, " and ", Bk);
    nseq = cq.numel() - 1;
  } else {
    TORCH_CHECK(Bq == Bk, "attention_fwd (CPU): q4 batch ", Bq, " != k4 batch ", Bk);
  }
  const int64_t Bout = Bq;

  AttnParams p;
  p.dtype = dt == at::kFloat ? kF32 : dt == at::kHalf ? kF16 : kBF16;
  p.q = q4.data_ptr();
  p.k = k4.data_ptr();
  p.v = v4.data_ptr();
  p.out = out4.data_ptr();
  p.q_sb = q4.stride(0);
  p.q_sh = q4.stride(1);
  p.q_ss = q4.stride(2);
  p.k_sb = k4.stride(0);
  p.k_sh = k4.stride(1);
  p.k_ss = k4.stride(2);
  p.v_sb = v4.stride(0);
  p.v_sh = v4.stride(1);
  p.v_ss = v4.stride(2);
  p.o_sb = out4.stride(0);
  p.o_sh = out4.stride(1);
  p.o_ss = out4.stride(2);

  if (bias3.has_value()) {
    const Tensor& b = *bias3;
    check_cpu(b, "bias3");
    TORCH_CHECK(b.scalar_type() == at::kFloat, "attention_fwd (CPU): bias3 must be float32, got ",
                b.scalar_type());
    TORCH_CHECK(
        b.dim() == 3 && b.size(1) == Hq && b.size(2) == Sk && (b.size(0) == Bk || b.size(0) == 1),
        "attention_fwd (CPU): bias3 must be (", Bk, " or 1, ", Hq, ", ", Sk, "), got ", b.sizes());
    check_last_contiguous(b, "bias3");
    p.bias = b.data_ptr<float>();
    p.bias_sb = b.size(0) == 1 ? 0 : b.stride(0);
    p.bias_sh = b.stride(1);
  }
  if (lse3.has_value()) {
    const Tensor& l = *lse3;
    check_cpu(l, "lse3");
    TORCH_CHECK(l.scalar_type() == at::kFloat && l.dim() == 3 && l.size(0) == Bout &&
                    l.size(1) == Hq && l.size(2) == Sq,
                "attention_fwd (CPU): lse3 must be float32 (", Bout, ", ", Hq, ", ", Sq, "), got ",
                l.scalar_type(), " ", l.sizes());
    p.lse = l.data_ptr<float>();
    p.lse_sb = l.stride(0);
    p.lse_sh = l.stride(1);
    p.lse_ss = l.stride(2);
  }
  if (scores_mode != 0) {
    TORCH_CHECK(scores2.has_value(), "attention_fwd (CPU): scores_mode ", scores_mode,
                " needs scores2");
    const Tensor& s = *scores2;
    check_cpu(s, "scores2");
    TORCH_CHECK(
        s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(0) == Bout && s.size(1) == Sk,
        "attention_fwd (CPU): scores2 must be float32 (", Bout, ", ", Sk, "), got ",
        s.scalar_type(), " ", s.sizes());
    p.scores = s.data_ptr<float>();
    p.sc_sb = s.stride(0);
    p.sc_ss = s.stride(1);
  }
  if (varlen) {
    p.cu_q = cu_seqlens_q->data_ptr<int32_t>();
    p.cu_k = cu_seqlens_k->data_ptr<int32_t>();
  }
  p.nseq = nseq;
  p.Sq = Sq;
  p.Sk = Sk;
  p.Hq = (int)Hq;
  p.Hkv = (int)Hkv;
  p.D = (int)D;
  p.Dv = (int)Dv;
  p.causal = causal;
  p.scale = (float)scale;
  p.scores_mode = (int)scores_mode;
  p.nthreads = at::get_num_threads();

  const char* err = attention_forward_cpu(p);
  TORCH_CHECK(err == nullptr, "attention_fwd (CPU): ", err ? err : "");
}

namespace {

// Whether any of the tensors holds a NaN or +-inf (the torch backend's pre-check: one pass over
// each tensor's elements in place, whatever its strides).
bool attention_any_nonfinite_cpu(at::TensorList tensors) {
  for (size_t t = 0; t < tensors.size(); ++t) {
    const Tensor& x = tensors[t];
    check_cpu(x, "tensors");
    const auto dt = x.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                "attention_any_nonfinite (CPU): tensors[", t,
                "] must be float32, bfloat16 or float16, got ", dt);
    TORCH_CHECK(x.dim() <= 8, "attention_any_nonfinite (CPU): tensors[", t,
                "] must have at most 8 dims, got ", x.dim());
    bool found = false;
    const char* err = attention_any_nonfinite(x.data_ptr(),
                                              dt == at::kFloat  ? kF32
                                              : dt == at::kHalf ? kF16
                                                                : kBF16,
                                              (int)x.dim(), x.sizes().data(), x.strides().data(),
                                              at::get_num_threads(), &found);
    TORCH_CHECK(err == nullptr, "attention_any_nonfinite (CPU): ", err ? err : "");
    if (found) return true;
  }
  return false;
}

}  // namespace
}  // namespace cpu
}  // namespace mmk

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) {
  m.impl("attention_fwd", &mmk::cpu::attention_fwd_cpu);
  m.impl("attention_any_nonfinite", &mmk::cpu::attention_any_nonfinite_cpu);
}
