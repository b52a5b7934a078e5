// CPU paged attention: reads K/V in place through the block table (no gather), one online-softmax
// pass over a sequence's blocks (flash-decoding style), and the K/V slot write. Built on first use
// by aiinfra/infer/attention.py with torch.utils.cpp_extension.load.
//
// Cache layout per layer: V is [num_blocks, num_kv_heads, block_size, head_dim] and K the same with
// each tile transposed to [head_dim, block_size], so one kv head's block is one contiguous tile and
// a block's scores are head_dim broadcast FMAs over block_size-wide key vectors. A work item is
// (sequence, kv head, tile of query tokens): its rows are the tile's tokens times the query heads
// of that kv head (GQA), so every K/V tile loaded from memory serves all of them while in L1.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kPrefetchBlocks = 4;  // K/V tiles requested ahead of the one being computed
// (query row, key) pairs below which a call runs on the calling thread only (~50 us of work)
constexpr int64_t kParallelRowKeys = 1 << 16;

struct WorkItem {
  int32_t seq;
  int32_t kv_head;
  int32_t tok_begin;  // query tokens of the tile, relative to the sequence's first query
  int32_t tok_end;
};

// scores S[r, 0:bs] = q_r . K[:, 0:bs] for RN rows at once: K^T is [D, bs], so every key vector
// load (block_size keys of one dim) feeds RN broadcast FMAs and no horizontal sum is needed.
// U partial sums per row break the FMA latency chain along D (8 chains in flight). FULL: the
// chunk is a whole vector of keys (the usual case, block_size a multiple of the SIMD width).
template <int RN, bool FULL>
inline void qk_chunk(const float* qf, const float* kt, float* S, int64_t bs, int64_t D, int64_t kc,
                     int64_t cnt) {
  constexpr int U = 8 / RN;
  auto load_k = [&](int64_t d) {
    return FULL ? Vec::loadu(kt + d * bs + kc) : Vec::loadu(kt + d * bs + kc, cnt);
  };
  Vec acc[RN][U];
  for (int i = 0; i < RN; ++i)
    for (int u = 0; u < U; ++u) acc[i][u] = Vec(0.f);
  int64_t d = 0;
  for (; d + U <= D; d += U) {
    for (int u = 0; u < U; ++u) {
      const Vec k = load_k(d + u);
      for (int i = 0; i < RN; ++i)
        acc[i][u] = at::vec::fmadd(Vec(qf[i * D + d + u]), k, acc[i][u]);
    }
  }
  for (; d < D; ++d) {
    const Vec k = load_k(d);
    for (int i = 0; i < RN; ++i) acc[i][0] = at::vec::fmadd(Vec(qf[i * D + d]), k, acc[i][0]);
  }
  for (int i = 0; i < RN; ++i) {
    for (int u = 1; u < U; ++u) acc[i][0] = acc[i][0] + acc[i][u];
    acc[i][0].store(S + i * bs + kc, cnt);
  }
}

template <int RN>
inline void qk_rows(const float* qf, const float* kt, float* S, int64_t bs, int64_t D) {
  int64_t kc = 0;
  for (; kc + kVec <= bs; kc += kVec) qk_chunk<RN, true>(qf, kt, S, bs, D, kc, kVec);
  if (kc < bs) qk_chunk<RN, false>(qf, kt, S, bs, D, kc, bs - kc);
}

inline void qk(const float* qf, const float* kt, float* S, int64_t rows, int64_t bs, int64_t D) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) qk_rows<4>(qf + r * D, kt, S + r * bs, bs, D);
  for (; r + 2 <= rows; r += 2) qk_rows<2>(qf + r * D, kt, S + r * bs, bs, D);
  if (r < rows) qk_rows<1>(qf + r * D, kt, S + r * bs, bs, D);
}

