// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// A2SF: H2O's accumulation with a forgetting factor, a ← λ·a + p at every step, so old
/// attention fades and tokens of different ages compare fairly. λ is the observer's
/// `forgetting` (observer_params); the scorer checks it is below 1.
/// \par Reference
/// Jo and Shin, "A2SF: Accumulative Attention Scoring with Forgetting Factor for Token Pruning in Transformer Decoder", arXiv:2407.20485.

#include <kvc/evict/decode_scorers_common.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct a2sf_params {
  std::int32_t recent = 64;
  /// Attention sinks always kept (StreamingLLM's 4). With none, a decode-time budget below the
  /// recent window evicts the first token for good: GPL-3 stream protocol, snapkv ratio 0.5,
  /// Δppl +33.1 with 0 sinks, +2.1 with 4 (kvc-eval --protocols stream, 384 tokens, chunks of 16).
  std::int32_t sinks = 4;
};

struct a2sf {
  using params_type = a2sf_params;
  using observation_type = attention_observer;
  static constexpr unsigned reads = reads_nothing;
  static constexpr const char* name = "a2sf";
  params_type p;
  a2sf() = default;
  explicit a2sf(const params_type& params) : p(params) {
    KVC_EXPECTS(p.recent >= 0 && p.sinks >= 0, "recent/sinks = ", p.recent, "/", p.sinks, ", expected >= 0");
  }
  protection protect() const { return {p.sinks, p.recent}; }
  void score(const layer_input& in, const observations& obs, layer_scores& out) const {
    const attention_observer& ob = detail::need_observer(obs, name);
    KVC_EXPECTS(ob.params().track_decayed, name, ": observer track_decayed = false, expected true");
    out.resize(static_cast<std::size_t>(in.num_kv_heads));
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h)
      detail::observed_field(ob, in, h, [](const stream_stats& s) -> const auto& { return s.decayed; }, name,
                             "decayed", out[static_cast<std::size_t>(h)]);
  }
};

}  // namespace evict
KVC_END_NAMESPACE
