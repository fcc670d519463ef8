// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// CPU decode attention: one query token per query head against a paged (or any) KV cache.
/// Online softmax over tiles of tokens, GQA (the G query heads of a group read each K/V row once),
/// split-K over token ranges with an exact merge of the partial softmax states, threads from a
/// caller-supplied pool. Reads plain rows with xsimd when the layout keeps a head's dim axis
/// contiguous; any other layout or accessor goes through element access.
/// Threads: read-only on the cache, per-thread scratch: any number of threads may attend at once,
/// sharing one pool (docs/threading.md). Compiled per ISA (docs/isa.md).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/simd.hpp>
#include <kvc/cpu/softmax_merge.hpp>
#include <kvc/error.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/view/accessor.hpp>
#include <kvc/view/decoding_accessor.hpp>
#include <kvc/view/heads.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md
namespace detail {

/// The public call the preconditions name (KVC_EXPECTS's __func__ would say kvc::decode_attention).
inline constexpr const char* api_name = "kvc::cpu::decode_attention";

template <class C, class S, class = void>
struct has_contains : std::false_type {};
template <class C, class S>
struct has_contains<C, S, std::void_t<decltype(std::declval<const C&>().contains(std::declval<S>()))>> : std::true_type {};
template <class C, class = void>
struct has_num_layers : std::false_type {};
template <class C>
struct has_num_layers<C, std::void_t<decltype(std::declval<const C&>().config().num_layers)>> : std::true_type {};

/// The sequence and layer arguments of a cache overload, checked before the cache is asked for
/// the layer, so the message names the attention call (not kv_cache::layer) and the argument.
template <class Cache, class Seq>
void check_seq_layer(const Cache& cache, Seq seq, std::int32_t layer, const char* who) {
  if constexpr (has_contains<Cache, Seq>::value)
    KVC_EXPECTS_IN(who, cache.contains(seq), "seq = ", seq,
                   " is not a live sequence of this cache, expected one of its ",
                   cache.num_sequences(), " live sequence ids (from add_sequence/fork, not removed)");
  if constexpr (has_num_layers<Cache>::value)
    KVC_EXPECTS_IN(who, layer >= 0 && layer < cache.config().num_layers, "layer = ", layer, ", expected 0..",
                   cache.config().num_layers - 1);
}

/// Tokens scored per online-softmax step. One tile of K rows is scored, then the same tile of V
/// rows is accumulated. 16 tokens is one page of the store's default page size, so K then V of a
/// tile is one contiguous 2 * 16 * D run of a page and the reads stream through memory in address
/// order; 64-token tiles jump between the K and V halves of four pages. bench_decode fp16
/// 32x8x128 ctx:32768 threads:1 (2026-11, 2-core AVX2 VM, A/B in one process): 16 tokens 1.3-1.8x
/// the speed of 64, 32 tokens 1.1x; at 1k tokens (cache-resident) all within 5%.
inline constexpr std::int32_t tile_tokens = 16;
/// Tiles ahead whose K and V rows are prefetched while a tile is scored. bench_decode fp16
/// 32x8x128 ctx:32768 threads:1 (2026-11): 1.1-1.2x over no prefetch at 1, 2, 4 or 8 tiles (within
/// noise of each other); prefetching whole tiles in one burst instead was 0.8-1.0x. On an Intel
/// AVX-512 VM (2026-12): no prefetch 0.95x, 1/4/8 tiles within 2% of 2, a part of each row or of
/// the tile's rows 0.81-0.98x (bench/results/decode.md).
inline constexpr std::int32_t prefetch_tiles = 2;
/// Query heads processed together; larger groups run in blocks of this size.
inline constexpr std::int32_t max_group = 8;
/// SIMD accumulators a register block aims for: 8 independent FMA chains cover the FMA latency
/// of AVX2 cores (4 cycles x 2 pipes) and leave 8 of the 16 ymm registers for operands. 12 measured
/// within noise of 8 (bench_decode fp16/fp32/bf16 32x8x128 and fp16 9x3x64, 1k and 32k, 2026-11).
inline constexpr std::int32_t acc_regs = 8;

/// Partial softmax state of G query heads over a token range.
struct partial {
  float m[max_group];
  float l[max_group];
  float* acc;  // [G][D]
};

/// st as the state over no token, accumulating into acc.
inline void start_partial(partial& st, float* acc) noexcept {
  st.acc = acc;
  for (std::int32_t g = 0; g < max_group; ++g) {
    st.m[g] = -INFINITY;
    st.l[g] = 0.0f;
  }
}

template <class View>
inline constexpr bool rows_are_plain_v = is_plain_accessor_v<typename View::accessor_type> &&
                                         View::mapping_type::dim_contiguous;

/// Float copies of a tile's rows, only for layouts or accessors without plain rows (empty otherwise).
template <class KView, class VView>
std::vector<float> tile_scratch(std::int32_t D) {
  return std::vector<float>(rows_are_plain_v<KView> && rows_are_plain_v<VView>
                                ? 0
                                : static_cast<std::size_t>(tile_tokens) * static_cast<std::size_t>(D));
}

/// What a tile's rows are read as: the stored elements for plain row layouts, float copies
/// otherwise.
template <class View>
using row_t = std::conditional_t<rows_are_plain_v<View>, const typename View::value_type, const float>;

/// rows[i] = the row of token t0 + i of head hi, for i < tn: pointers into the pages for plain row
/// layouts (one table lookup per page), float copies in scratch[tn][D] otherwise.
template <class View>
KVC_FORCEINLINE void tile_rows(const View& v, std::int32_t hi, std::int32_t t0, std::int32_t tn,
                               row_t<View>** rows, float* scratch) {
  if constexpr (rows_are_plain_v<View>) {
    const auto* base = v.data_handle();
    std::int32_t i = 0;
    while (i < tn) {
      const auto r = v.run(t0 + i, hi);
      const std::int32_t len = std::min<std::int32_t>(static_cast<std::int32_t>(r.length), tn - i);
      const auto* row = base + r.offset;
      for (std::int32_t j = 0; j < len; ++j, row += r.token_stride) rows[i + j] = row;
      i += len;
    }
  } else {
    const std::int32_t D = static_cast<std::int32_t>(v.extent(2));
    for (std::int32_t i = 0; i < tn; ++i) {
      float* dst = scratch + static_cast<std::size_t>(i) * D;
      if constexpr (accessor_decodes_rows_v<typename View::accessor_type>)  // an encoding: one row decode
        v.accessor().decode_row(v.data_handle(), static_cast<std::size_t>(v.mapping()(t0 + i, hi, 0)), dst);
      else
        for (std::int32_t d = 0; d < D; ++d) dst[d] = static_cast<float>(v(t0 + i, hi, d));
      rows[i] = dst;
    }
  }
}

/// s[g * tile_tokens + t] = q_g . rows[t] for T tokens x G heads in one pass over D; the T*G
/// sums are reduced together (transposed horizontal adds).
template <class Arch, std::int32_t G, std::int32_t T, class R>
KVC_FORCEINLINE void score_block(const float* q, R* const* rows, std::int32_t D, float* s) noexcept {
  using B = fbatch<Arch>;
  constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
  constexpr std::int32_t NR = (T * G + W - 1) / W * W;  // whole haddp groups
  B acc[NR];
  for (std::int32_t j = 0; j < NR; ++j) acc[j] = B(0.0f);
  std::int32_t d = 0;
  for (; d + W <= D; d += W) {
    B k[T];
    for (std::int32_t t = 0; t < T; ++t) k[t] = load_as_float<Arch>(rows[t] + d);
    for (std::int32_t g = 0; g < G; ++g) {
      const B qg = B::load_unaligned(q + g * D + d);
      for (std::int32_t t = 0; t < T; ++t) acc[t * G + g] = xsimd::fma(qg, k[t], acc[t * G + g]);
    }
  }
  alignas(64) float sum[NR];
  for (std::int32_t j = 0; j < NR; j += W) haddp<Arch>(acc + j).store_aligned(sum + j);  // not xsimd::haddp: simd.hpp
  for (std::int32_t t = 0; t < T; ++t)
    for (std::int32_t g = 0; g < G; ++g) {
      float r = sum[t * G + g];
      for (std::int32_t e = d; e < D; ++e) r += q[g * D + e] * static_cast<float>(rows[t][e]);
      s[g * tile_tokens + t] = r;
    }
}

/// Prefetches the D elements of row r.
template <class R>
KVC_FORCEINLINE void prefetch_row(R* r, std::int32_t D) noexcept {
  const char* p = reinterpret_cast<const char*>(r);
  const std::size_t bytes = sizeof(R) * static_cast<std::size_t>(D);
  for (std::size_t b = 0; b < bytes; b += 64) prefetch_read(p + b);
}

/// Scores of the tn rows of a tile for G heads, acc_regs / G tokens at a time. Prefetches rows
/// pk[0..pn) and pv[0..pn) of a later tile along the way, a few lines per block, so the misses
/// overlap the arithmetic instead of arriving in one burst.
template <class Arch, std::int32_t G, class R, class PK, class PV>
KVC_FORCEINLINE void score_tile(const float* q, R* const* rows, std::int32_t tn, std::int32_t D, float* s,
                                PK* const* pk, PV* const* pv, std::int32_t pn) noexcept {
  constexpr std::int32_t TK = G >= acc_regs ? 1 : acc_regs / G;
  std::int32_t i = 0;
  for (; i + TK <= tn; i += TK) {
    for (std::int32_t t = i; t < i + TK && t < pn; ++t) {
      prefetch_row(pk[t], D);
      prefetch_row(pv[t], D);
    }
    score_block<Arch, G, TK>(q, rows + i, D, s + i);
  }
  for (; i < tn; ++i) {
    if (i < pn) {
      prefetch_row(pk[i], D);
      prefetch_row(pv[i], D);
    }
    score_block<Arch, G, 1>(q, rows + i, D, s + i);
  }
}

/// acc_g[d .. d + C*W) += sum_i p[g * tile_tokens + i] * rows[i][d .. d + C*W) with the G x C
/// accumulators in registers over all rows of the tile.
template <class Arch, std::int32_t G, std::int32_t C, class R>
KVC_FORCEINLINE void accumulate_chunk(const float* p, R* const* rows, std::int32_t tn, std::int32_t D, std::int32_t d,
                                      float* acc) noexcept {
  using B = fbatch<Arch>;
  constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
  B a[G][C];
  for (std::int32_t g = 0; g < G; ++g)
    for (std::int32_t c = 0; c < C; ++c) a[g][c] = B::load_unaligned(acc + g * D + d + c * W);
  for (std::int32_t i = 0; i < tn; ++i) {
    B v[C];
    for (std::int32_t c = 0; c < C; ++c) v[c] = load_as_float<Arch>(rows[i] + d + c * W);
    for (std::int32_t g = 0; g < G; ++g) {
      const B pg(p[g * tile_tokens + i]);
      for (std::int32_t c = 0; c < C; ++c) a[g][c] = xsimd::fma(pg, v[c], a[g][c]);
    }
  }
  for (std::int32_t g = 0; g < G; ++g)
    for (std::int32_t c = 0; c < C; ++c) a[g][c].store_unaligned(acc + g * D + d + c * W);
}

/// acc_g += sum_i p[g * tile_tokens + i] * rows[i] for the G heads of a group: chunks of d outer,
/// the tile's rows inner, so the accumulators stay in registers (the rows stay in L1).
template <class Arch, std::int32_t G, class R>
KVC_FORCEINLINE void accumulate_tile(const float* p, R* const* rows, std::int32_t tn, std::int32_t D,
                                     float* acc) noexcept {
  constexpr std::int32_t W = static_cast<std::int32_t>(fbatch<Arch>::size);
  constexpr std::int32_t C = G >= acc_regs ? 1 : acc_regs / G;
  std::int32_t d = 0;
  for (; d + C * W <= D; d += C * W) accumulate_chunk<Arch, G, C>(p, rows, tn, D, d, acc);
  for (; d + W <= D; d += W) accumulate_chunk<Arch, G, 1>(p, rows, tn, D, d, acc);
  for (; d < D; ++d)
    for (std::int32_t i = 0; i < tn; ++i)
      for (std::int32_t g = 0; g < G; ++g) acc[g * D + d] += p[g * tile_tokens + i] * static_cast<float>(rows[i][d]);
}

/// Attention of G pre-scaled query heads over tokens [t0, t1) of head hi. Updates st; when raw
/// is non-null, writes e^(s - m_i) to raw[g * raw_stride + t - t0] for the scaled score s of token
/// t in tile i (tiles of tile_tokens from t0) and the running maximum m_i that tile was exp'd
/// against to tile_max[g * tile_max_stride + i]: the very values the online softmax computes, so
/// the probabilities later cost one multiply per score (tile_probs). scratch holds
/// tile_tokens * D floats when K or V rows are not plain (null otherwise).
template <class Arch, std::int32_t G, class KView, class VView>
void attend_range(const KView& K, const VView& V, std::int32_t hi, std::int32_t t0, std::int32_t t1,
                  const float* q, std::int32_t D, partial& st, float* raw, std::int32_t raw_stride,
                  float* tile_max, std::int32_t tile_max_stride, float* scratch) {
  constexpr bool plain = rows_are_plain_v<KView> && rows_are_plain_v<VView>;
  alignas(64) float s[G * tile_tokens];
  row_t<KView>* krows[tile_tokens];
  row_t<VView>* vrows[tile_tokens];
  row_t<KView>* pk[tile_tokens] = {};  // rows of the tile being prefetched
  row_t<VView>* pv[tile_tokens] = {};
  for (std::int32_t ts = t0; ts < t1; ts += tile_tokens) {
    const std::int32_t tn = std::min(tile_tokens, t1 - ts);
    tile_rows(K, hi, ts, tn, krows, scratch);
    std::int32_t pn = 0;
    if constexpr (plain) {
      const std::int32_t tp = ts + prefetch_tiles * tile_tokens;
      if (tp < t1) {
        pn = std::min(tile_tokens, t1 - tp);
        tile_rows(K, hi, tp, pn, pk, scratch);
        tile_rows(V, hi, tp, pn, pv, scratch);
      }
    }
    score_tile<Arch, G>(q, krows, tn, D, s, pk, pv, pn);
    for (std::int32_t g = 0; g < G; ++g) {
      float* sg = s + g * tile_tokens;
      if (tn == tile_tokens) softmax_tile<Arch>(sg, tile_tokens, st.m[g], st.l[g], st.acc + g * D, D);
      else softmax_tile<Arch>(sg, tn, st.m[g], st.l[g], st.acc + g * D, D);
      const float m_new = st.m[g];
      if (raw) {
        // A whole tile is a fixed-size copy in explicit SIMD moves. std::copy of a run-time length
        // was a memmove call per tile and head; a plain fixed-length loop was compiled by GCC 12
        // into 16 scalar loads and inserts per head and tile, which was half the cost of the
        // probabilities: group_probs over plain decode at 9x3x64 (one thread, CPU time, 2026-11)
        // 0.071 -> 0.033 at 32k tokens and 0.063 -> 0.022 at 4k.
        float* dst = raw + static_cast<std::size_t>(g) * raw_stride + (ts - t0);
        if (tn == tile_tokens)
          for (std::int32_t i = 0; i < tile_tokens; i += static_cast<std::int32_t>(fbatch<Arch>::size))
            fbatch<Arch>::load_aligned(sg + i).store_unaligned(dst + i);
        else
          for (std::int32_t i = 0; i < tn; ++i) dst[i] = sg[i];
        tile_max[static_cast<std::size_t>(g) * tile_max_stride + (ts - t0) / tile_tokens] = m_new;
      }
    }
    tile_rows(V, hi, ts, tn, vrows, scratch);
    accumulate_tile<Arch, G>(s, vrows, tn, D, st.acc);
  }
}

template <class Arch, class KView, class VView>
void attend_range_dispatch(std::int32_t G, const KView& K, const VView& V, std::int32_t hi, std::int32_t t0,
                           std::int32_t t1, const float* q, std::int32_t D, partial& st, float* raw,
                           std::int32_t raw_stride, float* tile_max, std::int32_t tile_max_stride, float* scratch) {
  switch (G) {
#define KVC_CASE(N) \
  case N: return attend_range<Arch, N>(K, V, hi, t0, t1, q, D, st, raw, raw_stride, tile_max, tile_max_stride, scratch);
    KVC_CASE(1) KVC_CASE(2) KVC_CASE(3) KVC_CASE(4) KVC_CASE(5) KVC_CASE(6) KVC_CASE(7) KVC_CASE(8)
#undef KVC_CASE
    default: KVC_ASSERT(false);
  }
}

/// Number of tiles of tokens [t0, t1).
inline std::int32_t tile_count(std::int32_t t0, std::int32_t t1) noexcept {
  return t1 > t0 ? (t1 - t0 + tile_tokens - 1) / tile_tokens : 0;
}

/// Probabilities of one task from what attend_range left: raw + g * raw_stride holds e^(s - m_i)
/// for the n tokens of the task, tm[g * tile_count(0, n) + i] the maximum m_i of tile i, lse[g] the
/// head's final log-sum-exp. p = e^(s - lse) = raw * e^(m_i - lse): one exp per tile and head
/// (vectorised over the tiles, in place in tm), one multiply per score, instead of keeping raw
/// scores and exp'ing every one again once lse is known. Writes p back into raw when in_place;
/// sums it over the gn heads into gp[0, n) when gp is set (overwriting when gp_fresh, else
/// adding), a whole tile's sums in registers.
template <class Arch>
void tile_probs(float* raw, std::size_t raw_stride, std::int32_t n, float* tm, const float* lse, std::int32_t gn,
                bool in_place, float* gp, bool gp_fresh) noexcept {
  using B = fbatch<Arch>;
  constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
  constexpr std::int32_t NB = tile_tokens / W;
  static_assert(tile_tokens % W == 0, "a tile is whole SIMD batches");
  const std::int32_t nt = tile_count(0, n);
  for (std::int32_t g = 0; g < gn; ++g) {
    float* c = tm + static_cast<std::size_t>(g) * nt;
    for (std::int32_t i = 0; i < nt; ++i) c[i] -= lse[g];
    exp_inplace<Arch>(c, nt);
  }
  const std::int32_t full = n / tile_tokens;
  for (std::int32_t i = 0; i < full; ++i) {
    const std::int32_t ts = i * tile_tokens;
    B acc[NB];
    for (std::int32_t j = 0; j < NB; ++j) acc[j] = B(0.0f);
    for (std::int32_t g = 0; g < gn; ++g) {
      const B cb(tm[static_cast<std::size_t>(g) * nt + i]);
      float* r = raw + static_cast<std::size_t>(g) * raw_stride + ts;
      for (std::int32_t j = 0; j < NB; ++j) {
        const B p = cb * B::load_unaligned(r + j * W);
        if (in_place) p.store_unaligned(r + j * W);
        acc[j] += p;
      }
    }
    if (gp)
      for (std::int32_t j = 0; j < NB; ++j)
        (gp_fresh ? acc[j] : acc[j] + B::load_unaligned(gp + ts + j * W)).store_unaligned(gp + ts + j * W);
  }
  if (full < nt) {  // the last, partial tile
    const std::int32_t ts = full * tile_tokens;
    for (std::int32_t g = 0; g < gn; ++g) {
      const float cf = tm[static_cast<std::size_t>(g) * nt + full];
      float* r = raw + static_cast<std::size_t>(g) * raw_stride + ts;
      for (std::int32_t j = 0; j < n - ts; ++j) {
        const float p = cf * r[j];
        if (in_place) r[j] = p;
        if (gp) gp[ts + j] = (gp_fresh && g == 0) ? p : gp[ts + j] + p;
      }
    }
  }
}

/// The checks of one sequence's heads and queries (prefix names the sequence in a batch): kv
/// heads and query heads, finite queries, K and V of equal length and head_dim, at least one token.
/// Returns the longest stream.
template <class Heads>
std::int32_t check_heads(const Heads& heads, const float* q, std::int32_t num_q_heads, const char* who,
                         const std::string& prefix) {
  static_assert(!has_log_weights_v<Heads>,
                "kvc::cpu::decode_attention: these heads carry per-token log-weights (a merged cache's layer); "
                "this kernel would ignore them: call kvc::cpu::merged_decode_attention(cache, seq, layer, ...) "
                "(or include <kvc/cpu/merged_attention.hpp>, whose decode_attention takes a merged layer)");
  const std::int32_t hkv = heads.num_kv_heads(), D = heads.head_dim();
  KVC_EXPECTS_IN(who, hkv > 0, prefix, "num_kv_heads = ", hkv, ", expected > 0");
  KVC_EXPECTS_IN(who, num_q_heads > 0 && num_q_heads % hkv == 0, prefix, "num_q_heads = ", num_q_heads,
                 ", expected a positive multiple of num_kv_heads = ", hkv);
  for (std::int32_t i = 0; i < num_q_heads * D; ++i)
    KVC_EXPECTS_IN(who, std::isfinite(q[i]), prefix, "q[", i, "] = ", q[i], ", expected a finite query");
  std::int32_t longest = 0;
  for (std::int32_t h = 0; h < hkv; ++h) {
    KVC_EXPECTS_IN(who, heads.keys(h).extent(0) == heads.values(h).extent(0), prefix, "head ", h, ": ",
                   heads.keys(h).extent(0), " keys but ", heads.values(h).extent(0), " values");
    KVC_EXPECTS_IN(who, heads.keys(h).extent(2) == D && heads.values(h).extent(2) == D, prefix, "head ", h,
                   ": view head_dim differs from head_dim = ", D);
    longest = std::max<std::int32_t>(longest, static_cast<std::int32_t>(heads.keys(h).extent(0)));
  }
  // Zeros with lse = -inf for an empty head is the softmax over no tokens (a head whose tokens were
  // all evicted), but when no head holds a token the call attends to nothing: the caller forgot
  // to append this step's K/V, or passed the wrong layer or sequence. Silence would hand the
  // model zeros as if they were attention.
  KVC_EXPECTS_IN(who, longest > 0, prefix, "every one of the ", hkv,
                 " kv heads holds 0 tokens, expected at least one token to attend to (append this step's K/V "
                 "before attending)");
  return longest;
}

}  // namespace detail