// acc_r = acc_r * alpha_r + sum_{j<n} P[r, j] * v[j] for RN rows, D = NC vectors: all RN x NC
// accumulators live in registers and every V load serves RN rows
template <int NC, int RN>
inline void pv_rows(float* acc, const float* alpha, const float* P, int64_t n, const float* v,
                    int64_t bs) {
  constexpr int64_t D = NC * kVec;
  Vec a[RN][NC];
  for (int i = 0; i < RN; ++i)
    for (int c = 0; c < NC; ++c) a[i][c] = Vec::loadu(acc + i * D + c * kVec) * Vec(alpha[i]);
  for (int64_t j = 0; j < n; ++j) {
    for (int c = 0; c < NC; ++c) {
      const Vec x = Vec::loadu(v + j * D + c * kVec);
      for (int i = 0; i < RN; ++i) a[i][c] = at::vec::fmadd(Vec(P[i * bs + j]), x, a[i][c]);
    }
  }
  for (int i = 0; i < RN; ++i)
    for (int c = 0; c < NC; ++c) a[i][c].store(acc + i * D + c * kVec);
}

// any head_dim: one row at a time, tails masked
inline void pv_generic(float* acc, float alpha, const float* p, int64_t n, const float* v,
                       int64_t D) {
  for (int64_t d = 0; d < D; d += kVec) {
    const int64_t cnt = std::min(kVec, D - d);
    Vec a = Vec::loadu(acc + d, cnt) * Vec(alpha);
    for (int64_t j = 0; j < n; ++j) {
      a = at::vec::fmadd(Vec(p[j]), Vec::loadu(v + j * D + d, cnt), a);
    }
    a.store(acc + d, cnt);
  }
}

template <int NC>
inline void pv_fixed(float* acc, const float* alpha, const float* P, int64_t rows, int64_t n,
                     const float* v, int64_t bs) {
  constexpr int64_t D = NC * kVec;
  // 2 rows x NC chains keep the FMA units busy; past NC=4 that would spill registers
  constexpr int RN = NC <= 4 ? 2 : 1;
  int64_t r = 0;
  for (; r + RN <= rows; r += RN) pv_rows<NC, RN>(acc + r * D, alpha + r, P + r * bs, n, v, bs);
  for (; r < rows; ++r) pv_rows<NC, 1>(acc + r * D, alpha + r, P + r * bs, n, v, bs);
}

inline void pv(float* acc, const float* alpha, const float* P, int64_t rows, int64_t n,
               const float* v, int64_t bs, int64_t D) {
  if (D == kVec) return pv_fixed<1>(acc, alpha, P, rows, n, v, bs);
  if (D == 2 * kVec) return pv_fixed<2>(acc, alpha, P, rows, n, v, bs);
  if (D == 4 * kVec) return pv_fixed<4>(acc, alpha, P, rows, n, v, bs);
  if (D == 8 * kVec) return pv_fixed<8>(acc, alpha, P, rows, n, v, bs);
  for (int64_t r = 0; r < rows; ++r) pv_generic(acc + r * D, alpha[r], P + r * bs, n, v, D);
}

// online softmax step for one row over its n visible keys of this block: s[0:n] becomes
// exp(s - m_new); returns alpha = exp(m_old - m_new), the factor rescaling what came before
inline float softmax_step(float* s, int64_t n, float& m, float& l) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // lanes past n read as -inf: they lose the max and exp_u20 maps them to 0
  auto load_s = [&](int64_t j) {
    return j + kVec <= n ? Vec::loadu(s + j)
                         : Vec::set(Vec(kNegInf), Vec::loadu(s + j, n - j), n - j);
  };
  Vec vmax(kNegInf);
  for (int64_t j = 0; j < n; j += kVec) vmax = at::vec::maximum(vmax, load_s(j));
  const float m_new = std::max(m, vmax.reduce_max());
  const float alpha = m_new == m ? 1.f : std::exp(m - m_new);  // 0 on the first block (m = -inf)
  Vec sum(0.f);
  for (int64_t j = 0; j < n; j += kVec) {
    const Vec e = (load_s(j) - Vec(m_new)).exp_u20();
    e.store(s + j, std::min(kVec, n - j));
    sum = sum + e;
  }
  const float total = sum.reduce_add();
  l = l * alpha + total;
  m = m_new;
  return alpha;
}

