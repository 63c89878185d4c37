// Token-reduction primitives on the CPU, torch glue: argument checks, OpenMP work split, the
// selection and index-map logic around the kernels of the selected path (reduce.h); registered as
// mmkernels_C::reduce_* (schemas in csrc/ops.cpp). Semantics: mmkernels/reduce/reference.py.
//
// Exactness: selections compare unique 64-bit keys (score bits mapped to an unsigned order, then
// the complemented index), so "descending, ties to the lower index" is a plain max; the chosen set
// is found with nth_element and read back in index order (ascending output without a sort).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/reduce.h"

namespace mmk {
namespace cpu {
namespace reduce {
namespace {

using at::Tensor;

const ReduceImpl* impl() {
  const char* err = nullptr;
  const ReduceImpl* k = reduce_impl(&err);
  TORCH_CHECK(err == nullptr, err ? err : "");
  return k;
}

// ---- helpers ---------------------------------------------------------------------------------

int threads() { return std::max(1, at::get_num_threads()); }

// Order-preserving map of a float to uint32 (NaN largest, -0 == +0), as torch.sort orders values.
inline uint32_t fkey(float f) {
  if (f != f) return 0xffffffffu;
  f += 0.0f;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u >> 31) ? ~u : (u | 0x80000000u);
}
inline uint64_t dkey(double f) {
  if (f != f) return ~0ull;
  f += 0.0;
  uint64_t u;
  std::memcpy(&u, &f, 8);
  return (u >> 63) ? ~u : (u | (1ull << 63));
}

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:    return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf:     return kF16;
    default:            return -1;
  }
}

void check_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, " (CPU): ", name, " must be on the CPU, got ", t.device());
}

// ---- tome_plan -------------------------------------------------------------------------------

struct PlanScratch {
  std::vector<float> a, brows, bp, best;  // brows: normalised B rows, before packing into bp
  std::vector<int32_t> arg;
  std::vector<uint64_t> keys, sel;
  std::vector<uint8_t> merged;
};

struct PlanGeom {
  int64_t n, c, pf, r, a_start, b_start, na, nb, na_pad, nbt;  // nbt: B tiles of kTile tokens
};

// Buffers of one batch row: A rows, B rows and packed B tiles sized, the A padding (rows past
// na) zeroed; the token rows are written by plan_prepare_rows, the tiles (zero lanes past nb
// included) by plan_pack_tiles.
void plan_alloc(const PlanGeom& g, PlanScratch& s) {
  const int64_t c = g.c;
  s.a.resize(g.na_pad * c);
  std::fill(s.a.begin() + g.na * c, s.a.end(), 0.f);
  s.brows.resize(g.nb * c);
  s.bp.resize(g.nbt * kTile * c);
  s.best.resize(g.na_pad);
  s.arg.resize(g.na_pad);
}

thread_local std::vector<float> tl_row;

// Normalise metric rows [p0, p1) (within [pf, n)) of one batch row into A rows and packed B tiles
// (fp32, x / max(||x||, 1e-12): the kernel's normalize_row).
template <typename T>
void plan_prepare_rows(const T* m, int64_t sn, int64_t sc, const PlanGeom& g, PlanScratch& s,
                       const ReduceImpl* k, int64_t p0, int64_t p1) {
  const int64_t c = g.c;
  tl_row.resize(c);
  float* v = tl_row.data();
  for (int64_t p = p0; p < p1; ++p) {
    const T* row = m + p * sn;
    const float* src = v;
    if constexpr (std::is_same<T, float>::value) {
      if (sc == 1)
        src = row;
      else
        for (int64_t q = 0; q < c; ++q) v[q] = row[q * sc];
    } else {
      for (int64_t q = 0; q < c; ++q) v[q] = to_f(row[q * sc]);
    }
    if (((p - g.pf) & 1) == ((g.a_start - g.pf) & 1)) {
      k->normalize_row(src, c, s.a.data() + ((p - g.a_start) >> 1) * c, 1);
    } else {
      k->normalize_row(src, c, s.brows.data() + ((p - g.b_start) >> 1) * c, 1);
    }
  }
}

