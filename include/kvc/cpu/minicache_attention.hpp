// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Attention over a MiniCache cache (kvc/merge/minicache.hpp). A layer of a merged pair attends
/// to two streams in one softmax: its own tokens (retained and appended later, plain rows) and
/// the pair's shared directions, token t's key |k_t|·e_t and value |v_t|·f_t with this layer's
/// magnitudes, so its logit is |k_t|·(q·e_t) and its value weight p_t·|v_t|. Each stream runs
/// stream_detail::attend_stream (the magnitudes as its kscale and vscale), and the two partial
/// softmax states (running max m, sum l, unnormalised output) are combined exactly:
///   M = max(m1, m2),  out = (acc1·e^{m1−M} + acc2·e^{m2−M}) / (l1·e^{m1−M} + l2·e^{m2−M}).
/// Layers outside a merged pair attend to their own stream alone. Compiled per ISA (docs/isa.md).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/simd.hpp>
#include <kvc/cpu/stream_attention.hpp>
#include <kvc/error.hpp>
#include <kvc/merge/minicache.hpp>
#include <kvc/parallel/thread_pool.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md

namespace minicache_detail {

/// Queries [num_queries][num_q_heads][D] (query i sees positions <= q_pos[i]; null q_pos: all)
/// over one layer of a MiniCache cache; the contract of merged_prefill_attention.
template <class Arch, class T>
void attend(const merge::minicache_cache<T>& cache, seq_id seq, std::int32_t layer, const float* q,
            std::int32_t num_queries, const std::int32_t* q_pos, std::int32_t num_q_heads, float* out,
            const decode_options& opt, const char* who) {
  stream_detail::check_query_args(who, cache, seq, layer, q, num_queries, num_q_heads, out, opt);
  const auto& c = cache.config();
  const std::int32_t hkv = c.num_kv_heads, D = c.head_dim;
  const std::size_t qn = static_cast<std::size_t>(num_queries) * num_q_heads * D;
  const auto& kv = cache.cache();
  const std::int32_t pair = cache.pair_of(layer);
  const bool shared = pair >= 0 && cache.merged(seq, pair);
  const std::int32_t sl = c.num_layers + pair;  // the shared stream's layer in the store
  if (q_pos)  // a query's visible tokens must be a prefix of each stream
    for (std::int32_t h = 0; h < hkv; ++h)
      for (std::int32_t l : {layer, shared ? sl : layer}) {
        const std::int32_t n = kv.length(seq, l, h);
        const std::int32_t* p = kv.positions(seq, l, h);
        for (std::int32_t t = 1; t < n; ++t)
          KVC_EXPECTS_IN(who, p[t] >= p[t - 1], "kv head ", h, " holds position ", p[t], " after ", p[t - 1],
                         ", expected positions ascending in stream order");
      }
  const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));
  const std::int32_t G = num_q_heads / hkv;
  std::vector<float> qs(qn);
  for (std::size_t i = 0; i < qn; ++i) qs[i] = q[i] * scale;
  const std::size_t rows = static_cast<std::size_t>(num_queries) * num_q_heads;
  std::vector<float> m1(rows), l1(rows), m2(rows, -INFINITY), l2(rows, 0.0f), acc2(shared ? qn : 0, 0.0f);
  auto run = [&](std::int32_t h) {
    const auto& po = kv.pages(seq, layer, h);
    const std::int32_t no = kv.length(seq, layer, h);
    const std::int32_t* poo = kv.positions(seq, layer, h);
    const std::int32_t ns = shared ? kv.length(seq, sl, h) : 0;
    const std::int32_t* pos = shared ? kv.positions(seq, sl, h) : nullptr;
    const float* ks = shared ? cache.key_scale(seq, layer, h).data() : nullptr;
    const float* vs = shared ? cache.value_scale(seq, layer, h).data() : nullptr;
    for (std::int32_t i = 0; i < num_queries; ++i) {
      const std::int32_t vo = q_pos ? static_cast<std::int32_t>(std::upper_bound(poo, poo + no, q_pos[i]) - poo) : no;
      const std::int32_t vsn = !shared ? 0 : q_pos ? static_cast<std::int32_t>(std::upper_bound(pos, pos + ns, q_pos[i]) - pos) : ns;
      for (std::int32_t g0 = 0; g0 < G; g0 += 8) {
        const std::int32_t gn = std::min(8, G - g0);
        const std::size_t o = static_cast<std::size_t>(i) * num_q_heads + static_cast<std::size_t>(h) * G +
                              static_cast<std::size_t>(g0);
        stream_detail::attend_stream_dispatch<Arch, T>(gn, kv.pool(), po.data(), vo, c.page_size, D, qs.data() + o * D,
                                                       nullptr, out + o * D, m1.data() + o, l1.data() + o);
        if (shared)
          stream_detail::attend_stream_dispatch<Arch, T>(gn, kv.pool(), kv.pages(seq, sl, h).data(), vsn, c.page_size, D,
                                                         qs.data() + o * D, nullptr, acc2.data() + o * D, m2.data() + o,
                                                         l2.data() + o, ks, vs);
      }
    }
  };
  if (opt.pool && hkv > 1) opt.pool->parallel_for(hkv, run);
  else
    for (std::int32_t h = 0; h < hkv; ++h) run(h);
  for (std::size_t r = 0; r < rows; ++r) {
    const float M = std::max(m1[r], m2[r]);
    const float a1 = l1[r] > 0 ? std::exp(m1[r] - M) : 0.0f, a2 = l2[r] > 0 ? std::exp(m2[r] - M) : 0.0f;
    const float den = l1[r] * a1 + l2[r] * a2;
    const float inv = den > 0 ? 1.0f / den : 0.0f;
    for (std::int32_t d = 0; d < D; ++d) {
      const std::size_t k = r * D + static_cast<std::size_t>(d);
      out[k] = (out[k] * a1 + (shared ? acc2[k] * a2 : 0.0f)) * inv;
    }
    if (opt.lse) opt.lse[r] = den > 0 ? M + std::log(den) : -INFINITY;
  }
}

}  // namespace minicache_detail

/// Decode attention of one query token per query head over one layer of a MiniCache cache
/// (a merged layer's own tokens and its pair's shared directions, one softmax). Same contract
/// as merged_decode_attention: GQA, opt.scale, opt.pool over kv heads, opt.lse; no probabilities.
template <class Arch = default_arch, class T>
void minicache_decode_attention(const merge::minicache_cache<T>& cache, seq_id seq, std::int32_t layer, const float* q,
                                std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  minicache_detail::attend<Arch>(cache, seq, layer, q, 1, nullptr, num_q_heads, out, opt,
                                 "kvc::cpu::minicache_decode_attention");
}

/// Causal prefill attention over a MiniCache cache: query i sees, in each stream, the tokens
/// whose position is <= q_positions[i]. Same contract as merged_prefill_attention.
template <class Arch = default_arch, class T>
void minicache_prefill_attention(const merge::minicache_cache<T>& cache, seq_id seq, std::int32_t layer,
                                 const float* q, std::int32_t num_queries, const std::int32_t* q_positions,
                                 std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  KVC_EXPECTS_IN("kvc::cpu::minicache_prefill_attention", q_positions != nullptr, "q_positions is null");
  minicache_detail::attend<Arch>(cache, seq, layer, q, num_queries, q_positions, num_q_heads, out, opt,
                                 "kvc::cpu::minicache_prefill_attention");
}

KVC_END_ISA_NAMESPACE
}  // namespace cpu
KVC_END_NAMESPACE
