// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Decode attention over a merged cache (kvc/store/merged_cache.hpp): token t's logit is
///
///   s_t = scale · q·k_t + lw_t,
///
/// lw_t its log-weight, so a token standing for m tokens gets m times the softmax mass of one
/// (exp(s + log m) = m·exp(s)): k identical tokens merged into one with lw = log k give the
/// same output as the k copies. With every lw = 0 this is cpu::decode_attention.
///
/// The per-token work is stream_detail::attend_stream (kvc/cpu/stream_attention.hpp), the tiled
/// online-softmax kernel the low-rank cache uses, with the log-weights as its per-token bias:
/// one stream per kv head, GQA (up to 8 query heads of a group per pass over the rows; larger
/// groups take several passes), head dims that are not a multiple of the SIMD width finish in
/// scalar code, kv heads spread over opt.pool. Decode gives the probability outputs
/// (opt.probs / group_probs, each token's share of the biased softmax); prefill rejects them.
/// Missing here: split-K over tokens (opt.split_tokens is ignored).
/// Threads: read-only on the cache. Compiled per ISA (docs/isa.md).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/simd.hpp>
#include <kvc/cpu/stream_attention.hpp>
#include <kvc/error.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/store/merged_cache.hpp>
#include <kvc/view/heads.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md

namespace merged_detail {

/// Queries [num_queries][num_q_heads][D] over one layer of a merged cache, query i seeing in
/// each stream the prefix of tokens at positions <= q_pos[i] (q_pos null: every token), each
/// logit raised by the token's log-weight: the one body of both entry points below.
template <class Arch, class T>
void attend(const merge::merged_cache<T>& cache, seq_id seq, std::int32_t layer, const float* q,
            std::int32_t num_queries, const std::int32_t* q_pos, std::int32_t num_q_heads, float* out,
            const decode_options& opt, const char* who) {
  // Probabilities for one query that sees every token (decode): the observers of H2O, TOVA and
  // kin read them; a prefill's queries see different prefixes, so none are given there.
  stream_detail::check_query_args(who, cache, seq, layer, q, num_queries, num_q_heads, out, opt,
                                  num_queries == 1 && q_pos == nullptr);
  const auto& c = cache.config();
  const std::int32_t hkv = c.num_kv_heads, D = c.head_dim;
  const auto& kv = cache.cache();
  if (q_pos)  // a query's visible tokens must be a prefix of the stream
    for (std::int32_t h = 0; h < hkv; ++h) {
      const std::int32_t n = kv.length(seq, layer, h);
      const std::int32_t* p = kv.positions(seq, layer, h);
      for (std::int32_t t = 1; t < n; ++t)
        KVC_EXPECTS_IN(who, p[t] >= p[t - 1], "kv head ", h, " of layer ", layer, " holds position ", p[t],
                       " at stream index ", t, " after ", p[t - 1],
                       ", expected positions ascending in stream order (keys re-rotated to new positions are not "
                       "supported here)");
    }
  const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));
  const std::int32_t G = num_q_heads / hkv;
  const std::size_t qn = static_cast<std::size_t>(num_queries) * num_q_heads * D;
  std::vector<float> qs(qn), m(static_cast<std::size_t>(num_queries) * num_q_heads), l(m.size());
  for (std::size_t i = 0; i < qn; ++i) qs[i] = q[i] * scale;
  const bool want_probs = opt.probs != nullptr || opt.group_probs != nullptr;
  const std::size_t stride = static_cast<std::size_t>(opt.probs_stride);
  auto run = [&](std::int32_t h) {
    const auto& pages = kv.pages(seq, layer, h);
    const float* bias = cache.log_weights(seq, layer, h).data();
    const std::int32_t n = kv.length(seq, layer, h);
    const std::int32_t* pos = kv.positions(seq, layer, h);
    // The logits of a group's heads: in place in opt.probs, else a buffer for group_probs alone.
    thread_local std::vector<float> raw_buf;
    float* raw = nullptr;
    std::size_t raw_stride = 0;
    if (want_probs) {
      if (opt.probs) {
        raw = opt.probs + static_cast<std::size_t>(h) * G * stride;
        raw_stride = stride;
      } else {
        raw_buf.resize(static_cast<std::size_t>(G) * static_cast<std::size_t>(n));
        raw = raw_buf.data();
        raw_stride = static_cast<std::size_t>(n);
      }
    }
    for (std::int32_t i = 0; i < num_queries; ++i) {
      const std::int32_t vis = q_pos ? static_cast<std::int32_t>(std::upper_bound(pos, pos + n, q_pos[i]) - pos) : n;
      for (std::int32_t g0 = 0; g0 < G; g0 += 8) {  // the kernel takes up to 8 query heads per pass
        const std::size_t o = static_cast<std::size_t>(i) * num_q_heads + static_cast<std::size_t>(h) * G +
                              static_cast<std::size_t>(g0);
        stream_detail::attend_stream_dispatch<Arch, T>(std::min(8, G - g0), kv.pool(), pages.data(), vis, c.page_size,
                                                       D, qs.data() + o * D, bias, out + o * D, m.data() + o,
                                                       l.data() + o, nullptr, nullptr,
                                                       raw ? raw + static_cast<std::size_t>(g0) * raw_stride : nullptr,
                                                       raw_stride);
      }
    }
    if (!want_probs) return;
    // p_t = exp(s_t - lse) with s_t the biased logit: a merged token's probability is the mass of
    // the members it stands for. A head with no token writes nothing (its row has no entries).
    // Vectorised (xsimd::exp): scalar std::exp here was about a quarter of a merged decode step
    // with group_probs at 4k tokens, 32x8x128 (perf on bench_merge BM_merge_schedule, session 26).
    using B = fbatch<Arch>;
    constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
    float* gp = opt.group_probs ? opt.group_probs + static_cast<std::size_t>(h) * stride : nullptr;
    for (std::int32_t g = 0; g < G; ++g) {
      const std::size_t r = static_cast<std::size_t>(h) * G + static_cast<std::size_t>(g);
      const float lse = m[r] + std::log(l[r]);
      float* row = raw + static_cast<std::size_t>(g) * raw_stride;
      const B lb(lse);
      std::int32_t t = 0;
      for (; t + W <= n; t += W) {
        const B p = xsimd::exp(B::load_unaligned(row + t) - lb);
        if (opt.probs) p.store_unaligned(row + t);
        if (gp) (g == 0 ? p : B::load_unaligned(gp + t) + p).store_unaligned(gp + t);
      }
      for (; t < n; ++t) {
        const float p = std::exp(row[t] - lse);
        if (opt.probs) row[t] = p;
        if (gp) gp[t] = g == 0 ? p : gp[t] + p;
      }
    }
  };
  if (opt.pool && hkv > 1) opt.pool->parallel_for(hkv, run);
  else
    for (std::int32_t h = 0; h < hkv; ++h) run(h);
  for (std::size_t r = 0; r < m.size(); ++r) {
    const float inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;
    for (std::int32_t d = 0; d < D; ++d) out[r * D + static_cast<std::size_t>(d)] *= inv;
    if (opt.lse) opt.lse[r] = l[r] > 0 ? m[r] + std::log(l[r]) : -INFINITY;
  }
}

}  // namespace merged_detail