// B tiles [t0, t1) from the normalised B rows (reduce.h's layout; the path's transpose when it
// has one). Row-major rows first, then a transpose: writing each row straight into its tile
// lane took 16 scalar stores per 16 channels.
void plan_pack_tiles(const PlanGeom& g, PlanScratch& s, const ReduceImpl* k, int64_t t0,
                     int64_t t1) {
  const int64_t c = g.c;
  if (k->pack_b_tiles != nullptr) {
    k->pack_b_tiles(s.brows.data(), c, g.nb, t0, t1, s.bp.data());
    return;
  }
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t q = 0; q < c; ++q)
      for (int l = 0; l < kTile; ++l) {
        const int64_t j = t * kTile + l;
        s.bp[(t * c + q) * kTile + l] = j < g.nb ? s.brows[j * c + q] : 0.f;
      }
}

// Choose the r best A tokens, write the four maps of one batch row.
void plan_finish(const PlanGeom& g, PlanScratch& s, int64_t* s2o, int64_t* keep, int64_t* src,
                 int64_t* dst) {
  const int64_t n = g.n, r = g.r;
  s.merged.assign(n, 0);
  if (r > 0) {
    s.keys.resize(g.na);
    for (int64_t i = 0; i < g.na; ++i)
      s.keys[i] = ((uint64_t)fkey(s.best[i]) << 32) | (uint64_t)(0xffffffffu - (uint32_t)i);
    uint64_t thr = 0;
    if (r < g.na) {
      s.sel.assign(s.keys.begin(), s.keys.end());
      std::nth_element(s.sel.begin(), s.sel.begin() + (r - 1), s.sel.end(),
                       std::greater<uint64_t>());
      thr = s.sel[r - 1];
    }
    int64_t q = 0;
    for (int64_t i = 0; i < g.na; ++i) {
      if (s.keys[i] >= thr) {
        const int64_t pa = g.a_start + 2 * i;
        s.merged[pa] = 1;
        src[q] = pa;
        dst[q] = g.b_start + 2 * (int64_t)s.arg[i];
        ++q;
      }
    }
  }
  int64_t slot = 0;
  for (int64_t p = 0; p < n; ++p) {
    if (!s.merged[p]) {
      keep[slot] = p;
      s2o[p] = slot++;
    }
  }
  for (int64_t q = 0; q < r; ++q) s2o[src[q]] = s2o[dst[q]];
}

thread_local PlanScratch tl_plan;

