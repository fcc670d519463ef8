// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// H2O (heavy hitters): score = the attention a token has accumulated over the observed steps
/// (attention_observer::sum), plus a protected recent window (KVCache-Factory's H2O keeps
/// window_size = 64 recent tokens beside the heavy hitters). With `normalize`, the sum is divided
/// by the number of observed queries that saw the token (stream_stats::count): kvpress's
/// ObservedAttentionPress, which ranks a late prompt token by its mean attention instead of
/// penalising it for the early queries that could not see it.
/// \par Reference
/// Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models", arXiv:2306.14048.

#include <kvc/evict/decode_scorers_common.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct h2o_params {
  std::int32_t recent = 64;
  /// Attention sinks always kept (StreamingLLM's 4). With none, a decode-time budget below the
  /// recent window evicts the first token for good: GPL-3 stream protocol, snapkv ratio 0.5,
  /// Δppl +33.1 with 0 sinks, +2.1 with 4 (kvc-eval --protocols stream, 384 tokens, chunks of 16).
  std::int32_t sinks = 4;
  /// Rank by sum / count (kvpress's normalised observed attention) instead of the plain sum.
  /// Needs an observer with track_count. kvpress parity: normalize, recent = 0, sinks = 0.
  bool normalize = false;
};

struct h2o {
  using params_type = h2o_params;
  using observation_type = attention_observer;
  static constexpr unsigned reads = reads_nothing;
  static constexpr const char* name = "h2o";
  params_type p;
  h2o() = default;
  explicit h2o(const params_type& params) : p(params) {
    KVC_EXPECTS(p.recent >= 0 && p.sinks >= 0, "recent/sinks = ", p.recent, "/", p.sinks, ", expected >= 0");
  }
  protection protect() const { return {p.sinks, p.recent}; }
  void score(const layer_input& in, const observations& obs, layer_scores& out) const {
    const attention_observer& ob = detail::need_observer(obs, name);
    KVC_EXPECTS(ob.params().track_sum, name, ": observer track_sum = false, expected true");
    KVC_EXPECTS_IN("kvc::evict::h2o::score", !p.normalize || ob.params().track_count,
                   "normalize = true but the observer's track_count = false, expected true");
    out.resize(static_cast<std::size_t>(in.num_kv_heads));
    std::vector<float> count;
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      auto& o = out[static_cast<std::size_t>(h)];
      detail::observed_field(ob, in, h, [](const stream_stats& s) -> const auto& { return s.sum; }, name, "sum", o);
      if (!p.normalize) continue;
      detail::observed_field(ob, in, h, [](const stream_stats& s) -> const auto& { return s.count; }, name, "count",
                             count);
      // A token no observed query saw has no mean: it ranks last, as its sum (0) does unnormalised.
      for (std::size_t t = 0; t < o.size(); ++t) o[t] = count[t] > 0 ? o[t] / count[t] : 0.0f;
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