/// Decode attention of one query token per query head over one layer of one sequence of a
/// merged cache, each token's logit raised by its log-weight. Same contract as
/// cpu::decode_attention where it applies: GQA when num_q_heads is a multiple of num_kv_heads
/// (query head h reads kv head h / G), opt.scale 0 means 1/sqrt(head_dim), opt.pool runs the kv
/// heads in parallel, opt.lse (when not null) receives each query head's log-sum-exp of the
/// biased logits (natural log; -inf for a kv head that holds no token, whose output is zeros).
/// opt.probs ([num_q_heads][probs_stride]) and opt.group_probs ([num_kv_heads][probs_stride],
/// summed over the group) receive exp(s_t - lse) for the t < length of each head, entries past
/// it untouched, as cpu::decode_attention does: a token standing for m members gets their mass,
/// which is what an accumulating observer (H2O) should add to it.
/// \param q    [num_q_heads][head_dim] queries
/// \param out  [num_q_heads][head_dim]
template <class Arch = default_arch, class T>
void merged_decode_attention(const merge::merged_cache<T>& cache, seq_id seq, std::int32_t layer, const float* q,
                             std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  merged_detail::attend<Arch>(cache, seq, layer, q, 1, nullptr, num_q_heads, out, opt,
                              "kvc::cpu::merged_decode_attention");
}

/// Causal prefill attention over a merged cache: query i (position q_positions[i]) attends, in
/// every kv head, the stored tokens whose position is <= its own, each logit raised by the
/// token's log-weight. The engine's use: the tokens scored after a one-shot merge, appended as one
/// chunk and attended together. Same contract as cpu::prefill_attention (q and out
/// [num_queries][num_q_heads][head_dim], opt.lse [num_queries][num_q_heads], -inf and zeros for a
/// row with no visible token; probs and group_probs rejected), with one more precondition: every
/// stream's positions ascend in stream order (what append, keep and merge_layer preserve; a merged
/// token keeps its target's position), so a query's visible tokens are a prefix of the stream.
/// Each query runs the decode kernel over its prefix: O(num_queries x length) per kv head, which
/// for the scored chunk of an evaluation (hundreds of queries) costs about as many decode steps.
template <class Arch = default_arch, class T>
void merged_prefill_attention(const merge::merged_cache<T>& cache, seq_id seq, std::int32_t layer, const float* q,
                              std::int32_t num_queries, const std::int32_t* q_positions, std::int32_t num_q_heads,
                              float* out, const decode_options& opt = {}) {
  constexpr const char* who = "kvc::cpu::merged_prefill_attention";
  KVC_EXPECTS_IN(who, q_positions != nullptr, "q_positions is null");
  merged_detail::attend<Arch>(cache, seq, layer, q, num_queries, q_positions, num_q_heads, out, opt, who);
}

/// Decode attention over a merged_cache layer (merged_cache::layer: views plus log-weights):
/// merged_decode_attention on the store the heads name.
template <class Arch = default_arch, class T, class Heads>
void decode_attention(const store_layer<merge::merged_cache<T>, Heads>& heads, const float* q,
                      std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  merged_decode_attention<Arch>(*heads.store, heads.seq, heads.layer, q, num_q_heads, out, opt);
}

KVC_END_ISA_NAMESPACE
}  // namespace cpu

KVC_BEGIN_ISA_NAMESPACE
/// kvc::decode_attention (kvc/attention.hpp) on a merged_cache layer: the merged kernel above,
/// which adds the log-weights.
template <class T, class Heads>
void decode_attention(const store_layer<merge::merged_cache<T>, Heads>& heads, const float* q,
                      std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  cpu::decode_attention(heads, q, num_q_heads, out, opt);
}
KVC_END_ISA_NAMESPACE
KVC_END_NAMESPACE