/// Decode attention for one sequence and one layer.
/// \tparam Heads  num_kv_heads(), head_dim(), keys(h), values(h), index(h): a kv_cache layer
///                (kv_cache::layer) or kvc::same_heads over one multi-head engine view
/// \param q    [num_q_heads][head_dim] queries (RoPE already applied when keys are stored rotated)
/// \param out  [num_q_heads][head_dim]
/// \pre num_q_heads is a multiple of num_kv_heads; q is finite (checked: kvc::error)
template <class Arch = default_arch, class Heads>
void decode_attention(const Heads& heads, const float* q, std::int32_t num_q_heads, float* out,
                      const decode_options& opt = {}) {
  using KView = std::decay_t<decltype(heads.keys(0))>;
  using VView = std::decay_t<decltype(heads.values(0))>;
  static_assert(std::is_same<typename KView::memory_space, host_memory>::value &&
                    std::is_same<typename VView::memory_space, host_memory>::value,
                "kvc::cpu::decode_attention: these views live in device memory; include <kvc/cuda.cuh> "
                "in a .cu file, link kvc::cuda and call kvc::cuda::decode_attention");
  const std::int32_t hkv = heads.num_kv_heads(), D = heads.head_dim();
  KVC_EXPECTS_IN(detail::api_name, q != nullptr && out != nullptr, "q or out is null");
  const std::int32_t longest = detail::check_heads(heads, q, num_q_heads, detail::api_name, "");
  const std::int32_t G = num_q_heads / hkv;
  const bool want_probs = opt.probs || opt.group_probs;
  KVC_EXPECTS_IN(detail::api_name, !want_probs || opt.probs_stride >= longest, "probs_stride = ", opt.probs_stride,
                 ", expected >= the longest stream (", longest, " tokens)");
  const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));

  // Scaled queries, so scores come out of the dot product ready for the softmax.
  std::vector<float> qs(static_cast<std::size_t>(num_q_heads) * D);
  for (std::size_t i = 0; i < qs.size(); ++i) qs[i] = q[i] * scale;
  // Split-K plan: tasks are (kv head, group block, token range).
  const std::int32_t threads = opt.pool ? opt.pool->size() : 1;
  std::int32_t chunk = opt.split_tokens;
  if (chunk <= 0) {
    // Serial: no split. Threaded: a few tasks per thread, their count a multiple of the threads
    // (the pool hands tasks out dynamically, but equal streams then end together), whole tiles,
    // never below 512 tokens a task so the merge and task overhead stay under 1% of the work.
    // bench_decode fp16 9x3x64 ctx:32768 threads:2 (2026-11): 18 tasks of 6144 tokens 1.3x the
    // speed of the former 9 of 12288 (one thread idle for the last third).
    if (threads == 1) {
      chunk = std::numeric_limits<std::int32_t>::max();
    } else {
      const std::int64_t units = std::int64_t{hkv} * ((G + detail::max_group - 1) / detail::max_group);
      std::int64_t splits = (4 * threads + units - 1) / units;
      while ((units * splits) % threads != 0) ++splits;
      const std::int64_t per = std::max<std::int64_t>(1, (longest + splits - 1) / splits);
      chunk = static_cast<std::int32_t>(std::max<std::int64_t>(
          512, (per + detail::tile_tokens - 1) / detail::tile_tokens * detail::tile_tokens));
    }
  }
  struct task {
    std::int32_t h, g0, gn, t0, t1;
  };
  std::vector<task> tasks;
  for (std::int32_t h = 0; h < hkv; ++h) {
    const std::int32_t n = static_cast<std::int32_t>(heads.keys(h).extent(0));
    for (std::int32_t g0 = 0; g0 < G; g0 += detail::max_group) {
      const std::int32_t gn = std::min(detail::max_group, G - g0);
      if (n == 0) tasks.push_back({h, g0, gn, 0, 0});
      for (std::int32_t t0 = 0; t0 < n; t0 += chunk) tasks.push_back({h, g0, gn, t0, static_cast<std::int32_t>(std::min<std::int64_t>(n, std::int64_t{t0} + chunk))});
    }
  }
  const std::size_t nt = tasks.size();
  // Probabilities. A task that is the whole of its (head, group block) knows its heads' lse as
  // soon as it ends (the merge of one partial state is m + log l, bit for bit), so it finishes its
  // probabilities at once, while its scores are still in cache; for group_probs alone its scores
  // then need only a per-thread buffer of gn x n, reused task after task, instead of a
  // num_q_heads x longest one that goes out to memory and back. Split tasks (and group blocks of
  // groups above max_group, which share a group_probs row) finish after the merge, serially, from
  // the buffer below. bench_evict probs_ratio (group_probs alone, one thread, CPU time, median of
  // 3, 2026-11 dev VM) at ctx 4096 / 32768: raw scores exp'd again after the merge 0.18 / 0.12-0.24
  // (32x8x128) and 0.21-0.24 / 0.24-0.29 (9x3x64); this scheme 0.04-0.05 / 0.04-0.06 and
  // 0.06 / 0.07-0.09.
  const bool in_place = opt.probs != nullptr;
  std::vector<unsigned char> eager(nt, 0);
  std::vector<std::size_t> tile_off(want_probs ? nt : 0);
  std::size_t tiles = 0;
  bool deferred = false;
  if (want_probs) {
    for (std::size_t i = 0; i < nt; ++i) {
      const task& tk = tasks[i];
      const std::int32_t n = static_cast<std::int32_t>(heads.keys(tk.h).extent(0));
      eager[i] = tk.t0 == 0 && tk.t1 == n && (!opt.group_probs || tk.gn == G);
      deferred |= !eager[i];
      tile_off[i] = tiles;
      tiles += static_cast<std::size_t>(tk.gn) * detail::tile_count(tk.t0, tk.t1);
    }
  }
  // Per task, the running maximum each tile was exp'd against ([gn][tiles]). Per-thread buffers
  // that only grow: a fresh num_q_heads x longest allocation per step (4 MiB at 32k) cost more
  // than the decode-time scorers themselves (bench_evict h2o, 2026-11).
  thread_local std::vector<float> tile_max_buf, deferred_buf;
  if (tile_max_buf.size() < tiles) tile_max_buf.resize(tiles);
  float* const tile_max = tile_max_buf.data();
  // Where deferred tasks leave their scores: the caller's probs, or [num_q_heads][longest].
  float* raw_base = opt.probs;
  std::size_t raw_stride = static_cast<std::size_t>(opt.probs_stride);
  if (want_probs && !in_place && deferred) {
    const std::size_t need = static_cast<std::size_t>(num_q_heads) * longest;
    if (deferred_buf.size() < need) deferred_buf.resize(need);
    raw_base = deferred_buf.data();
    raw_stride = static_cast<std::size_t>(longest);
  }
  std::vector<float> accs(nt * detail::max_group * static_cast<std::size_t>(D), 0.0f);
  std::vector<detail::partial> parts(nt);
  auto run = [&](std::int32_t i) {
    const std::size_t k = static_cast<std::size_t>(i);
    const task& tk = tasks[k];
    detail::partial& st = parts[k];
    detail::start_partial(st, accs.data() + k * detail::max_group * D);
    if (tk.t1 <= tk.t0) return;
    std::vector<float> scratch = detail::tile_scratch<KView, VView>(D);
    const std::int32_t qh0 = tk.h * G + tk.g0, n = tk.t1 - tk.t0;
    float* raw = nullptr;
    std::size_t stride = raw_stride;
    thread_local std::vector<float> task_buf;  // an eager task's scores for group_probs alone
    if (want_probs) {
      if (in_place || !eager[k]) {
        raw = raw_base + static_cast<std::size_t>(qh0) * raw_stride + tk.t0;
      } else {
        stride = static_cast<std::size_t>(n);
        if (task_buf.size() < static_cast<std::size_t>(tk.gn) * stride) task_buf.resize(static_cast<std::size_t>(tk.gn) * stride);
        raw = task_buf.data();
      }
    }
    const std::int32_t nt_k = detail::tile_count(tk.t0, tk.t1);
    float* tm = want_probs ? tile_max + tile_off[k] : nullptr;
    detail::attend_range_dispatch<Arch>(tk.gn, heads.keys(tk.h), heads.values(tk.h), heads.index(tk.h), tk.t0,
                                        tk.t1, qs.data() + static_cast<std::size_t>(qh0) * D, D, st, raw,
                                        static_cast<std::int32_t>(stride), tm, nt_k, scratch.data());
    if (want_probs && eager[k]) {
      float lse_k[detail::max_group];
      for (std::int32_t g = 0; g < tk.gn; ++g) lse_k[g] = st.m[g] + std::log(st.l[g]);  // merge_partials' value
      float* gp = opt.group_probs ? opt.group_probs + static_cast<std::size_t>(tk.h) * opt.probs_stride : nullptr;
      detail::tile_probs<Arch>(raw, stride, n, tm, lse_k, tk.gn, in_place, gp, true);
    }
  };
  if (opt.pool && nt > 1) opt.pool->parallel_for(static_cast<std::int32_t>(nt), run);
  else
    for (std::size_t i = 0; i < nt; ++i) run(static_cast<std::int32_t>(i));

  // Exact merge of the partial states of each (head, group block), in token order.
  std::vector<float> lse(static_cast<std::size_t>(num_q_heads), -INFINITY);
  detail::merge_partials(tasks, parts, G, D, out, lse, [](float*) {});
  if (opt.lse) std::copy(lse.begin(), lse.end(), opt.lse);
  if (deferred) {
    // Tasks are ordered by head, then group block, then tokens, so the first group block of a head
    // writes its group_probs rows before later blocks add to them.
    for (std::size_t k = 0; k < nt; ++k) {
      const task& tk = tasks[k];
      if (eager[k] || tk.t1 <= tk.t0) continue;
      const std::int32_t qh0 = tk.h * G + tk.g0;
      float* gp = opt.group_probs ? opt.group_probs + static_cast<std::size_t>(tk.h) * opt.probs_stride + tk.t0 : nullptr;
      detail::tile_probs<Arch>(raw_base + static_cast<std::size_t>(qh0) * raw_stride + tk.t0, raw_stride, tk.t1 - tk.t0,
                               tile_max + tile_off[k], lse.data() + qh0, tk.gn, in_place, gp, tk.g0 == 0);
    }
  }
}

