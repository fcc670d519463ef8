// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Scissorhands (persistence of importance): over a history window of the last `history` steps,
/// count the steps in which a token's attention was below the average 1/n (the observer's `low`
/// bit history); tokens unimportant most often are dropped (score = -count). A recent window is
/// protected (tokens too young to have a history).
/// \par Reference
/// Liu et al., "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache Compression at Test Time", arXiv:2305.17118.

#include <bitset>

#include <kvc/evict/decode_scorers_common.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct scissorhands_params {
  std::int32_t history = 64;  ///< steps of history, at most 64
  std::int32_t recent = 64;
  /// Attention sinks always kept (StreamingLLM's 4). With none, a decode-time budget below the
  /// recent window evicts the first token for good: GPL-3 stream protocol, snapkv ratio 0.5,
  /// Δppl +33.1 with 0 sinks, +2.1 with 4 (kvc-eval --protocols stream, 384 tokens, chunks of 16).
  std::int32_t sinks = 4;
};

struct scissorhands {
  using params_type = scissorhands_params;
  using observation_type = attention_observer;
  static constexpr unsigned reads = reads_nothing;
  static constexpr const char* name = "scissorhands";
  params_type p;
  scissorhands() = default;
  explicit scissorhands(const params_type& params) : p(params) {
    KVC_EXPECTS(p.history >= 1 && p.history <= 64, "history = ", p.history, ", expected 1..64 steps");
    KVC_EXPECTS(p.recent >= 0 && p.sinks >= 0, "recent/sinks = ", p.recent, "/", p.sinks, ", expected >= 0");
  }
  protection protect() const { return {p.sinks, p.recent}; }
  void score(const layer_input& in, const observations& obs, layer_scores& out) const {
    const attention_observer& ob = detail::need_observer(obs, name);
    KVC_EXPECTS(ob.params().track_low, name, ": observer track_low = false, expected true");
    const std::uint64_t mask = p.history == 64 ? ~0ull : ((1ull << p.history) - 1);
    out.resize(static_cast<std::size_t>(in.num_kv_heads));
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      auto& o = out[static_cast<std::size_t>(h)];
      const std::int32_t n = in.heads[static_cast<std::size_t>(h)].n;
      o.assign(static_cast<std::size_t>(n), 0.0f);
      const stream_stats* st = ob.find(in.seq, in.layer, h);
      if (!st) continue;
      KVC_EXPECTS(st->low.size() <= static_cast<std::size_t>(n), name, ": observer out of sync with the stream");
      for (std::size_t t = 0; t < st->low.size(); ++t)
        o[t] = -static_cast<float>(std::bitset<64>(st->low[t] & mask).count());
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