// (src_to_out (B,N), keep_idx (B,N-r), src_idx (B,r), dst_idx (B,r)), int64. metric float32,
// bfloat16 or float16, any strides.
std::tuple<Tensor, Tensor, Tensor, Tensor> reduce_tome_plan(const Tensor& metric, int64_t r,
                                                            int64_t protect_first) {
  constexpr const char* op = "reduce_tome_plan";
  check_cpu(metric, op, "metric");
  TORCH_CHECK(metric.dim() == 3, op, ": metric must be 3-D (B, N, C), got ", metric.sizes());
  const int dt = dtype_code(metric.scalar_type());
  TORCH_CHECK(dt >= 0, op, ": metric must be float32, bfloat16 or float16, got ",
              metric.scalar_type(), " (float64 is served by the reference)");
  const int64_t B = metric.size(0), n = metric.size(1), c = metric.size(2);
  TORCH_CHECK(protect_first >= 0 && protect_first <= n, op, ": protect_first=", protect_first,
              " must be in [0, ", n, "]");
  PlanGeom g;
  g.n = n;
  g.c = c;
  g.pf = protect_first;
  g.r = r;
  g.a_start = protect_first + (protect_first & 1);
  g.b_start = protect_first + 1 - (protect_first & 1);
  g.na = g.a_start < n ? (n - g.a_start + 1) / 2 : 0;
  g.nb = g.b_start < n ? (n - g.b_start + 1) / 2 : 0;
  g.na_pad = (g.na + kRowBlock - 1) / kRowBlock * kRowBlock;
  g.nbt = (g.nb + kTile - 1) / kTile;
  const int64_t limit = g.nb > 0 ? g.na : 0;
  TORCH_CHECK(r >= 0 && r <= limit, op, ": r=", r, " must be in [0, ", limit, "]");
  TORCH_CHECK(c > 0 || r == 0, op, ": metric has no channels");
  TORCH_CHECK(g.na < (int64_t)0xffffffffLL, op, ": too many tokens");

  const auto opts = metric.options().dtype(at::kLong);
  Tensor s2o = at::empty({B, n}, opts), keep = at::empty({B, n - r}, opts),
         src = at::empty({B, r}, opts), dst = at::empty({B, r}, opts);
  int64_t* ps2o = s2o.data_ptr<int64_t>();
  int64_t* pkeep = keep.data_ptr<int64_t>();
  int64_t* psrc = src.data_ptr<int64_t>();
  int64_t* pdst = dst.data_ptr<int64_t>();
  const ReduceImpl* k = impl();
  const int64_t sb = metric.stride(0), sn = metric.stride(1), sc = metric.stride(2);
  const bool compute = r > 0;

  auto prepare = [&](PlanScratch& s, int64_t b, int64_t p0, int64_t p1) {
    switch (dt) {
      case kF32:
        plan_prepare_rows(metric.data_ptr<float>() + b * sb, sn, sc, g, s, k, p0, p1);
        break;
      case kBF16:
        plan_prepare_rows(metric.data_ptr<c10::BFloat16>() + b * sb, sn, sc, g, s, k, p0, p1);
        break;
      default:
        plan_prepare_rows(metric.data_ptr<c10::Half>() + b * sb, sn, sc, g, s, k, p0, p1);
        break;
    }
  };
  auto run_row = [&](int64_t b, PlanScratch& s, bool inner_parallel, int nt) {
    if (compute) {
      plan_alloc(g, s);
      if (inner_parallel) {
        // one region: the threads normalise a share of the rows each, then split the A blocks
        const int64_t blocks = g.na_pad / kRowBlock;
#pragma omp parallel num_threads(nt)
        {
          const int64_t T = omp_get_num_threads(), id = omp_get_thread_num();
          const int64_t rows = n - g.pf;
          prepare(s, b, g.pf + rows * id / T, g.pf + rows * (id + 1) / T);
#pragma omp barrier
          plan_pack_tiles(g, s, k, g.nbt * id / T, g.nbt * (id + 1) / T);
#pragma omp barrier
#pragma omp for schedule(static)
          for (int64_t ib = 0; ib < blocks; ++ib)
            k->sim_argmax(s.a.data(), c, ib * kRowBlock, (ib + 1) * kRowBlock, s.bp.data(), g.nb,
                          s.best.data(), s.arg.data());
        }
      } else {
        prepare(s, b, g.pf, n);
        plan_pack_tiles(g, s, k, 0, g.nbt);
        k->sim_argmax(s.a.data(), c, 0, g.na_pad, s.bp.data(), g.nb, s.best.data(), s.arg.data());
      }
    }
    plan_finish(g, s, ps2o + b * n, pkeep + b * (n - r), psrc + b * r, pdst + b * r);
  };

  // Parallel regions only for work worth ~0.1 ms or more: on a loaded machine entering one can
  // wait for a descheduled worker for milliseconds, which would dominate small (batch-1) calls.
  const int nt = threads();
  const double work = compute ? (double)g.na * g.nb * c : 0.0;  // FMAs per row
  if (B >= 2 && nt > 1 && work * B > 5.0e6) {
    const int use = (int)std::min<int64_t>(nt, B);
#pragma omp parallel num_threads(use)
    {
      PlanScratch& s = tl_plan;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) run_row(b, s, false, 1);
    }
  } else {
    const bool inner = nt > 1 && work > 1.5e7 && g.na_pad / kRowBlock >= 2;
    for (int64_t b = 0; b < B; ++b) run_row(b, tl_plan, inner, nt);
  }
  return {s2o, keep, src, dst};
}