// 16 bf16 / fp16 values -> fp32 with one or two instructions where the CPU has them
inline void widen16(const at::BFloat16* src, float* dst) {
#if defined(__AVX512F__)
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  _mm512_storeu_ps(dst, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
#else
  for (int i = 0; i < 16; ++i) dst[i] = static_cast<float>(src[i]);
#endif
}

inline void widen16(const at::Half* src, float* dst) {
#if defined(__AVX512F__)
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  _mm512_storeu_ps(dst, _mm512_cvtph_ps(raw));
#else
  for (int i = 0; i < 16; ++i) dst[i] = static_cast<float>(src[i]);
#endif
}

// fp32 tiles are used in place; bf16/fp16 tiles are widened once into scratch, then shared by
// all rows of the work item
template <typename T>
inline const float* as_float(const T* src, float* scratch, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    int64_t i = 0;
    if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
      for (; i + 16 <= n; i += 16) widen16(src + i, scratch + i);
    }
    for (; i < n; ++i) scratch[i] = static_cast<float>(src[i]);
    return scratch;
  }
}

template <typename T>
void attend_item(const WorkItem& w, const float* q, float* out, const T* k_pool, const T* v_pool,
                 const int32_t* block_tables, int64_t bt_stride, const int32_t* qsl,
                 const int32_t* seq_lens, int64_t H, int64_t Hkv, int64_t bs, int64_t D,
                 float scale, std::vector<float>& buf) {
  const int64_t group = H / Hkv;
  const int64_t q_start = qsl[w.seq];
  const int64_t q_len = qsl[w.seq + 1] - q_start;
  const int64_t seq_len = seq_lens[w.seq];
  const int64_t first_pos = seq_len - q_len;  // absolute position of the sequence's first query
  const int64_t rows = (w.tok_end - w.tok_begin) * group;
  // per-thread scratch: q rows, acc rows, m, l, alpha, scores, and K/V tiles converted to fp32
  const size_t need = rows * D * 2 + rows * 3 + rows * bs + 2 * bs * D;
  if (buf.size() < need) buf.resize(need);
  float* qf = buf.data();
  float* acc = qf + rows * D;
  float* m = acc + rows * D;
  float* l = m + rows;
  float* alpha = l + rows;
  float* S = alpha + rows;
  float* k_scratch = S + rows * bs;
  float* v_scratch = k_scratch + bs * D;

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tok = w.tok_begin + r / group;
    const int64_t h = w.kv_head * group + r % group;
    const float* src = q + ((q_start + tok) * H + h) * D;
    for (int64_t d = 0; d < D; ++d) qf[r * D + d] = src[d] * scale;
    std::fill(acc + r * D, acc + (r + 1) * D, 0.f);
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
  const int64_t last_pos = first_pos + w.tok_end - 1;
  const int64_t num_blocks = last_pos / bs + 1;
  const int32_t* table = block_tables + w.seq * bt_stride;
  const int64_t tile_bytes = bs * D * static_cast<int64_t>(sizeof(T));
  auto prefetch_tile = [&](int64_t b) {
    const int64_t tile = (static_cast<int64_t>(table[b]) * Hkv + w.kv_head) * bs * D;
    const char* kp = reinterpret_cast<const char*>(k_pool + tile);
    const char* vp = reinterpret_cast<const char*>(v_pool + tile);
    for (int64_t off = 0; off < tile_bytes; off += 64) {
      __builtin_prefetch(kp + off, 0, 2);
      __builtin_prefetch(vp + off, 0, 2);
    }
  };
  for (int64_t b = 0; b < std::min<int64_t>(kPrefetchBlocks, num_blocks); ++b) prefetch_tile(b);
  for (int64_t b = 0; b < num_blocks; ++b) {
    // blocks are scattered over the pool and the hardware prefetcher stops at each tile's page
    // boundary: without this every tile starts with a full memory latency. Into L2 (T1), not L1:
    // a tile pair is 64-128 lines, more than the L1 fill buffers hold in flight
    if (b + kPrefetchBlocks < num_blocks) prefetch_tile(b + kPrefetchBlocks);
    const int64_t tile = (static_cast<int64_t>(table[b]) * Hkv + w.kv_head) * bs * D;
    const int64_t key0 = b * bs;
    const float* kt = as_float(k_pool + tile, k_scratch, bs * D);  // K^T tile [D, bs]
    const float* vb = as_float(v_pool + tile, v_scratch, bs * D);  // V tile [bs, D]
    // rows whose query precedes this whole block see none of it (causal); rows are ordered by
    // token, so they are a suffix
    const int64_t first_tok = std::max<int64_t>(w.tok_begin, key0 - first_pos);
    const int64_t r0 = (first_tok - w.tok_begin) * group;
    // keys past a row's position (or past seq_len) hold stale data: their scores are computed
    // but never enter the softmax
    qk(qf + r0 * D, kt, S + r0 * bs, rows - r0, bs, D);
    const int64_t n_max = std::min(bs, last_pos + 1 - key0);
    for (int64_t r = r0; r < rows; ++r) {
      const int64_t pos = first_pos + w.tok_begin + r / group;
      const int64_t n = std::min(bs, pos + 1 - key0);
      float* s = S + r * bs;
      alpha[r] = softmax_step(s, n, m[r], l[r]);
      // rows are multiplied with V up to n_max together: a row's invisible keys weigh 0
      std::fill(s + n, s + n_max, 0.f);
    }
    pv(acc + r0 * D, alpha + r0, S + r0 * bs, rows - r0, n_max, vb, bs, D);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tok = w.tok_begin + r / group;
    const int64_t h = w.kv_head * group + r % group;
    float* dst = out + ((q_start + tok) * H + h) * D;
    const float inv = 1.f / l[r];
    for (int64_t d = 0; d < D; ++d) dst[d] = acc[r * D + d] * inv;
  }
}

