// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Non-causal chunked attention (kvpress NonCausalAttnPress, from Compactor): the prompt is cut
/// into chunks of `chunk` tokens; within each chunk every query attends to every key of the chunk
/// (no causal mask); a key's score is the column sum of that attention, aggregated over the GQA
/// group, times ‖v‖₂, avg-pooled (kernel 3) and z-normalised over the stream. Prefill only: the
/// query window must hold one query per token of the (uncompressed) stream, same positions.
/// \par Reference
/// Chari et al., "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores", arXiv:2507.08143.

#include <cmath>
#include <vector>

#include <kvc/evict/core.hpp>
#include <kvc/evict/snapkv.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct noncausal_attention_params {
  std::int32_t chunk = 256;
  std::int32_t pool_kernel = 3;
  group_agg agg = group_agg::mean;
  protection protect{4, 0};
};

struct noncausal_attention {
  using params_type = noncausal_attention_params;
  using observation_type = query_window;
  static constexpr unsigned reads = reads_keys | reads_values;
  static constexpr const char* name = "noncausal_attention";
  params_type p;
  noncausal_attention() = default;
  explicit noncausal_attention(const params_type& params) : p(params) {
    KVC_EXPECTS(p.chunk >= 1, "chunk = ", p.chunk, ", expected >= 1 token");
    KVC_EXPECTS(p.pool_kernel >= 1, "pool_kernel = ", p.pool_kernel, ", expected >= 1");
  }
  protection protect() const { return p.protect; }
  void score(const layer_input& in, const observations& obs, layer_scores& out) const {
    const query_window& w = detail::need_window(obs, name);
    check_window(w, in, name);
    shape_scores(in, out);
    const std::int32_t G = in.group(), D = in.head_dim;
    std::vector<float> probs, perq, agg;
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const head_input& hi = in.heads[static_cast<std::size_t>(h)];
      const std::int32_t n = hi.n;
      KVC_EXPECTS(w.n == n, name, ": query_window.n = ", w.n, ", expected one query per token of the stream (", n,
                  "): non-causal attention runs at prefill on the uncompressed prompt");
      perq.assign(static_cast<std::size_t>(G) * n, 0.0f);
      for (std::int32_t c0 = 0; c0 < n; c0 += p.chunk) {
        const std::int32_t c1 = std::min(n, c0 + p.chunk);
        head_input sub{hi.k + static_cast<std::size_t>(c0) * D, nullptr, hi.positions + c0, c1 - c0};
        query_window qw{w.q + static_cast<std::size_t>(c0) * w.num_q_heads * D, nullptr, c1 - c0, w.num_q_heads, D};
        for (std::int32_t g = 0; g < G; ++g) {
          window_probs(sub, qw, h * G + g, c1, D, probs, /*causal=*/false);
          for (std::int32_t i = 0; i < c1 - c0; ++i)
            for (std::int32_t j = 0; j < c1 - c0; ++j)
              perq[static_cast<std::size_t>(g) * n + c0 + j] += probs[static_cast<std::size_t>(i) * (c1 - c0) + j];
        }
      }
      agg.assign(static_cast<std::size_t>(n), 0.0f);
      aggregate_group(perq.data(), G, n, static_cast<std::size_t>(n), p.agg, agg.data());
      for (std::int32_t t = 0; t < n; ++t) agg[static_cast<std::size_t>(t)] *= detail::l2(hi.v + static_cast<std::size_t>(t) * D, D);
      auto& o = out[static_cast<std::size_t>(h)];
      detail::pool1d(agg.data(), n, p.pool_kernel, pooling::avg, o.data());
      double mean = 0, var = 0;
      for (float x : o) mean += x;
      mean /= std::max(1, n);
      for (float x : o) var += (x - mean) * (x - mean);
      const double sd = n > 1 ? std::sqrt(var / (n - 1)) : 0.0;
      for (float& x : o) x = static_cast<float>(sd > 0 ? (x - mean) / sd : 0.0);
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