// ---- tome_merge ------------------------------------------------------------------------------

struct MergeScratch {
  std::vector<float> w, wsum;
  std::vector<int32_t> off, list;
};
thread_local MergeScratch tl_merge;

template <typename S>
void load_weights(const S* p, int64_t B, int64_t n, int64_t sb, int64_t sn, float* w) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i) w[b * n + i] = static_cast<float>(p[b * sb + i * sn]);
}
template <typename S>
void store_sizes(const float* v, int64_t count, S* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<S>(v[i]);
}
// (x_out (B,n_out,C) in x.dtype, size_out (B,n_out) in size.dtype). x float32/bfloat16/float16
// with stride(-1) == 1; src_to_out int64 (B,N); size floating (B,N), any strides.
std::tuple<Tensor, Tensor> reduce_tome_merge(const Tensor& x, const Tensor& src_to_out,
                                             int64_t n_out, const Tensor& size) {
  constexpr const char* op = "reduce_tome_merge";
  check_cpu(x, op, "x");
  check_cpu(src_to_out, op, "src_to_out");
  check_cpu(size, op, "size");
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D (B, N, C), got ", x.sizes());
  const int dt = dtype_code(x.scalar_type());
  TORCH_CHECK(dt >= 0, op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t B = x.size(0), n = x.size(1), c = x.size(2);
  TORCH_CHECK(c <= 1 || x.stride(2) == 1, op, ": x must have stride(-1) == 1, got ", x.strides());
  TORCH_CHECK(src_to_out.scalar_type() == at::kLong && src_to_out.dim() == 2 &&
                  src_to_out.size(0) == B && src_to_out.size(1) == n,
              op, ": src_to_out must be int64 (", B, ", ", n, "), got ", src_to_out.scalar_type(),
              " ", src_to_out.sizes());
  TORCH_CHECK(size.dim() == 2 && size.size(0) == B && size.size(1) == n &&
                  at::isFloatingType(size.scalar_type()),
              op, ": size must be floating (", B, ", ", n, "), got ", size.scalar_type(), " ",
              size.sizes());
  TORCH_CHECK(n_out >= 0 && n_out <= n, op, ": n_out=", n_out, " must be in [0, ", n, "]");
  TORCH_CHECK(n < (int64_t)INT32_MAX, op, ": too many tokens");

  Tensor out = at::empty({B, n_out, c}, x.options());
  Tensor size_out = at::empty({B, n_out}, size.options());
  MergeScratch& s = tl_merge;
  s.w.resize(B * n);
  s.wsum.assign(B * n_out, 0.f);
  s.off.assign(B * (n_out + 1), 0);
  s.list.resize(B * n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, size.scalar_type(), "merge_w", [&] {
    load_weights(size.data_ptr<scalar_t>(), B, n, size.stride(0), size.stride(1), s.w.data());
  });
  const int64_t* s2o = src_to_out.data_ptr<int64_t>();
  const int64_t ss0 = src_to_out.stride(0), ss1 = src_to_out.stride(1);
  for (int64_t b = 0; b < B; ++b) {
    int32_t* off = s.off.data() + b * (n_out + 1);
    float* wsum = s.wsum.data() + b * n_out;
    const float* w = s.w.data() + b * n;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = s2o[b * ss0 + i * ss1];
      TORCH_CHECK(t >= 0 && t < n_out, op, ": src_to_out[", b, ", ", i, "] = ", t,
                  " is outside [0, ", n_out, ")");
      off[t + 1]++;
      wsum[t] += w[i];
    }
    for (int64_t t = 0; t < n_out; ++t) off[t + 1] += off[t];
    int32_t* list = s.list.data() + b * n;
    // fill in token order (the counters are restored afterwards)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = s2o[b * ss0 + i * ss1];
      list[off[t]++] = (int32_t)i;
    }
    for (int64_t t = n_out; t > 0; --t) off[t] = off[t - 1];
    off[0] = 0;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, size.scalar_type(), "merge_s", [&] {
    store_sizes(s.wsum.data(), B * n_out, size_out.data_ptr<scalar_t>());
  });
  if (n_out == 0 || c == 0 || B == 0) return {out, size_out};

  const ReduceImpl* k = impl();
  const int64_t esz = x.element_size();
  const char* xb = static_cast<const char*>(x.data_ptr());
  char* ob = static_cast<char*>(out.data_ptr());
  const int64_t sxb = x.stride(0), sxn = x.stride(1);
  auto row = [&](int64_t b) {
    MergeRow p;
    p.x = xb + b * sxb * esz;
    p.sxn = sxn;
    p.out = ob + b * n_out * c * esz;
    p.C = c;
    p.dtype = dt;
    p.off = s.off.data() + b * (n_out + 1);
    p.list = s.list.data() + b * n;
    p.w = s.w.data() + b * n;
    p.wsum = s.wsum.data() + b * n_out;
    return p;
  };
  const int nt = threads();
  const double bytes = (double)B * n * c * esz;
  if (nt == 1 || bytes < 4.0e6) {
    for (int64_t b = 0; b < B; ++b) k->merge_slots(row(b), 0, n_out);
  } else {
    const int64_t cpr = std::min<int64_t>(n_out, std::max<int64_t>(1, (4 * nt + B - 1) / B));
    const int64_t items = B * cpr;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / cpr, q = it % cpr;
      k->merge_slots(row(b), q * n_out / cpr, (q + 1) * n_out / cpr);
    }
  }
  return {out, size_out};
}

