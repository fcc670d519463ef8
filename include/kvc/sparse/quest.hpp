// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Quest (Tang et al., ICML 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
/// Inference"): a decode step reads only the pages whose keys can score high against this step's
/// query, and runs exact attention over them. Nothing is evicted: every token stays in the cache
/// and a later query may pick any page again. It is a read policy, not a compression.
///
/// Each stream keeps, for every page, the channel-wise min m and max M of its keys
/// (cache_config::key_bounds: one array beside the page table, kept exact by the store on
/// append, compaction and fork). For a query q, every key k of the page has
///     q·k = Σ_d q_d k_d <= Σ_d max(q_d m_d, q_d M_d) = q⁺·M + q⁻·m,
/// with q⁺ = max(q, 0) and q⁻ = min(q, 0): two dot products per page instead of page_size.
/// kvc's pages belong to one kv head, shared by the G query heads of its group (GQA), so a page
/// scores the largest bound over its group's heads: the page is read if any head of the group may
/// want it. (The paper is MHA, one query per page table; the max keeps its bound a bound for
/// every head.)
///
/// Per kv head the step reads the first `sink_pages` and the last `recent_pages` pages (attention
/// sinks; the newest tokens, which the paper's budget always covers too), then the best-bounded
/// of the other pages up to token_budget / page_size pages in all, and attends over them with
/// kvc::cpu::decode_attention (the same kernel, every ISA it has, split-K over the pool), reading
/// them in stream order. A stream that fits the budget is read whole.
///
/// Cost per kv head and step, against a full read of n tokens: n / page_size page bounds of
/// 2·G·D FMAs each, plus the budget's tokens. At 16-token pages that is 1/16 of the full q·k
/// arithmetic for the bounds, plus budget / n of the full read.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/simd.hpp>
#include <kvc/error.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/store/kv_cache.hpp>

KVC_BEGIN_NAMESPACE

/// How many pages a Quest read takes per kv head (the paper's token budget, in pages).
struct quest_options {
  /// Tokens read per kv head and step, rounded down to whole pages; the pages of sinks and of
  /// the newest tokens count in it. A stream of at most this many pages' tokens is read whole.
  std::int32_t token_budget = 2048;
  /// Leading pages always read (the attention sinks sit in the first tokens).
  std::int32_t sink_pages = 1;
  /// Trailing pages always read (the newest tokens, this step's own among them).
  std::int32_t recent_pages = 1;
};

