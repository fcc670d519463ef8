// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Finch: SnapKV-like selection where the window is a given span of the prompt (the question),
/// not the last tokens. A token's score is the attention the span's queries give it, summed and
/// divided by the number of span queries that can see it (kvpress's renormalisation by non-zero
/// weights); GQA-aggregated; the span's own tokens are always kept. Finch re-rotates kept keys
/// (published default): set compressor_options::rerotate. Chunked Finch is not implemented.
/// \par Reference
/// Corallo and Papotti, "FINCH: Prompt-guided Key-Value Cache Compression", arXiv:2408.00167.

#include <algorithm>
#include <vector>

#include <kvc/evict/core.hpp>
#include <kvc/evict/window_attention.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct finch_params {
  group_agg agg = group_agg::mean;
  /// Attention sinks always kept (StreamingLLM's 4). With none, a decode-time budget below the
  /// recent window evicts the first token for good: GPL-3 stream protocol, snapkv ratio 0.5,
  /// Δppl +33.1 with 0 sinks, +2.1 with 4 (kvc-eval --protocols stream, 384 tokens, chunks of 16).
  std::int32_t sinks = 4;
  bool rerotate_keys = true;  ///< published default; the compressor's rerotate option applies it
};

struct finch {
  using params_type = finch_params;
  using observation_type = query_window;
  static constexpr unsigned reads = reads_keys;
  static constexpr const char* name = "finch";
  params_type p;
  finch() = default;
  explicit finch(const params_type& params) : p(params) {}
  protection protect() const { return {p.sinks, 0}; }
  void score(const layer_input& in, const observations& obs, layer_scores& out) const {
    const query_window& w = detail::need_window(obs, name);
    check_window(w, in, name);
    shape_scores(in, out);
    const std::int32_t G = in.group();
    std::vector<float> probs, perq;
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const head_input& hi = in.heads[static_cast<std::size_t>(h)];
      const std::int32_t n = hi.n;
      perq.assign(static_cast<std::size_t>(G) * n, 0.0f);
      std::vector<std::int32_t> visible(static_cast<std::size_t>(n), 0);
      for (std::int32_t i = 0; i < w.n; ++i) {
        const std::int32_t qp = w.position(i, in.seen);
        for (std::int32_t j = 0; j < n; ++j) visible[static_cast<std::size_t>(j)] += hi.positions[j] <= qp;
      }
      for (std::int32_t g = 0; g < G; ++g) {
        window_probs(hi, w, h * G + g, in.seen, in.head_dim, probs);
        for (std::int32_t j = 0; j < n; ++j) {
          double s = 0;
          for (std::int32_t i = 0; i < w.n; ++i) s += probs[static_cast<std::size_t>(i) * n + j];
          perq[static_cast<std::size_t>(g) * n + j] =
              visible[static_cast<std::size_t>(j)] ? static_cast<float>(s / visible[static_cast<std::size_t>(j)]) : 0.0f;
        }
      }
      auto& o = out[static_cast<std::size_t>(h)];
      aggregate_group(perq.data(), G, n, static_cast<std::size_t>(n), p.agg, o.data());
      float mx = 0.0f;
      for (float x : o) mx = std::max(mx, x);
      // The span's own tokens (positions of the window's queries) are kept.
      std::vector<std::int32_t> span(static_cast<std::size_t>(w.n));
      for (std::int32_t i = 0; i < w.n; ++i) span[static_cast<std::size_t>(i)] = w.position(i, in.seen);
      std::sort(span.begin(), span.end());
      for (std::int32_t j = 0; j < n; ++j)
        if (std::binary_search(span.begin(), span.end(), hi.positions[j])) o[static_cast<std::size_t>(j)] = mx + 1.0f;
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