// ---- gather rows -----------------------------------------------------------------------------

// out[b, j] = x[b, idx[b, j]] (rows copied as bytes: any dtype). x needs stride(-1) == 1.
Tensor reduce_gather_rows(const Tensor& x, const Tensor& idx) {
  constexpr const char* op = "reduce_gather_rows";
  check_cpu(x, op, "x");
  check_cpu(idx, op, "idx");
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D (B, N, C), got ", x.sizes());
  const int64_t B = x.size(0), n = x.size(1), c = x.size(2);
  TORCH_CHECK(c <= 1 || x.stride(2) == 1, op, ": x must have stride(-1) == 1, got ", x.strides());
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == B, op,
              ": idx must be int64 (", B, ", k), got ", idx.scalar_type(), " ", idx.sizes());
  const int64_t kk = idx.size(1);
  Tensor out = at::empty({B, kk, c}, x.options());
  if (B == 0 || kk == 0 || c == 0) return out;
  const int64_t esz = x.element_size(), row_bytes = c * esz;
  const char* xb = static_cast<const char*>(x.data_ptr());
  char* ob = static_cast<char*>(out.data_ptr());
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t si0 = idx.stride(0), si1 = idx.stride(1);
  const int64_t sxb = x.stride(0) * esz, sxn = x.stride(1) * esz;
  std::atomic<bool> any_bad{false};
  std::atomic<int64_t> bad{0};
  auto copy = [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      const int64_t b = q / kk, j = q % kk;
      const int64_t t = ip[b * si0 + j * si1];
      if (t < 0 || t >= n) {
        bad.store(t);
        any_bad.store(true);
        continue;
      }
      std::memcpy(ob + q * row_bytes, xb + b * sxb + t * sxn, row_bytes);
    }
  };
  const int64_t rows = B * kk;
  const int nt = threads();
  if (nt == 1 || (double)rows * row_bytes < 4.0e6) {
    copy(0, rows);
  } else {
#pragma omp parallel num_threads(nt)
    {
      const int64_t T = omp_get_num_threads(), id = omp_get_thread_num();
      copy(rows * id / T, rows * (id + 1) / T);
    }
  }
  TORCH_CHECK(!any_bad.load(), op, ": idx value ", bad.load(), " is outside [0, ", n, ")");
  return out;
}

// ---- select_tokens ---------------------------------------------------------------------------

template <typename K>
struct SelectScratch {
  std::vector<K> keys, sel;
};

