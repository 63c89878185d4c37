// CPU attention driver (baseline flags, no torch headers): picks the ISA path, splits the work,
// packs K/V once per (sequence, kv head), runs the items in one OpenMP region and reduces the
// scores partial rows in a fixed order (deterministic for any thread count or schedule).
#include "cpu/attention.h"

#include <omp.h>

#include <sched.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <algorithm>
#include <utility>
#include <mutex>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/fp16.h"

namespace mmk {
namespace cpu {

namespace {

int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up64(int64_t a, int64_t b) { return ceil_div64(a, b) * b; }

const AttnImpl* impl_for(Isa isa, int dtype) {
  switch (isa) {
    case Isa::AmxEmulated:
    case Isa::Amx:         {
      // AMX tiles serve bf16; every other dtype runs the AVX-512 kernels.
      const AttnImpl* amx = isa == Isa::Amx ? attn_impl_amx(dtype) : attn_impl_amx_emulated(dtype);
      return amx ? amx : attn_impl_avx512(dtype, true);
    }
    case Isa::Avx512Bf16: return attn_impl_avx512(dtype, true);
    case Isa::Avx512:     return attn_impl_avx512(dtype, false);
    case Isa::Avx2:       return attn_impl_avx2(dtype);
    default:              return attn_impl_scalar(dtype);
  }
}

void* alloc64(size_t bytes) {
  if (bytes == 0) bytes = 64;
  return std::aligned_alloc(64, round_up64((int64_t)bytes, 64));
}

// One reusable arena for packed K/V, scores partials and per-thread scratch. Fresh large
// allocations cost a page fault per 4 KiB on first touch (several ms for ViT-sized calls), so the
// arena is kept between calls. A concurrent call that finds it busy uses a temporary allocation.
struct Arena {
  std::mutex mu;
  void* ptr = nullptr;
  size_t cap = 0;
  bool busy = false;
};
Arena g_arena;

struct ArenaLease {
  void* ptr = nullptr;
  bool owned = false;  // true: temporary allocation, freed on release
  explicit ArenaLease(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(g_arena.mu);
      if (!g_arena.busy) {
        if (g_arena.cap < bytes) {
          std::free(g_arena.ptr);
          g_arena.cap = 0;
          g_arena.ptr = alloc64(bytes);
          if (g_arena.ptr) g_arena.cap = bytes;
        }
        if (g_arena.ptr) {
          g_arena.busy = true;
          ptr = g_arena.ptr;
          return;
        }
      }
    }
    ptr = alloc64(bytes);
    owned = true;
  }
  ~ArenaLease() {
    if (owned) {
      std::free(ptr);
    } else if (ptr) {
      std::lock_guard<std::mutex> lock(g_arena.mu);
      g_arena.busy = false;
    }
  }
};

// A NaN or +-inf in V (rare: run reported a non-finite output row, and the item was rerun on a
// sanitised V): out[i, c] = NaN for every row i of the item that sees a key j with V[j, c]
// non-finite (docs/nan_semantics.md). A key is seen unless causality excludes it or its bias is
// -inf.
float elem_f32(const void* base, int64_t off, int dtype) {
  if (dtype == kF32) return ((const float*)base)[off];
  if (dtype == kF16) return f16_to_f32(((const uint16_t*)base)[off]);
  const uint32_t u = (uint32_t)((const uint16_t*)base)[off] << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void mark_nonfinite_v(const AttnParams& p, const AttnSeq& s, const AttnItem& it) {
  const int kvh = it.h / (p.Hq / p.Hkv);
  const int64_t vbase = s.bk * p.v_sb + kvh * p.v_sh + s.k_begin * p.v_ss;
  auto bad = [&](int64_t j, int c) {
    return !std::isfinite(elem_f32(p.v, vbase + j * p.v_ss + c, p.dtype));
  };
  std::vector<int64_t> keys;  // keys with a non-finite V value, ascending
  for (int64_t j = 0; j < s.Lk; ++j)
    for (int c = 0; c < p.Dv; ++c)
      if (bad(j, c)) {
        keys.push_back(j);
        break;
      }
  const float* bias = p.bias ? p.bias + s.bk * p.bias_sb + it.h * p.bias_sh + s.k_begin : nullptr;
  for (int r = 0; r < it.nq; ++r) {
    const int64_t row = it.q0 + r;
    const int64_t lim = p.causal ? std::min(s.Lk, row + s.Lk - s.Lq + 1) : s.Lk;
    const int64_t ooff = s.bq * p.o_sb + it.h * p.o_sh + (s.q_begin + row) * p.o_ss;
    for (const int64_t j : keys) {
      if (j >= lim) break;
      if (bias != nullptr && bias[j] == -INFINITY) continue;
      for (int c = 0; c < p.Dv; ++c) {
        if (!bad(j, c)) continue;
        if (p.dtype == kF32)
          ((float*)p.out)[ooff + c] = NAN;
        else  // the quiet NaN of bf16 / f16
          ((uint16_t*)p.out)[ooff + c] = p.dtype == kF16 ? 0x7e00 : 0x7fc0;
      }
    }
  }
}

// Decoding with GQA (one query row per head, several query heads per kv head): the query heads
// of a kv head become the query rows of one head, (B, Hq, 1, D) viewed as (B, Hkv, Hq / Hkv, D),
// so that one item reads its K / V once for all of them instead of once per query head. Exact
// for dense calls without scores (their per-row reductions assume rows of one head) whose bias,
// if any, is per key (head stride 0); causal is moot (a single query row sees every key).
bool gqa_rows(const AttnParams& p, AttnParams* g) {
  const int group = p.Hkv > 0 ? p.Hq / p.Hkv : 1;
  if (group <= 1 || p.Sq != 1 || p.cu_q != nullptr || (p.scores != nullptr && p.scores_mode != 0) ||
      (p.bias != nullptr && p.bias_sh != 0))
    return false;
  *g = p;
  g->Hq = p.Hkv;
  g->Sq = group;
  g->causal = false;
  g->q_ss = p.q_sh;
  g->q_sh = p.q_sh * group;
  g->o_ss = p.o_sh;
  g->o_sh = p.o_sh * group;
  g->lse_ss = p.lse_sh;
  g->lse_sh = p.lse_sh * group;
  return true;
}

const char* run_attention(const AttnParams& p) {
  const char* err = nullptr;
  const Isa isa = selected_isa(&err);
  if (err) return err;
  const AttnImpl* impl = impl_for(isa, p.dtype);
  if (impl == nullptr)
    return "mmkernels: no CPU attention kernel in this build for the selected ISA";
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0) return "mmkernels: Hq must be a multiple of Hkv";

  const int64_t nseq = p.nseq;
  const bool varlen = p.cu_q != nullptr;
  std::vector<AttnSeq> seqs((size_t)nseq);
  int64_t lk_max = 0, lq_max = 0;
  for (int64_t b = 0; b < nseq; ++b) {
    AttnSeq& s = seqs[b];
    if (varlen) {
      const int64_t q0 = p.cu_q[b], q1 = p.cu_q[b + 1], k0 = p.cu_k[b], k1 = p.cu_k[b + 1];
      if (q0 < 0 || q1 < q0 || q1 > p.Sq)
        return "mmkernels: cu_seqlens_q must be non-decreasing, start >= 0 and end <= total query "
               "rows";
      if (k0 < 0 || k1 < k0 || k1 > p.Sk)
        return "mmkernels: cu_seqlens_k must be non-decreasing, start >= 0 and end <= total key "
               "rows";
      s = AttnSeq{0, 0, q0, k0, q1 - q0, k1 - k0};
    } else {
      s = AttnSeq{b, b, 0, 0, p.Sq, p.Sk};
    }
    if (s.Lk > lk_max) lk_max = s.Lk;
    if (s.Lq > lq_max) lq_max = s.Lq;
  }

  const int W = impl->W;
  const int64_t eb = impl->elem_bytes;
  const int64_t Dvp = round_up64(p.Dv, W);
  const int64_t Dk = round_up64(p.D, impl->d_align);  // K panels' (padded) head dim
  const int Hq = p.Hq, Hkv = p.Hkv, group = p.Hq / p.Hkv;

  // Decode-shaped calls pack each key block per item into thread scratch (kJitRows).
  const bool jit = (int64_t)group * lq_max <= kJitRows;

  // Packed K/V offsets per (sequence, kv head); -1 when nothing reads them (and always in jit
  // mode).
  const int64_t npack = nseq * Hkv;
  std::vector<int64_t> koff((size_t)npack, -1), voff((size_t)npack, -1);
  int64_t total = 0;
  for (int64_t b = 0; b < nseq && !jit; ++b) {
    const AttnSeq& s = seqs[b];
    if (s.Lq == 0 || s.Lk == 0) continue;
    const int64_t lkp = round_up64(s.Lk, W);
    for (int kvh = 0; kvh < Hkv; ++kvh) {
      koff[b * Hkv + kvh] = total;
      total += round_up64(lkp * Dk * eb, 64);
      voff[b * Hkv + kvh] = total;
      total += round_up64(lkp * Dvp * eb, 64);
    }
  }

  // Work items: (sequence, head, block of query rows). Blocks are balanced within a sequence and
  // a multiple of the row tile where possible.
  std::vector<AttnItem> items;
  std::vector<int64_t> seq_item0((size_t)nseq + 1, 0);
  for (int64_t b = 0; b < nseq; ++b) {
    seq_item0[b] = (int64_t)items.size();
    const int64_t Lq = seqs[b].Lq;
    if (Lq == 0) continue;
    const int64_t nblk = ceil_div64(Lq, kBQ);
    int64_t rows = round_up64(ceil_div64(Lq, nblk), impl->row_tile);
    if (rows > kBQ) rows = kBQ;
    for (int h = 0; h < Hq; ++h)
      for (int64_t q0 = 0; q0 < Lq; q0 += rows) {
        const int64_t nq = Lq - q0 < rows ? Lq - q0 : rows;
        items.push_back(AttnItem{b, h, (int32_t)q0, (int32_t)nq, nullptr});
      }
  }
  seq_item0[nseq] = (int64_t)items.size();
  const int64_t nitems = (int64_t)items.size();

  // Scores partial rows and per-thread scratch sizes (floats).
  const int mode = (p.scores != nullptr) ? p.scores_mode : 0;
  const int64_t ldp = round_up64(lk_max > 0 ? lk_max : 1, kBK) + kBK;
  const int64_t nkb = ceil_div64(ldp, kBK);
  int64_t npart = 0;
  if (mode == 3)
    npart = nitems * ldp;
  else if (mode == 1 || mode == 2)
    npart = nseq * Hq * ldp;
  const int64_t nS = (int64_t)kBQ * kLDS, nO = (int64_t)kBQ * Dvp, nQ = (int64_t)kBQ * Dk;
  const int64_t nKeep = mode ? (int64_t)kBQ * ldp : 0, nKeepM = mode ? (int64_t)kBQ * nkb : 0;
  // jit: one block of K (panels of kJitKeys keys x Dk) and of V (kJitKeys x Dvp) in the pack's
  // element size, as float counts.
  const int64_t nKjit = jit ? ceil_div64(kJitKeys * Dk * eb, 4) : 0;
  const int64_t nVjit = jit ? ceil_div64(kJitKeys * Dvp * eb, 4) : 0;
  const int64_t per_thread = round_up64(nS, 16) * 2 + round_up64(nO, 16) + round_up64(nQ, 16) +
                             kRowBuf + round_up64(nKeep, 16) + round_up64(nKeepM, 16) +
                             round_up64(nKjit, 16) + round_up64(nVjit, 16);
  int nthreads = p.nthreads > 0 ? p.nthreads : 1;
  const int64_t maxwork = nitems > npack ? nitems : npack;
  if (maxwork < nthreads) nthreads = maxwork > 0 ? (int)maxwork : 1;

  // Tasks handed to threads: with enough (sequence, kv head) groups, a task is all the items of
  // one group (consecutive in `items`), so one thread packs K/V and runs every item that reads
  // them. Handing out single items instead makes the other threads spin while the first one
  // packs (they usually pick the next item of the same group), and splits the group's packed
  // K/V between cores' caches. Few groups (long sequences, small batch): one item per task.
  // The last 2 * nthreads groups are split into items again to even out the finish.
  std::vector<int64_t> task0;
  task0.reserve((size_t)nitems + 1);
  {
    const bool by_group = nthreads > 1 && npack >= 4 * (int64_t)nthreads;
    const int64_t split_from = npack - 2 * (int64_t)nthreads;
    int64_t prev = -1;
    for (int64_t i = 0; i < nitems; ++i) {
      const int64_t t = items[i].seq * Hkv + items[i].h / group;
      if (!by_group || t != prev || t >= split_from) task0.push_back(i);
      prev = t;
    }
    task0.push_back(nitems);
  }
  const int64_t ntasks = (int64_t)task0.size() - 1;

  const int64_t part_bytes = round_up64(npart * (int64_t)sizeof(float), 64);
  const int64_t thread_bytes = round_up64(per_thread * (int64_t)sizeof(float), 64);
  ArenaLease lease((size_t)(total + part_bytes + thread_bytes * nthreads));
  if (!lease.ptr) return "mmkernels: out of memory (attention workspace)";
  unsigned char* packbuf = (unsigned char*)lease.ptr;
  float* part = (float*)(packbuf + total);
  unsigned char* thread_mem = packbuf + total + part_bytes;
  if (mode == 3) {
    for (int64_t i = 0; i < nitems; ++i) items[i].part = part + i * ldp;
  } else if (mode == 1 || mode == 2) {
    for (int64_t i = 0; i < nitems; ++i) {
      AttnItem& it = items[i];
      const int64_t tr = mode == 1 ? 0 : seqs[it.seq].Lq - 1;
      if (tr >= it.q0 && tr < it.q0 + it.nq) it.part = part + (it.seq * Hq + it.h) * ldp;
    }
  }

  // K/V of a (sequence, kv head) are packed by the first thread that needs them (0 = not packed,
  // 1 = being packed, 2 = ready): no separate packing pass, and the packed panels are still in
  // cache when the items that read them run.
  std::unique_ptr<std::atomic<int>[]> pack_state(new std::atomic<int>[npack > 0 ? npack : 1]);
  for (int64_t t = 0; t < npack; ++t) pack_state[t].store(0, std::memory_order_relaxed);
  auto ensure_packed = [&](int64_t t) {
    std::atomic<int>& st = pack_state[t];
    if (st.load(std::memory_order_acquire) == 2) return;
    int expected = 0;
    if (st.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
      impl->pack(p, seqs[t / Hkv], (int)(t % Hkv), packbuf + koff[t], packbuf + voff[t], false);
      st.store(2, std::memory_order_release);
      return;
    }
    for (int spins = 0; st.load(std::memory_order_acquire) != 2; ++spins) {
      if (spins > 256) sched_yield();
    }
  };

  std::atomic<bool> err_oom{false};
#pragma omp parallel num_threads(nthreads)
  {
    float* mem = (float*)(thread_mem + thread_bytes * omp_get_thread_num());
    AttnScratch sc{};
    {
      float* cur = mem;
      sc.S = cur;
      cur += round_up64(nS, 16);
      sc.P = cur;
      cur += round_up64(nS, 16);
      sc.O = cur;
      cur += round_up64(nO, 16);
      sc.Qf = cur;
      cur += round_up64(nQ, 16);
      sc.rowbuf = cur;
      cur += kRowBuf;
      sc.keep = mode ? cur : nullptr;
      cur += round_up64(nKeep, 16);
      sc.keep_m = mode ? cur : nullptr;
      cur += round_up64(nKeepM, 16);
      sc.ldk = ldp;
      sc.nkb = nkb;
      sc.kjit = jit ? cur : nullptr;
      cur += round_up64(nKjit, 16);
      sc.vjit = jit ? cur : nullptr;
    }

#pragma omp for schedule(dynamic, 1)
    for (int64_t ti = 0; ti < ntasks; ++ti) {
      for (int64_t i = task0[ti]; i < task0[ti + 1]; ++i) {
        const AttnItem& it = items[i];
        const int64_t t = it.seq * Hkv + it.h / group;
        if (jit) {
          if (impl->run(p, seqs[it.seq], it, nullptr, nullptr, sc, false)) {
            // V held a NaN / inf (rare): rerun with every block's V sanitised, then mark.
            impl->run(p, seqs[it.seq], it, nullptr, nullptr, sc, true);
            mark_nonfinite_v(p, seqs[it.seq], it);
          }
          continue;
        }
        ensure_packed(t);
        if (impl->run(p, seqs[it.seq], it, packbuf + koff[t], packbuf + voff[t], sc, false)) {
          // V held a NaN / inf among the keys this item computed with (rare): rerun the item on
          // a private sanitised pack, then mark the columns of the rows that see such a key.
          const int64_t kbytes = koff[t] >= 0 ? voff[t] - koff[t] : 0;
          const int64_t vbytes = round_up64(round_up64(seqs[it.seq].Lk, W) * Dvp * eb, 64);
          void* kv = alloc64((size_t)(kbytes + vbytes));
          if (kv == nullptr) {
            err_oom.store(true, std::memory_order_relaxed);
            continue;
          }
          impl->pack(p, seqs[it.seq], (int)(t % Hkv), kv, (unsigned char*)kv + kbytes, true);
          impl->run(p, seqs[it.seq], it, kv, (unsigned char*)kv + kbytes, sc, true);
          std::free(kv);
          mark_nonfinite_v(p, seqs[it.seq], it);
        }
      }
    }

    if (mode != 0) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < nseq; ++b) {
        const AttnSeq& s = seqs[b];
        float* dst = p.scores + s.bq * p.sc_sb + s.k_begin * p.sc_ss;
        if (s.Lq == 0) {
          for (int64_t j = 0; j < s.Lk; ++j) dst[j * p.sc_ss] = 0.f;
          continue;
        }
        // Sum partial rows in a fixed order into the first one, then scale.
        float* acc;
        int64_t nrows, stride;
        float denom;
        if (mode == 3) {
          acc = items[seq_item0[b]].part;
          nrows = seq_item0[b + 1] - seq_item0[b];
          stride = ldp;  // items of one sequence have consecutive partial rows
          denom = (float)Hq * (float)s.Lq;
        } else {
          acc = part + b * Hq * ldp;
          nrows = Hq;
          stride = ldp;
          denom = (float)Hq;
        }
        for (int64_t r = 1; r < nrows; ++r) {
          const float* src = acc + r * stride;
          for (int64_t j = 0; j < s.Lk; ++j) acc[j] += src[j];
        }
        const float inv = 1.f / denom;
        for (int64_t j = 0; j < s.Lk; ++j) dst[j * p.sc_ss] = acc[j] * inv;
      }
    }
  }
  return err_oom.load() ? "mmkernels: out of memory (attention, NaN / inf in V)" : nullptr;
}

}  // namespace