/// Decode attention over one layer of one sequence of a kvc cache (any cache with
/// `layer(seq, layer, buffer)`).
template <class Arch = default_arch, class Cache, class Seq,
          class = decltype(std::declval<const Cache&>().layer(Seq{}, 0, std::declval<std::vector<typename Cache::view_type>&>()))>
void decode_attention(const Cache& cache, Seq seq, std::int32_t layer, const float* q, std::int32_t num_q_heads,
                      float* out, const decode_options& opt = {}) {
  detail::check_seq_layer(cache, seq, layer, detail::api_name);
  std::vector<typename Cache::view_type> buf;
  const auto heads = cache.layer(seq, layer, buf);
  std::int64_t held = 0;
  for (std::int32_t h = 0; h < heads.num_kv_heads(); ++h) held += heads.keys(h).extent(0);
  KVC_EXPECTS_IN(detail::api_name, held > 0, "seq = ", seq, ", layer = ", layer,
                 " holds 0 tokens in all its kv heads, expected at least one token to attend to (append this "
                 "step's K/V to the layer before attending)");
  decode_attention<Arch>(heads, q, num_q_heads, out, opt);
}

/// Decode attention for a batch of sequences at one layer: an engine's continuous batch, one
/// query token per query head of each sequence, each sequence with its own (ragged) stream
/// lengths. One plan for the whole batch: tasks are (sequence, kv head, group block, token range),
/// bundled per sequence and handed to opt.pool's threads longest bundle first, so a batch of short
/// sequences keeps every thread busy without splitting any of them, and a long sequence among
/// short ones is split only as much as the balance needs. The result of each sequence is the one decode_attention gives it
/// (the same formula; split points may differ, so the rounding may too).
/// \param batch  n heads objects (see decode_attention), all with the same num_kv_heads and head_dim
/// \param q      [n][num_q_heads][head_dim] queries;  out: the same shape
/// \param opt    scale, pool, split_tokens, lse ([n][num_q_heads]); no probabilities: a batched
///               call refuses probs and group_probs (the scorers read them per sequence)
template <class Arch = default_arch, class Heads>
void decode_attention_batch(const Heads* batch, std::int32_t n, const float* q, std::int32_t num_q_heads, float* out,
                            const decode_options& opt = {}) {
  using KView = std::decay_t<decltype(batch[0].keys(0))>;
  using VView = std::decay_t<decltype(batch[0].values(0))>;
  static_assert(std::is_same<typename KView::memory_space, host_memory>::value &&
                    std::is_same<typename VView::memory_space, host_memory>::value,
                "kvc::cpu::decode_attention_batch: these views live in device memory; a batched CUDA decode "
                "does not exist yet: call kvc::cuda::decode_attention per sequence");
  constexpr const char* who = "kvc::cpu::decode_attention_batch";
  KVC_EXPECTS_IN(who, n > 0, "n = ", n, ", expected at least one sequence in the batch");
  KVC_EXPECTS_IN(who, batch != nullptr && q != nullptr && out != nullptr, "batch, q or out is null");
  KVC_EXPECTS_IN(who, !opt.probs && !opt.group_probs,
                 "opt.probs or opt.group_probs is set, expected neither: a batched call returns no probabilities "
                 "(call kvc::cpu::decode_attention per sequence for them)");
  const std::int32_t hkv = batch[0].num_kv_heads(), D = batch[0].head_dim();
  KVC_EXPECTS_IN(who, D > 0, "head_dim = ", D, ", expected > 0");
  const std::size_t q_stride = static_cast<std::size_t>(num_q_heads) * D;
  std::int64_t total = 0;
  for (std::int32_t b = 0; b < n; ++b) {
    const std::string prefix = ::kvc::detail::concat("batch[", b, "]: ");
    KVC_EXPECTS_IN(who, batch[b].num_kv_heads() == hkv && batch[b].head_dim() == D, prefix, "num_kv_heads = ",
                   batch[b].num_kv_heads(), ", head_dim = ", batch[b].head_dim(), ", expected ", hkv, " and ", D,
                   " as batch[0] (one layer of one model)");
    detail::check_heads(batch[b], q + b * q_stride, num_q_heads, who, prefix);
    for (std::int32_t h = 0; h < hkv; ++h) total += batch[b].keys(h).extent(0);
  }
  const std::int32_t G = num_q_heads / hkv;
  const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> qs(static_cast<std::size_t>(n) * q_stride);
  for (std::size_t i = 0; i < qs.size(); ++i) qs[i] = q[i] * scale;

  // Plan. Serial: no split. Threaded: tasks of at most total / (4 x threads) token rows (whole
  // tiles, never below 512: the per-task merge and overhead stay under 1%), so that with the
  // longest bundles of them handed out first the threads end together.
  const std::int32_t threads = opt.pool ? opt.pool->size() : 1;
  std::int64_t chunk = opt.split_tokens;
  if (chunk <= 0)
    chunk = threads == 1 ? std::numeric_limits<std::int32_t>::max()
                         : std::max<std::int64_t>(512, (total / (4 * threads) + detail::tile_tokens - 1) /
                                                           detail::tile_tokens * detail::tile_tokens);
  struct task {
    std::int32_t b, h, g0, gn, t0, t1;
  };
  std::vector<task> tasks;
  std::vector<std::size_t> first(static_cast<std::size_t>(n) + 1);  // sequence b's tasks: [first[b], first[b+1])
  for (std::int32_t b = 0; b < n; ++b) {
    first[static_cast<std::size_t>(b)] = tasks.size();
    for (std::int32_t h = 0; h < hkv; ++h) {
      const std::int32_t len = static_cast<std::int32_t>(batch[b].keys(h).extent(0));
      for (std::int32_t g0 = 0; g0 < G; g0 += detail::max_group) {
        const std::int32_t gn = std::min(detail::max_group, G - g0);
        if (len == 0) tasks.push_back({b, h, g0, gn, 0, 0});
        for (std::int64_t t0 = 0; t0 < len; t0 += chunk)
          tasks.push_back({b, h, g0, gn, static_cast<std::int32_t>(t0),
                           static_cast<std::int32_t>(std::min<std::int64_t>(len, t0 + chunk))});
      }
    }
  }
  first[static_cast<std::size_t>(n)] = tasks.size();
  const std::size_t nt = tasks.size();
  // Bundles: runs of consecutive tasks of one sequence, up to `chunk` rows each, run by one
  // thread in turn, longest bundle first. A thread then walks one sequence's pages rather than
  // two threads taking turns on its heads: 16 sequences of 4k tokens on 2 threads (bench
  // decode_batch, 2026-12) scaled 1.75-1.84x with one task per scheduling unit against
  // 1.87-1.98x with whole sequences per thread.
  struct bundle {
    std::size_t begin, end;
    std::int64_t rows;
  };
  std::vector<bundle> bundles;
  for (std::size_t i = 0; i < nt; ++i) {
    const std::int64_t rows = tasks[i].t1 - tasks[i].t0;
    if (bundles.empty() || tasks[bundles.back().begin].b != tasks[i].b || bundles.back().rows + rows > chunk)
      bundles.push_back({i, i + 1, rows});
    else
      bundles.back().end = i + 1, bundles.back().rows += rows;
  }
  if (threads > 1)
    std::stable_sort(bundles.begin(), bundles.end(), [](const bundle& a, const bundle& c) { return a.rows > c.rows; });
  // Accumulators are zeroed by the task that owns them, on its thread, not up front: for 64
  // sequences of 512 tokens they are 2 MiB, a serial memset of the same order as a thread's share.
  const std::unique_ptr<float[]> accs(new float[nt * detail::max_group * static_cast<std::size_t>(D)]);
  std::vector<detail::partial> parts(nt);
  auto run = [&](std::size_t k) {
    const task& tk = tasks[k];
    detail::partial& st = parts[k];
    detail::start_partial(st, accs.get() + k * detail::max_group * D);
    std::fill(st.acc, st.acc + static_cast<std::size_t>(tk.gn) * D, 0.0f);
    if (tk.t1 <= tk.t0) return;
    std::vector<float> scratch = detail::tile_scratch<KView, VView>(D);
    const Heads& heads = batch[tk.b];
    detail::attend_range_dispatch<Arch>(tk.gn, heads.keys(tk.h), heads.values(tk.h), heads.index(tk.h), tk.t0,
                                        tk.t1,
                                        qs.data() + tk.b * q_stride + static_cast<std::size_t>(tk.h * G + tk.g0) * D,
                                        D, st, nullptr, 0, nullptr, 0, scratch.data());
  };
  auto run_bundle = [&](std::int32_t i) {
    const bundle& u = bundles[static_cast<std::size_t>(i)];
    for (std::size_t k = u.begin; k < u.end; ++k) run(k);
  };
  if (opt.pool && bundles.size() > 1) opt.pool->parallel_for(static_cast<std::int32_t>(bundles.size()), run_bundle);
  else
    for (std::size_t i = 0; i < bundles.size(); ++i) run_bundle(static_cast<std::int32_t>(i));

  // Exact merge of each sequence's partial states (tasks of one sequence are contiguous and in
  // token order within each (kv head, group block)); sequences are independent.
  auto merge = [&](std::int32_t b) {
    std::vector<float> lse(static_cast<std::size_t>(num_q_heads), -INFINITY);
    const std::size_t f = first[static_cast<std::size_t>(b)], e = first[static_cast<std::size_t>(b) + 1];
    detail::merge_partials(tasks.data() + f, parts.data() + f, e - f, G, D, out + b * q_stride, lse, [](float*) {});
    if (opt.lse) std::copy(lse.begin(), lse.end(), opt.lse + static_cast<std::size_t>(b) * num_q_heads);
  };
  if (opt.pool && n > 1) opt.pool->parallel_for(n, merge);
  else
    for (std::int32_t b = 0; b < n; ++b) merge(b);
}