template <typename T, typename K>
void select_row(const T* sc, int64_t ssn, int64_t n, int64_t k, int64_t pf, int64_t* out,
                SelectScratch<K>& s) {
  for (int64_t i = 0; i < pf; ++i) out[i] = i;
  const int64_t m = k - pf, rest = n - pf;
  if (m == 0) return;
  if (m == rest) {
    for (int64_t i = pf; i < n; ++i) out[i] = i;
    return;
  }
  s.keys.resize(rest);
  for (int64_t i = 0; i < rest; ++i) {
    const int64_t p = pf + i;
    K key;
    if constexpr (sizeof(K) == 8)
      key = ((uint64_t)fkey(static_cast<float>(sc[p * ssn])) << 32) |
            (uint64_t)(0xffffffffu - (uint32_t)p);
    else
      key = ((K)dkey(static_cast<double>(sc[p * ssn])) << 32) | (K)(0xffffffffu - (uint32_t)p);
    s.keys[i] = key;
  }
  s.sel.assign(s.keys.begin(), s.keys.end());
  std::nth_element(s.sel.begin(), s.sel.begin() + (m - 1), s.sel.end(), std::greater<K>());
  const K thr = s.sel[m - 1];
  int64_t q = pf;
  for (int64_t i = 0; i < rest; ++i)
    if (s.keys[i] >= thr) out[q++] = pf + i;
}

thread_local SelectScratch<uint64_t> tl_sel64;
thread_local SelectScratch<unsigned __int128> tl_sel128;
// (B,k) int64 ascending: the first protect_first indices + the best k - protect_first of the
// rest (descending score, ties to the lower index). scores float32/bfloat16/float16/float64.
Tensor reduce_select_tokens(const Tensor& scores, int64_t k, int64_t protect_first) {
  constexpr const char* op = "reduce_select_tokens";
  check_cpu(scores, op, "scores");
  TORCH_CHECK(scores.dim() == 2, op, ": scores must be 2-D (B, N), got ", scores.sizes());
  const auto st = scores.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble, op,
              ": scores must be float32, bfloat16, float16 or float64, got ", st);
  const int64_t B = scores.size(0), n = scores.size(1);
  TORCH_CHECK(protect_first >= 0 && protect_first <= k && k <= n, op, ": need 0 <= protect_first (",
              protect_first, ") <= k (", k, ") <= N (", n, ")");
  TORCH_CHECK(n < (int64_t)0xffffffffLL, op, ": too many tokens");
  Tensor out = at::empty({B, k}, scores.options().dtype(at::kLong));
  int64_t* po = out.data_ptr<int64_t>();
  const int64_t sb = scores.stride(0), sn = scores.stride(1);
  auto run = [&](int64_t b0, int64_t b1) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "select", [&] {
      const scalar_t* p = scores.data_ptr<scalar_t>();
      for (int64_t b = b0; b < b1; ++b) {
        if constexpr (std::is_same<scalar_t, double>::value)
          select_row(p + b * sb, sn, n, k, protect_first, po + b * k, tl_sel128);
        else
          select_row(p + b * sb, sn, n, k, protect_first, po + b * k, tl_sel64);
      }
    });
  };
  const int nt = threads();
  if (nt == 1 || B < 2 || (double)B * n < 2.0e5) {
    run(0, B);
  } else {
#pragma omp parallel num_threads(nt)
    {
      const int64_t T = omp_get_num_threads(), id = omp_get_thread_num();
      run(B * id / T, B * (id + 1) / T);
    }
  }
  return out;
}

}  // namespace
}  // namespace reduce
}  // namespace cpu
}  // namespace mmk

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) {
  m.impl("reduce_tome_plan", &mmk::cpu::reduce::reduce_tome_plan);
  m.impl("reduce_tome_merge", &mmk::cpu::reduce::reduce_tome_merge);
  m.impl("reduce_gather_rows", &mmk::cpu::reduce::reduce_gather_rows);
  m.impl("reduce_select_tokens", &mmk::cpu::reduce::reduce_select_tokens);
}