// Work items in longest-first order (LPT): a step mixes 1-token decodes with prefill tiles that
// cost hundreds of times more, and handing the big ones out first keeps the dynamic schedule from
// ending with one thread on a long tile while the other idles.
std::vector<WorkItem> make_work(const int32_t* qsl, const int32_t* seq_lens, int64_t num_seqs,
                                int64_t Hkv, int64_t tile_tokens, int64_t& total_cost) {
  std::vector<WorkItem> work;
  std::vector<int64_t> cost;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = qsl[s + 1] - qsl[s];
    const int64_t first_pos = seq_lens[s] - q_len;
    for (int64_t t = 0; t < q_len; t += tile_tokens) {
      const int64_t end = std::min(q_len, t + tile_tokens);
      for (int64_t h = 0; h < Hkv; ++h) {
        work.push_back({static_cast<int32_t>(s), static_cast<int32_t>(h), static_cast<int32_t>(t),
                        static_cast<int32_t>(end)});
        cost.push_back((end - t) * (first_pos + end));  // rows x keys seen by the last row
      }
    }
  }
  total_cost = 0;
  for (int64_t c : cost) total_cost += c;
  std::vector<int64_t> order(work.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::vector<WorkItem> sorted;
  sorted.reserve(work.size());
  for (int64_t i : order) sorted.push_back(work[i]);
  return sorted;
}

}  // namespace

// q [N, H, D]; k_pool [num_blocks, Hkv, D, bs]; v_pool [num_blocks, Hkv, bs, D];
// block_tables [S, M], query_start_loc [S+1], seq_lens [S], all int32 -> out [N, H, D] fp32
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                              torch::Tensor block_tables, torch::Tensor query_start_loc,
                              torch::Tensor seq_lens, double scale, int64_t tile_tokens) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4, "q must be [N,H,D], k_pool [B,Hkv,bs,D]");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "K/V pools must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && query_start_loc.scalar_type() == at::kInt &&
                  seq_lens.scalar_type() == at::kInt,
              "block_tables, query_start_loc and seq_lens must be int32");
  // q and out stay fp32 whatever the cache dtype (a bf16 cache under an fp32 model loses no
  // precision beyond the cached K/V); the caller casts out back to q's dtype
  q = q.to(at::kFloat).contiguous();
  block_tables = block_tables.contiguous();
  query_start_loc = query_start_loc.contiguous();
  seq_lens = seq_lens.contiguous();
  const int64_t H = q.size(1), D = q.size(2);
  const int64_t Hkv = v_pool.size(1), bs = v_pool.size(2), group = H / std::max<int64_t>(Hkv, 1);
  TORCH_CHECK(H % Hkv == 0 && v_pool.size(3) == D && k_pool.size(2) == D,
              "head shapes of q and the K/V pools differ");
  auto out = torch::empty_like(q);
  const int64_t num_seqs = seq_lens.size(0);
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  int64_t total_cost = 0;
  const auto work =
      make_work(qsl, seq_lens.data_ptr<int32_t>(), num_seqs, Hkv, tile_tokens, total_cost);
  const int64_t num_items = static_cast<int64_t>(work.size());
  std::atomic<int64_t> next{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, k_pool.scalar_type(), "paged_attention", [&] {
        const float* qp = q.data_ptr<float>();
        float* op = out.data_ptr<float>();
        const scalar_t* kp = k_pool.data_ptr<scalar_t>();
        const scalar_t* vp = v_pool.data_ptr<scalar_t>();
        const int32_t* bt = block_tables.data_ptr<int32_t>();
        const int32_t* sl = seq_lens.data_ptr<int32_t>();
        const int64_t bt_stride = block_tables.size(1);
        auto drain = [&](int64_t, int64_t) {
          std::vector<float> buf;
          for (int64_t i = next.fetch_add(1); i < num_items; i = next.fetch_add(1)) {
            attend_item<scalar_t>(work[i], qp, op, kp, vp, bt, bt_stride, qsl, sl, H, Hkv, bs, D,
                                  static_cast<float>(scale), buf);
          }
        };
        // a few microseconds of work: waking a second thread costs more than it saves, and on a
        // busy machine a descheduled team member can hold the region's barrier for a time slice
        const int64_t num_threads = total_cost * group < kParallelRowKeys
                                        ? 1
                                        : std::min<int64_t>(at::get_num_threads(), num_items);
        if (num_threads == 1) {
          drain(0, 1);
        } else {
          // one chunk per thread of torch's own pool, items handed out dynamically: sequences
          // differ in length, so a static split would leave a thread idle
          at::parallel_for(0, num_threads, 1, drain);
        }
      });
  return out;
}

