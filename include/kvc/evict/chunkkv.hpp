// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// ChunkKV: chunks of `chunk_length` contiguous tokens are the unit of selection, with the same
/// chunks for every head of the layer. A chunk's score is the mean over its tokens of the
/// head-summed inner scores; the best chunks are kept until the budget is met (the last chunk
/// taken is cut to its earliest tokens so every stream keeps exactly its budget). Needs the heads
/// of a layer to hold the same tokens (prefill).
/// \par Reference
/// Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference", arXiv:2502.00299.

#include <algorithm>
#include <numeric>
#include <vector>

#include <kvc/budget/allocator.hpp>
#include <kvc/evict/select.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct chunkkv_params {
  std::int32_t chunk_length = 20;
};

template <class Inner>
struct chunkkv {
  using params_type = chunkkv_params;
  using observation_type = typename Inner::observation_type;
  static constexpr unsigned reads = Inner::reads;
  static constexpr const char* name = "chunkkv";
  Inner inner;
  params_type p;
  chunkkv() = default;
  explicit chunkkv(const params_type& params, const Inner& in = Inner{}) : inner(in), p(params) {
    KVC_EXPECTS(p.chunk_length >= 1, "chunk_length = ", p.chunk_length, ", expected >= 1 token");
  }
  protection protect() const { return inner.protect(); }
  void score(const layer_input& in, const observations& obs, layer_scores& out) const { inner.score(in, obs, out); }

  /// Shared chunk selection for all heads (the compressor calls this instead of select_layer).
  void select(const layer_input& in, const observations&, const layer_scores& s, const budget& b, const allocator& a,
              protection prot, layer_selection& out) const {
    check_scores(in, s, name);
    const head_input& h0 = in.heads[0];
    const std::int32_t n = h0.n;
    for (std::int32_t h = 1; h < in.num_kv_heads; ++h)
      KVC_EXPECTS(in.heads[static_cast<std::size_t>(h)].n == n, name, ": head ", h, " holds ",
                  in.heads[static_cast<std::size_t>(h)].n, " tokens, head 0 holds ", n,
                  "; expected equal streams (chunks are shared by all heads)");
    const std::int32_t keep = a.type == allocator::kind::ada ? b.keep_count_clamped(n) : a.keep_for(b, n, in.layer, in.num_layers, in.seen);
    std::vector<float> summed(static_cast<std::size_t>(n), 0.0f);
    for (const auto& v : s)
      for (std::int32_t t = 0; t < n; ++t) summed[static_cast<std::size_t>(t)] += v[static_cast<std::size_t>(t)];
    // Protected tokens first, then whole chunks by mean score (ties: earlier chunk).
    std::vector<char> taken(static_cast<std::size_t>(n), 0);
    std::vector<std::int32_t> prot_idx;
    select_top(summed.data(), n, std::min(keep, protected_count(prot, n)), prot, prot_idx);
    for (std::int32_t t : prot_idx) taken[static_cast<std::size_t>(t)] = 1;
    std::int32_t have = static_cast<std::int32_t>(prot_idx.size());
    const std::int32_t nc = (n + p.chunk_length - 1) / p.chunk_length;
    std::vector<float> cs(static_cast<std::size_t>(nc), 0.0f);
    for (std::int32_t c = 0; c < nc; ++c) {
      const std::int32_t a0 = c * p.chunk_length, a1 = std::min(n, a0 + p.chunk_length);
      double m = 0;
      for (std::int32_t t = a0; t < a1; ++t) m += summed[static_cast<std::size_t>(t)];
      cs[static_cast<std::size_t>(c)] = static_cast<float>(m / (a1 - a0));
    }
    std::vector<std::int32_t> order(static_cast<std::size_t>(nc));
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), detail::rank_before{cs.data()});
    for (std::int32_t c : order) {
      if (have >= keep) break;
      const std::int32_t a0 = c * p.chunk_length, a1 = std::min(n, a0 + p.chunk_length);
      for (std::int32_t t = a0; t < a1 && have < keep; ++t)
        if (!taken[static_cast<std::size_t>(t)]) taken[static_cast<std::size_t>(t)] = 1, ++have;
    }
    std::vector<std::int32_t> kept;
    for (std::int32_t t = 0; t < n; ++t)
      if (taken[static_cast<std::size_t>(t)]) kept.push_back(t);
    out.assign(static_cast<std::size_t>(in.num_kv_heads), kept);
  }
};

}  // namespace evict
KVC_END_NAMESPACE