/// decode_attention_batch over layer `layer` of the n sequences seqs of a kvc cache (any cache
/// with `layer(seq, layer, buffer)`). A sequence may appear more than once.
template <class Arch = default_arch, class Cache, class Seq,
          class = decltype(std::declval<const Cache&>().layer(Seq{}, 0, std::declval<std::vector<typename Cache::view_type>&>()))>
void decode_attention_batch(const Cache& cache, const Seq* seqs, std::int32_t n, std::int32_t layer, const float* q,
                            std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  constexpr const char* who = "kvc::cpu::decode_attention_batch";
  KVC_EXPECTS_IN(who, n > 0 && seqs != nullptr, "n = ", n, ", seqs = ", static_cast<const void*>(seqs),
                 ", expected at least one sequence");
  std::vector<std::vector<typename Cache::view_type>> bufs(static_cast<std::size_t>(n));
  using heads_type = decltype(cache.layer(seqs[0], layer, bufs[0]));
  std::vector<heads_type> batch;
  batch.reserve(static_cast<std::size_t>(n));
  for (std::int32_t b = 0; b < n; ++b) {
    detail::check_seq_layer(cache, seqs[b], layer, who);
    batch.push_back(cache.layer(seqs[b], layer, bufs[static_cast<std::size_t>(b)]));
  }
  decode_attention_batch<Arch>(batch.data(), n, q, num_q_heads, out, opt);
}

KVC_END_ISA_NAMESPACE
}  // namespace cpu
KVC_END_NAMESPACE
