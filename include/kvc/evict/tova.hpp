// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// TOVA: score = the attention of the last query (attention_observer::last), averaged over all
/// heads of the layer when every stream holds the same tokens (TOVA and kvpress share one score
/// across heads), per kv-head otherwise (after head-wise budgets). The last token is always kept.
/// \par Reference
/// Oren et al., "Transformers are Multi-State RNNs", arXiv:2401.06104.

#include <algorithm>

#include <kvc/evict/decode_scorers_common.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct tova_params {
  bool share_heads = true;
  /// Attention sinks always kept (StreamingLLM's 4). With none, a decode-time budget below the
  /// recent window evicts the first token for good: GPL-3 stream protocol, snapkv ratio 0.5,
  /// Δppl +33.1 with 0 sinks, +2.1 with 4 (kvc-eval --protocols stream, 384 tokens, chunks of 16).
  std::int32_t sinks = 4;
};

struct tova {
  using params_type = tova_params;
  using observation_type = attention_observer;
  static constexpr unsigned reads = reads_nothing;
  static constexpr const char* name = "tova";
  params_type p;
  tova() = default;
  explicit tova(const params_type& params) : p(params) {}
  protection protect() const { return {p.sinks, 1}; }
  void score(const layer_input& in, const observations& obs, layer_scores& out) const {
    const attention_observer& ob = detail::need_observer(obs, name);
    KVC_EXPECTS(ob.params().track_last, name, ": observer track_last = false, expected true");
    out.resize(static_cast<std::size_t>(in.num_kv_heads));
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h)
      detail::observed_field(ob, in, h, [](const stream_stats& s) -> const auto& { return s.last; }, name, "last",
                             out[static_cast<std::size_t>(h)]);
    if (!p.share_heads || in.num_kv_heads < 2) return;
    const head_input& h0 = in.heads[0];
    for (std::int32_t h = 1; h < in.num_kv_heads; ++h) {
      const head_input& hh = in.heads[static_cast<std::size_t>(h)];
      if (hh.n != h0.n || !std::equal(h0.positions, h0.positions + h0.n, hh.positions)) return;
    }
    std::vector<float> mean(static_cast<std::size_t>(h0.n), 0.0f);
    for (const auto& o : out)
      for (std::int32_t t = 0; t < h0.n; ++t) mean[static_cast<std::size_t>(t)] += o[static_cast<std::size_t>(t)];
    for (float& x : mean) x /= static_cast<float>(in.num_kv_heads);
    for (auto& o : out) o = mean;
  }
};

}  // namespace evict
KVC_END_NAMESPACE