namespace cpu {
KVC_BEGIN_ISA_NAMESPACE

namespace quest_detail {

inline constexpr const char* api_name = "kvc::cpu::quest_decode_attention";

/// Pages ahead whose bounds are prefetched while one is scored. 16k pages' contiguous fp16
/// bounds (8 x 2048 pages, D = 128, out of cache): 0.89 ms with 8 pages ahead, 1.35 ms with none
/// (AVX-512 VM, 2026-12-05; 0.52 ms from L3).
inline constexpr std::int32_t prefetch_pages = 8;

/// The larger of two bounds, a NaN one (0 x inf: a key too large for T, fp16 keeps 65504) as +inf:
/// such a page may hold anything, so it is read first. (std::max would drop the NaN.)
inline float fold_bound(float best, float s) noexcept {
  return std::isnan(s) ? std::numeric_limits<float>::infinity() : std::max(best, s);
}

/// The largest of the G query heads' bounds q_g⁺·M + q_g⁻·m over one page, from float copies
/// of the query halves (qp, qn: [G][D]). Channel-block outer, heads inner: a block of m and M is
/// converted once and read by every head of the group from registers (GN = G at compile time for
/// the group sizes models use, 0 = the run-time G).
template <class Arch, std::int32_t GN, class T>
float page_bound(const T* lo, const T* hi, const float* qp, const float* qn, std::int32_t G, std::int32_t D) noexcept {
  using B = fbatch<Arch>;
  constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
  if constexpr (GN == 0) {
    float best = -std::numeric_limits<float>::infinity();
    for (std::int32_t g = 0; g < G; ++g)
      best = fold_bound(best, page_bound<Arch, 1>(lo, hi, qp + static_cast<std::size_t>(g) * D,
                                                  qn + static_cast<std::size_t>(g) * D, 1, D));
    return best;
  } else {
    // Two chains per head (q⁺·M and q⁻·m): one chain of both would make the FMA latency, not
    // its throughput, the bound at G = 4 (bench_quest select_cpu_ms, 32x8x128 32k).
    B up[GN], dn[GN];
    for (std::int32_t g = 0; g < GN; ++g) up[g] = B(0.0f), dn[g] = B(0.0f);
    std::int32_t d = 0;
    for (; d + W <= D; d += W) {
      const B m = load_as_float<Arch>(lo + d), M = load_as_float<Arch>(hi + d);
      for (std::int32_t g = 0; g < GN; ++g) {
        up[g] = xsimd::fma(B::load_unaligned(qp + static_cast<std::size_t>(g) * D + d), M, up[g]);
        dn[g] = xsimd::fma(B::load_unaligned(qn + static_cast<std::size_t>(g) * D + d), m, dn[g]);
      }
    }
    float best = -std::numeric_limits<float>::infinity();
    for (std::int32_t g = 0; g < GN; ++g) {
      float s = reduce_add<Arch>(up[g] + dn[g]);
      for (std::int32_t e = d; e < D; ++e)
        s += qp[static_cast<std::size_t>(g) * D + e] * static_cast<float>(hi[e]) +
             qn[static_cast<std::size_t>(g) * D + e] * static_cast<float>(lo[e]);
      best = fold_bound(best, s);
    }
    return best;
  }
}

/// Bounds of W / GN pages at once (W = the batch width): one accumulator per (page, head), all
/// reduced by one transposed horizontal add instead of a reduction per head and page. bench_quest
/// 32x8x128 32k fp16 (AVX-512, 2026-12-05): select_cpu_ms 1.25-1.36 with a reduction each.
template <class Arch, std::int32_t GN, class T>
KVC_FORCEINLINE void page_tile_bounds(const T* b, const float* qp, const float* qn, std::int32_t D,
                                      float* score) noexcept {
  using B = fbatch<Arch>;
  constexpr std::int32_t W = static_cast<std::int32_t>(B::size), TP = W / GN;
  B acc[W];
  for (std::int32_t j = 0; j < W; ++j) acc[j] = B(0.0f);
  std::int32_t d = 0;
  for (; d + W <= D; d += W)
    for (std::int32_t p = 0; p < TP; ++p) {
      const T* lo = b + static_cast<std::size_t>(p) * 2 * D;
      const B m = load_as_float<Arch>(lo + d), M = load_as_float<Arch>(lo + D + d);
      for (std::int32_t g = 0; g < GN; ++g)
        acc[p * GN + g] = xsimd::fma(B::load_unaligned(qp + static_cast<std::size_t>(g) * D + d), M,
                                     xsimd::fma(B::load_unaligned(qn + static_cast<std::size_t>(g) * D + d), m,
                                                acc[p * GN + g]));
    }
  alignas(64) float sums[W];
  haddp<Arch>(acc).store_aligned(sums);
  for (std::int32_t p = 0; p < TP; ++p) {
    const T* lo = b + static_cast<std::size_t>(p) * 2 * D;
    float best = -std::numeric_limits<float>::infinity();
    for (std::int32_t g = 0; g < GN; ++g) {
      float s = sums[p * GN + g];
      for (std::int32_t e = d; e < D; ++e)
        s += qp[static_cast<std::size_t>(g) * D + e] * static_cast<float>(lo[D + e]) +
             qn[static_cast<std::size_t>(g) * D + e] * static_cast<float>(lo[e]);
      best = fold_bound(best, s);
    }
    score[p] = best;
  }
}

/// Every page's bound: score[i] for the bounds at b + i·2·D ([n][2][D], kv_cache::key_bounds).
template <class Arch, std::int32_t GN, class T>
void page_bounds(const T* b, std::int32_t n, const float* qp, const float* qn, std::int32_t G, std::int32_t D,
                 float* score) noexcept {
  constexpr std::int32_t W = static_cast<std::int32_t>(fbatch<Arch>::size);
  auto at = [&](std::int32_t i) { return b + static_cast<std::size_t>(i) * 2 * D; };
  for (std::int32_t i = 0; i < std::min(n, prefetch_pages); ++i) detail::prefetch_row(at(i), 2 * D);
  std::int32_t i = 0;
  if constexpr (GN > 0 && GN <= W && W % GN == 0) {
    constexpr std::int32_t TP = W / GN;
    for (; i + TP <= n; i += TP) {
      for (std::int32_t p = 0; p < TP; ++p)
        if (i + p + prefetch_pages < n) detail::prefetch_row(at(i + p + prefetch_pages), 2 * D);
      page_tile_bounds<Arch, GN>(at(i), qp, qn, D, score + i);
    }
  }
  for (; i < n; ++i) {
    if (i + prefetch_pages < n) detail::prefetch_row(at(i + prefetch_pages), 2 * D);
    score[i] = page_bound<Arch, GN>(at(i), at(i) + D, qp, qn, G, D);
  }
}

/// The checks quest_select and quest_decode_attention share, under the public call's name.
template <class T>
void check_args(const kv_cache<T>& cache, const float* q, std::int32_t G, const quest_options& opt, const char* who) {
  const std::int32_t P = cache.config().page_size, D = cache.config().head_dim;
  KVC_EXPECTS_IN(who, cache.has_key_bounds(), "the cache was built with cache_config.key_bounds = false, expected "
                 "true (Quest bounds each page by its keys' min and max)");
  KVC_EXPECTS_IN(who, G > 0, "G = ", G, ", expected > 0 query heads per kv head");
  KVC_EXPECTS_IN(who, q != nullptr, "q is null");
  KVC_EXPECTS_IN(who, opt.sink_pages >= 0, "quest_options.sink_pages = ", opt.sink_pages, ", expected >= 0");
  KVC_EXPECTS_IN(who, opt.recent_pages >= 1, "quest_options.recent_pages = ", opt.recent_pages,
                 ", expected >= 1 (the page with this step's token is always read)");
  const std::int64_t least = (std::int64_t{opt.sink_pages} + opt.recent_pages) * P;  // no int overflow
  KVC_EXPECTS_IN(who, opt.token_budget >= least, "quest_options.token_budget = ", opt.token_budget,
                 ", expected >= (sink_pages + recent_pages) x page_size = ", least, " tokens");
  for (std::int64_t i = 0; i < std::int64_t{G} * D; ++i)
    KVC_EXPECTS_IN(who, std::isfinite(q[i]), "q[", i, "] = ", q[i], ", expected a finite query");
}

}  // namespace quest_detail

/// The pages one kv head reads this step, as indices into its stream's page list, ascending.
/// \param q  [G][head_dim]: the query heads of the group (any positive scale: the order of the
///           bounds does not depend on it)
/// \param bounds  when not null, receives every page's bound ([pages of the stream]; sinks and
///                recent pages included)
template <class Arch = default_arch, class T>
std::vector<std::int32_t> quest_select(const kv_cache<T>& cache, seq_id seq, std::int32_t layer, std::int32_t head,
                                       const float* q, std::int32_t G, const quest_options& opt = {},
                                       std::vector<float>* bounds = nullptr) {
  quest_detail::check_args(cache, q, G, opt, "kvc::cpu::quest_select");
  const cache_config& cfg = cache.config();
  const std::int32_t P = cfg.page_size, D = cfg.head_dim;
  const std::int32_t budget_pages = opt.token_budget / P;
  const auto& pages = cache.pages(seq, layer, head);
  const std::int32_t n = static_cast<std::int32_t>(pages.size());
  std::vector<std::int32_t> chosen;
  if (bounds) bounds->assign(static_cast<std::size_t>(n), 0.0f);
  if (n <= budget_pages && !bounds) {
    chosen.resize(static_cast<std::size_t>(n));
    for (std::int32_t i = 0; i < n; ++i) chosen[static_cast<std::size_t>(i)] = i;
    return chosen;
  }
  std::vector<float> qp(static_cast<std::size_t>(G) * D), qn(qp.size());
  for (std::size_t i = 0; i < qp.size(); ++i) qp[i] = std::max(q[i], 0.0f), qn[i] = std::min(q[i], 0.0f);
  std::vector<float> score(static_cast<std::size_t>(n));
  const T* b = cache.key_bounds(seq, layer, head);
  switch (G) {
#define KVC_QUEST_G(g) \
  case g: quest_detail::page_bounds<Arch, g>(b, n, qp.data(), qn.data(), G, D, score.data()); break;
    KVC_QUEST_G(1) KVC_QUEST_G(2) KVC_QUEST_G(3) KVC_QUEST_G(4) KVC_QUEST_G(8)
#undef KVC_QUEST_G
    default: quest_detail::page_bounds<Arch, 0>(b, n, qp.data(), qn.data(), G, D, score.data());
  }
  if (bounds) bounds->assign(score.begin(), score.end());
  chosen.reserve(static_cast<std::size_t>(std::min(n, budget_pages)));
  if (n <= budget_pages) {
    for (std::int32_t i = 0; i < n; ++i) chosen.push_back(i);
    return chosen;
  }
  const std::int32_t first_recent = n - opt.recent_pages;
  const std::int32_t take = budget_pages - opt.sink_pages - opt.recent_pages;
  // The take-th highest bound of the middle pages, found on a copy of the floats (no index
  // indirection in the partition); then one pass in page order keeps every page above it and
  // the earliest pages equal to it, so the choice is deterministic.
  std::vector<float> mid(score.begin() + opt.sink_pages, score.begin() + first_recent);
  float thr = std::numeric_limits<float>::infinity();
  std::int32_t ties = 0;  // pages equal to thr still to take
  if (take > 0) {
    std::nth_element(mid.begin(), mid.begin() + (take - 1), mid.end(), std::greater<float>());
    thr = mid[static_cast<std::size_t>(take - 1)];
    ties = take;
    for (std::int32_t i = opt.sink_pages; i < first_recent; ++i) ties -= score[static_cast<std::size_t>(i)] > thr;
  }
  for (std::int32_t i = 0; i < opt.sink_pages; ++i) chosen.push_back(i);
  for (std::int32_t i = opt.sink_pages; i < first_recent; ++i) {
    const float x = score[static_cast<std::size_t>(i)];
    if (x > thr || (x == thr && ties-- > 0)) chosen.push_back(i);
  }
  for (std::int32_t i = first_recent; i < n; ++i) chosen.push_back(i);
  return chosen;
}

/// Decode attention for one layer of one sequence over the pages Quest picks per kv head
/// (quest_select), exact over the tokens of those pages.
/// \param q    [num_q_heads][head_dim], RoPE applied as the stored keys are
/// \param out  [num_q_heads][head_dim]
/// \param opt  scale, pool, split_tokens and lse as kvc::cpu::decode_attention takes them (lse is
///             over the tokens read); probs are refused: their indices would be a subset's
template <class Arch = default_arch, class T>
void quest_decode_attention(const kv_cache<T>& cache, seq_id seq, std::int32_t layer, const float* q,
                            std::int32_t num_q_heads, float* out, const quest_options& qopt = {},
                            const decode_options& opt = {}) {
  using quest_detail::api_name;
  const cache_config& cfg = cache.config();
  const std::int32_t H = cfg.num_kv_heads, D = cfg.head_dim, P = cfg.page_size;
  KVC_EXPECTS_IN(api_name, cache.contains(seq), "seq = ", seq, ", expected a live sequence id");
  KVC_EXPECTS_IN(api_name, layer >= 0 && layer < cfg.num_layers, "layer = ", layer, ", expected 0..",
                 cfg.num_layers - 1);
  KVC_EXPECTS_IN(api_name, num_q_heads > 0 && num_q_heads % H == 0, "num_q_heads = ", num_q_heads,
                 ", expected a positive multiple of num_kv_heads = ", H);
  KVC_EXPECTS_IN(api_name, q != nullptr && out != nullptr, "q or out is null");
  KVC_EXPECTS_IN(api_name, !opt.probs && !opt.group_probs,
                 "decode_options.probs/group_probs are set, expected none (a Quest read attends to a subset of "
                 "the pages; call kvc::cpu::decode_attention for per-token probabilities)");
  const std::int32_t G = num_q_heads / H;
  quest_detail::check_args(cache, q, num_q_heads, qopt, api_name);  // every query head: all groups at once
  std::vector<std::vector<page_id>> tables(static_cast<std::size_t>(H));
  std::vector<typename kv_cache<T>::view_type> views;
  views.reserve(static_cast<std::size_t>(2 * H));
  std::vector<std::int32_t> lengths(static_cast<std::size_t>(H));
  auto choose = [&](std::int32_t h) {
    const auto chosen = quest_select<Arch>(cache, seq, layer, h, q + static_cast<std::size_t>(h) * G * D, G, qopt);
    const auto& pages = cache.pages(seq, layer, h);
    const std::int32_t L = cache.length(seq, layer, h);
    auto& table = tables[static_cast<std::size_t>(h)];
    table.reserve(chosen.size());
    for (std::int32_t i : chosen) table.push_back(pages[static_cast<std::size_t>(i)]);
    // Every chosen page is full but the stream's last one, which is always chosen last.
    const std::int32_t m = static_cast<std::int32_t>(chosen.size());
    lengths[static_cast<std::size_t>(h)] = m == 0 ? 0 : (m - 1) * P + (L - (static_cast<std::int32_t>(pages.size()) - 1) * P);
  };
  // The bounds of a step are half of its work at a 2,048-token budget of 32k (bench_quest): with
  // a pool, kv heads choose in parallel (each writes only its own table and length).
  if (opt.pool && H > 1)
    opt.pool->parallel_for(H, choose);
  else
    for (std::int32_t h = 0; h < H; ++h) choose(h);
  for (std::int32_t h = 0; h < H; ++h)
    views.push_back(cache.page_keys(tables[static_cast<std::size_t>(h)].data(), lengths[static_cast<std::size_t>(h)]));
  for (std::int32_t h = 0; h < H; ++h)
    views.push_back(cache.page_values(tables[static_cast<std::size_t>(h)].data(), lengths[static_cast<std::size_t>(h)]));
  const stream_heads<typename kv_cache<T>::view_type> heads{views.data(), views.data() + H, H, D};
  decode_attention<Arch>(heads, q, num_q_heads, out, opt);
}

KVC_END_ISA_NAMESPACE
}  // namespace cpu
KVC_END_NAMESPACE
