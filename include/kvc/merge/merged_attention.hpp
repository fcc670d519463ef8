// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Decode attention over a merged cache (kvc/merge/merged_cache.hpp): token t's logit is
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
/// scalar code, kv heads spread over opt.pool. Missing here: split-K over tokens (opt.split_tokens
/// is ignored) and the probability outputs (opt.probs / group_probs are rejected).
/// Threads: read-only on the cache. Compiled per ISA (docs/isa.md).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/simd.hpp>
#include <kvc/cpu/stream_attention.hpp>
#include <kvc/error.hpp>
#include <kvc/merge/merged_cache.hpp>
#include <kvc/parallel/thread_pool.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md

/// Decode attention of one query token per query head over one layer of one sequence of a
/// merged cache, each token's logit raised by its log-weight. Same contract as
/// cpu::decode_attention where it applies: GQA when num_q_heads is a multiple of num_kv_heads
/// (query head h reads kv head h / G), opt.scale 0 means 1/sqrt(head_dim), opt.pool runs the kv
/// heads in parallel, opt.lse (when not null) receives each query head's log-sum-exp of the
/// biased logits (natural log; -inf for a kv head that holds no token, whose output is zeros).
/// \param q    [num_q_heads][head_dim] queries
/// \param out  [num_q_heads][head_dim]
template <class Arch = default_arch, class T>
void merged_decode_attention(const merge::merged_cache<T>& cache, seq_id seq, std::int32_t layer, const float* q,
                             std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  constexpr const char* who = "kvc::cpu::merged_decode_attention";
  const auto& c = cache.config();
  const std::int32_t hkv = c.num_kv_heads, D = c.head_dim;
  KVC_EXPECTS_IN(who, cache.contains(seq), "seq = ", seq, " is not a live sequence of this cache, expected one of its ",
                 cache.num_sequences(), " live sequence ids");
  KVC_EXPECTS_IN(who, layer >= 0 && layer < c.num_layers, "layer = ", layer, ", expected 0..", c.num_layers - 1);
  KVC_EXPECTS_IN(who, num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
                 ", expected a positive multiple of num_kv_heads = ", hkv);
  KVC_EXPECTS_IN(who, q != nullptr && out != nullptr, "q or out is null");
  KVC_EXPECTS_IN(who, opt.probs == nullptr && opt.group_probs == nullptr,
                 "opt.probs or opt.group_probs is set, expected null (the merged kernel has no probability outputs)");
  for (std::int32_t i = 0; i < num_q_heads * D; ++i)
    KVC_EXPECTS_IN(who, std::isfinite(q[i]), "q[", i, "] = ", q[i], ", expected a finite query");
  const auto& kv = cache.cache();
  std::int64_t held = 0;
  for (std::int32_t h = 0; h < hkv; ++h) held += kv.length(seq, layer, h);
  KVC_EXPECTS_IN(who, held > 0, "seq = ", seq, ", layer = ", layer,
                 " holds 0 tokens in all its kv heads, expected at least one token to attend to (append this "
                 "step's K/V to the layer before attending)");
  const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));
  const std::int32_t G = num_q_heads / hkv;
  std::vector<float> qs(static_cast<std::size_t>(num_q_heads) * D);
  for (std::size_t i = 0; i < qs.size(); ++i) qs[i] = q[i] * scale;
  std::vector<float> m(static_cast<std::size_t>(num_q_heads)), l(m.size());
  auto run = [&](std::int32_t h) {
    const auto& pages = kv.pages(seq, layer, h);
    const float* bias = cache.log_weights(seq, layer, h).data();
    const std::int32_t n = kv.length(seq, layer, h);
    for (std::int32_t g0 = 0; g0 < G; g0 += 8) {  // the kernel takes up to 8 query heads per pass
      const std::size_t o = static_cast<std::size_t>(h) * G + static_cast<std::size_t>(g0);
      stream_detail::attend_stream_dispatch<Arch, T>(std::min(8, G - g0), kv.pool(), pages.data(), n, c.page_size, D,
                                                     qs.data() + o * D, bias, out + o * D, m.data() + o, l.data() + o);
    }
  };
  if (opt.pool && hkv > 1) opt.pool->parallel_for(hkv, run);
  else
    for (std::int32_t h = 0; h < hkv; ++h) run(h);
  for (std::int32_t h = 0; h < num_q_heads; ++h) {
    const float inv = l[static_cast<std::size_t>(h)] > 0 ? 1.0f / l[static_cast<std::size_t>(h)] : 0.0f;
    for (std::int32_t d = 0; d < D; ++d) out[static_cast<std::size_t>(h) * D + d] *= inv;
    if (opt.lse)
      opt.lse[h] = l[static_cast<std::size_t>(h)] > 0 ? m[static_cast<std::size_t>(h)] + std::log(l[static_cast<std::size_t>(h)])
                                                      : -INFINITY;
  }
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
  const auto& c = cache.config();
  const std::int32_t hkv = c.num_kv_heads, D = c.head_dim;
  KVC_EXPECTS_IN(who, cache.contains(seq), "seq = ", seq, " is not a live sequence of this cache, expected one of its ",
                 cache.num_sequences(), " live sequence ids");
  KVC_EXPECTS_IN(who, layer >= 0 && layer < c.num_layers, "layer = ", layer, ", expected 0..", c.num_layers - 1);
  KVC_EXPECTS_IN(who, num_queries > 0, "num_queries = ", num_queries, ", expected >= 1");
  KVC_EXPECTS_IN(who, num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
                 ", expected a positive multiple of num_kv_heads = ", hkv);
  KVC_EXPECTS_IN(who, q != nullptr && out != nullptr && q_positions != nullptr,
                 q == nullptr ? "q" : out == nullptr ? "out" : "q_positions", " is null");
  KVC_EXPECTS_IN(who, opt.probs == nullptr && opt.group_probs == nullptr,
                 "opt.probs or opt.group_probs is set, expected null (the merged kernel has no probability outputs)");
  const std::size_t qn = static_cast<std::size_t>(num_queries) * num_q_heads * D;
  for (std::size_t i = 0; i < qn; ++i)
    KVC_EXPECTS_IN(who, std::isfinite(q[i]), "q[", i, "] = ", q[i], ", expected a finite query");
  const auto& kv = cache.cache();
  std::int64_t held = 0;
  for (std::int32_t h = 0; h < hkv; ++h) {
    const std::int32_t n = kv.length(seq, layer, h);
    const std::int32_t* p = kv.positions(seq, layer, h);
    held += n;
    for (std::int32_t t = 1; t < n; ++t)
      KVC_EXPECTS_IN(who, p[t] >= p[t - 1], "kv head ", h, " of layer ", layer, " holds position ", p[t],
                     " at stream index ", t, " after ", p[t - 1],
                     ", expected positions ascending in stream order (keys re-rotated to new positions are not "
                     "supported here)");
  }
  KVC_EXPECTS_IN(who, held > 0, "seq = ", seq, ", layer = ", layer,
                 " holds 0 tokens in all its kv heads, expected at least one token to attend to (append the "
                 "chunk's K/V to the layer before attending)");
  const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));
  const std::int32_t G = num_q_heads / hkv;
  const std::size_t per_q = static_cast<std::size_t>(num_q_heads);
  std::vector<float> qs(qn), m(static_cast<std::size_t>(num_queries) * per_q), l(m.size());
  for (std::size_t i = 0; i < qn; ++i) qs[i] = q[i] * scale;
  auto run = [&](std::int32_t h) {
    const auto& pages = kv.pages(seq, layer, h);
    const float* bias = cache.log_weights(seq, layer, h).data();
    const std::int32_t n = kv.length(seq, layer, h);
    const std::int32_t* pos = kv.positions(seq, layer, h);
    for (std::int32_t i = 0; i < num_queries; ++i) {
      const std::int32_t vis = static_cast<std::int32_t>(std::upper_bound(pos, pos + n, q_positions[i]) - pos);
      for (std::int32_t g0 = 0; g0 < G; g0 += 8) {
        const std::size_t o = static_cast<std::size_t>(i) * per_q + static_cast<std::size_t>(h) * G +
                              static_cast<std::size_t>(g0);
        stream_detail::attend_stream_dispatch<Arch, T>(std::min(8, G - g0), kv.pool(), pages.data(), vis, c.page_size,
                                                       D, qs.data() + o * D, bias, out + o * D, m.data() + o,
                                                       l.data() + o);
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

KVC_END_ISA_NAMESPACE
}  // namespace cpu
KVC_END_NAMESPACE