// k, v [N, Hkv, D] -> k_pool [num_blocks, Hkv, D, bs] (transposed tiles) and
// v_pool [num_blocks, Hkv, bs, D] at slot_mapping [N] int64
void write_kv(torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor k, torch::Tensor v,
              torch::Tensor slot_mapping) {
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "K/V pools must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64");
  k = k.to(k_pool.scalar_type()).contiguous();
  v = v.to(v_pool.scalar_type()).contiguous();
  slot_mapping = slot_mapping.contiguous();
  const int64_t N = k.size(0), Hkv = v_pool.size(1), bs = v_pool.size(2), D = v_pool.size(3);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_pool.scalar_type(), "write_kv", [&] {
    scalar_t* kp = k_pool.data_ptr<scalar_t>();
    scalar_t* vp = v_pool.data_ptr<scalar_t>();
    const scalar_t* ks = k.data_ptr<scalar_t>();
    const scalar_t* vs = v.data_ptr<scalar_t>();
    for (int64_t i = 0; i < N; ++i) {
      const int64_t block = slots[i] / bs, offset = slots[i] % bs;
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t tile = (block * Hkv + h) * bs * D;
        const scalar_t* k_row = ks + (i * Hkv + h) * D;
        for (int64_t d = 0; d < D; ++d) kp[tile + d * bs + offset] = k_row[d];  // K^T tile
        std::memcpy(vp + tile + offset * D, vs + (i * Hkv + h) * D, D * sizeof(scalar_t));
      }
    }
  });
}

// Ask for transparent huge pages on a (not yet touched) K/V pool. Tiles are read in block-table
// order, i.e. scattered over the pool: with 4 KiB pages nearly every tile is a TLB miss.
// Returns the bytes covered (0 where the OS has no madvise/THP); the pool works either way.
int64_t advise_hugepages(torch::Tensor pool) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2 << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(pool.data_ptr());
  const uintptr_t end = begin + pool.numel() * pool.element_size();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = end & ~(kHuge - 1);
  if (last <= first) return 0;
  if (madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE) != 0) return 0;
  return static_cast<int64_t>(last - first);
#else
  return 0;
#endif
}

// the team size of the OpenMP region the kernel's parallel_for opens: must equal torch's threads
int64_t omp_threads_in_region() {
  std::atomic<int64_t> team{0};
  at::parallel_for(0, at::get_num_threads(), 1,
                   [&](int64_t, int64_t) { team.store(omp_get_num_threads()); });
  return team.load();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged attention over the block table (CPU)");
  m.def("write_kv", &write_kv, "write K/V rows at cache slots (CPU)");
  m.def("advise_hugepages", &advise_hugepages, "madvise(MADV_HUGEPAGE) on an untouched pool");
  m.def("omp_threads_in_region", &omp_threads_in_region,
        "threads one parallel region of this extension runs on");
}