const char* attention_cpu_isa(const char** error) { return isa_name(selected_isa(error)); }

// Tensors of at least this many elements are scanned by several threads (below it one thread
// reads them in a few microseconds, less than waking the others costs).
constexpr int64_t kScanParallelMin = (int64_t)1 << 16;
// Elements per unit of scan work.
constexpr int64_t kScanChunk = (int64_t)1 << 15;

const char* attention_any_nonfinite(const void* base, int dtype, int ndim, const int64_t* sizes,
                                    const int64_t* strides, int nthreads, bool* found) {
  *found = false;
  const char* err = nullptr;
  const Isa isa = selected_isa(&err);
  if (err) return err;
  const AttnImpl* impl = impl_for(isa, dtype);
  if (impl == nullptr || impl->any_nonfinite == nullptr)
    return "mmkernels: no CPU NaN / inf scan in this build for the selected ISA";
  if (ndim > 8) return "mmkernels: the NaN / inf scan takes at most 8 dims";

  // The dims that matter (size > 1, stride != 0: a stride-0 dim repeats what it reads), innermost
  // first, then the run of contiguous elements they start with, the row dim after it (rows that
  // step over whole rows merged into it) and the outer dims left. Merging only renames addresses
  // the tensor's own indexing reaches.
  struct Dim {
    int64_t size, stride;
  };
  Dim d[8];
  int nd = 0;
  for (int i = 0; i < ndim; ++i) {
    if (sizes[i] == 0) return nullptr;  // no element
    if (sizes[i] > 1 && strides[i] != 0) d[nd++] = Dim{sizes[i], strides[i]};
  }
  for (int i = 1; i < nd; ++i)
    for (int j = i; j > 0 && d[j].stride < d[j - 1].stride; --j) std::swap(d[j], d[j - 1]);
  int i = 0;
  int64_t n = 1;
  while (i < nd && d[i].stride == n) n *= d[i++].size;
  int64_t nrows = 1, rs = n;
  if (i < nd) {
    nrows = d[i].size;
    rs = d[i++].stride;
  }
  while (i < nd && d[i].stride == nrows * rs) nrows *= d[i++].size;
  int64_t nouter = 1;
  for (int j = i; j < nd; ++j) nouter *= d[j].size;

  // Units of work of about kScanChunk elements: pieces of a long run, or several short rows.
  const int64_t es = dtype == kF32 ? 4 : 2;
  const int64_t piece = n < kScanChunk ? n : kScanChunk;
  const int64_t npieces = ceil_div64(n, piece);
  const int64_t unit_rows = npieces > 1 ? 1 : std::max<int64_t>(1, kScanChunk / n);
  const int64_t nrow_units = ceil_div64(nrows, unit_rows);
  const int64_t nwork = nouter * nrow_units * npieces;
  const bool parallel = nthreads > 1 && nwork > 1 && n * nrows * nouter >= kScanParallelMin;
  std::atomic<bool> any{false};
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static) if (parallel)
  for (int64_t w = 0; w < nwork; ++w) {
    if (any.load(std::memory_order_relaxed)) continue;
    const int64_t e0 = (w % npieces) * piece, r0 = (w / npieces % nrow_units) * unit_rows;
    int64_t o = w / npieces / nrow_units, off = 0;
    for (int j = i; j < nd; ++j) {
      off += (o % d[j].size) * d[j].stride;
      o /= d[j].size;
    }
    const int64_t rows = std::min(unit_rows, nrows - r0), len = std::min(piece, n - e0);
    const void* p = (const char*)base + (off + r0 * rs + e0) * es;
    if (impl->any_nonfinite(p, dtype, rows, len, rs)) any.store(true, std::memory_order_relaxed);
  }
  *found = any.load();
  return nullptr;
}

const char* attention_forward_cpu(const AttnParams& p) {
  AttnParams grouped;
  return run_attention(gqa_rows(p, &grouped) ? grouped : p);
}

}  // namespace cpu
}  // namespace mmk
