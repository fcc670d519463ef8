// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Selection of one layer: per-head budgets from the allocator, protection, exact sizes,
/// deterministic ties; Ada-KV's global top-k over the heads of a layer.

#include <algorithm>
#include <cstdint>
#include <vector>

#include <kvc/budget/allocator.hpp>
#include <kvc/budget/budget.hpp>
#include <kvc/evict/core.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

using layer_selection = std::vector<std::vector<std::int32_t>>;  ///< [kv_head] kept indices, sorted

namespace detail {

/// Ada-KV: tier 2 = protected, tier 1 = the head's safeguard top floor(alpha * keep_h), tier 0 =
/// the rest; one top-T over all (head, token) by (tier, score, head, token).
inline void select_ada(const layer_input& in, const layer_scores& s, const budget& b, const allocator& a,
                       protection p, layer_selection& out) {
  struct item {
    std::int32_t tier;
    float score;
    std::int32_t h, t;
  };
  std::vector<item> all;
  std::int64_t T = 0;
  std::vector<std::int32_t> top;
  for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
    const std::int32_t n = in.heads[static_cast<std::size_t>(h)].n;
    const float* sc = s[static_cast<std::size_t>(h)].data();
    const std::int32_t keep = b.keep_count_clamped(n);
    T += keep;
    const auto safe = static_cast<std::int32_t>(std::floor(a.alpha_safeguard * keep));
    std::vector<std::int32_t> tier(static_cast<std::size_t>(n), 0);
    // The safeguard is the head's own top `safe` tokens beyond its protected ones.
    select_top(sc, n, std::min(n, protected_count(p, n) + std::max(safe, 0)), p, top);
    for (std::int32_t t : top) tier[static_cast<std::size_t>(t)] = 1;
    for (std::int32_t t = 0; t < n; ++t) {
      if (is_protected(p, t, n)) tier[static_cast<std::size_t>(t)] = 2;
      float x = sc[t];
      if (std::isnan(x)) x = -std::numeric_limits<float>::infinity();
      all.push_back({tier[static_cast<std::size_t>(t)], x, h, t});
    }
  }
  auto before = [](const item& x, const item& y) {
    if (x.tier != y.tier) return x.tier > y.tier;
    if (x.score != y.score) return x.score > y.score;
    if (x.h != y.h) return x.h < y.h;
    return x.t < y.t;
  };
  if (T < static_cast<std::int64_t>(all.size())) std::nth_element(all.begin(), all.begin() + T, all.end(), before);
  out.assign(static_cast<std::size_t>(in.num_kv_heads), {});
  for (std::int64_t i = 0; i < T; ++i) out[static_cast<std::size_t>(all[static_cast<std::size_t>(i)].h)].push_back(all[static_cast<std::size_t>(i)].t);
  for (auto& v : out) std::sort(v.begin(), v.end());
}

}  // namespace detail

/// Selects the kept tokens of every head of one layer.
/// \param b  per-stream budget; a token budget above a head's length keeps that head whole
inline void select_layer(const layer_input& in, const layer_scores& s, const budget& b, const allocator& a,
                         protection p, layer_selection& out) {
  b.validate();
  check_scores(in, s, "select_layer");
  if (a.type == allocator::kind::ada) return detail::select_ada(in, s, b, a, p, out);
  out.assign(static_cast<std::size_t>(in.num_kv_heads), {});
  for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
    const std::int32_t n = in.heads[static_cast<std::size_t>(h)].n;
    if (a.type == allocator::kind::head_labels && !a.is_retrieval(in.layer, h, in.num_kv_heads)) {
      const protection sp{a.streaming_sinks, a.streaming_recent};
      select_top(s[static_cast<std::size_t>(h)].data(), n, protected_count(sp, n), sp, out[static_cast<std::size_t>(h)]);
      continue;
    }
    const std::int32_t keep =
        a.type == allocator::kind::head_labels ? n : a.keep_for(b, n, in.layer, in.num_layers, in.seen);
    select_top(s[static_cast<std::size_t>(h)].data(), n, keep, p, out[static_cast<std::size_t>(h)]);
  }
}

}  // namespace evict
KVC_END_NAMESPACE
