// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `mikv_policy`: which tokens of a mixed_precision_cache stream stay in high precision
/// (kvc/store/mixed_precision_cache.hpp holds the two precisions; this chooses between them).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/types.hpp>

KVC_BEGIN_NAMESPACE

/// MiKV's precision policy: in each stream, the sinks, the full-precision window, the newest
/// tokens and the highest-scoring ("heavy hitter") tokens stay in high precision, up to
/// high_ratio of the stream's tokens; every other high-precision token is demoted.
/// Published defaults: MiKV keeps ~20% of the tokens (the H2O "importance" cache, half heavy
/// hitters and half recent tokens) in high precision and stores the rest in per-token asymmetric
/// INT2-INT4 (here: int8 high, int2 low, ratio 0.2).
/// \par Reference
/// Yang et al., "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed
/// Precision Quantization" (MiKV), arXiv:2402.18096.
struct mikv_policy {
  float high_ratio = 0.2f;    ///< fraction of each stream's tokens kept high (sinks and window included)
  float recent_ratio = 0.5f;  ///< share of that budget given to the newest tokens (H2O's split)

  /// Throws kvc::error naming `who` (the public call checking the policy) on a bad ratio.
  void check(const char* who = "kvc::mikv_policy::check") const {
    KVC_EXPECTS_IN(who, high_ratio >= 0.0f && high_ratio <= 1.0f, "mikv_policy.high_ratio = ", high_ratio,
                   ", expected 0..1 (MiKV: 0.2)");
    KVC_EXPECTS_IN(who, recent_ratio >= 0.0f && recent_ratio <= 1.0f, "mikv_policy.recent_ratio = ", recent_ratio,
                   ", expected 0..1 (H2O: 0.5)");
  }

  /// The high mask of one stream from scores[length] (higher: more important; finite).
  template <class Cache>
  std::vector<std::uint8_t> high_mask(const Cache& c, seq_id s, std::int32_t layer, std::int32_t head,
                                      const float* scores) const {
    check("kvc::mikv_policy::high_mask");
    const std::int32_t L = c.length(s, layer, head);
    KVC_EXPECTS_IN("kvc::mikv_policy::high_mask", L == 0 || scores != nullptr, "scores is null for a stream of ", L,
                   " tokens, expected one score per token");
    const auto r = c.regions(s, layer, head);
    const auto& low = c.low_indices(s, layer, head);
    std::vector<std::uint8_t> mask(static_cast<std::size_t>(L), 0);
    const std::int32_t budget = share(high_ratio, L);
    std::int32_t used = 0;
    // 1. sinks and the full-precision window: always high (they are not demotable)
    std::vector<std::int32_t> cand;  // demotable tokens (high-precision codes), logical order
    std::int32_t h = 0;
    for (std::int32_t t = 0; t < L; ++t) {
      if (low[static_cast<std::size_t>(t)] >= 0) continue;
      if (h < r.sink || h >= r.sink + r.high) {
        mask[static_cast<std::size_t>(t)] = 1;
        ++used;
      } else {
        KVC_EXPECTS_IN("kvc::mikv_policy::high_mask", std::isfinite(scores[t]), "scores[", t, "] = ", scores[t],
                       ", expected finite");
        cand.push_back(t);
      }
      ++h;
    }
    // 2. the newest demotable tokens
    const std::int32_t recent = share(recent_ratio, budget);
    std::int32_t take = std::max(0, std::min<std::int32_t>({recent, budget - used, static_cast<std::int32_t>(cand.size())}));
    for (std::int32_t i = 0; i < take; ++i) mask[static_cast<std::size_t>(cand[cand.size() - 1 - static_cast<std::size_t>(i)])] = 1;
    used += take;
    cand.resize(cand.size() - static_cast<std::size_t>(take));
    // 3. heavy hitters among the rest (ties: the earlier token)
    take = std::max(0, std::min<std::int32_t>(budget - used, static_cast<std::int32_t>(cand.size())));
    std::partial_sort(cand.begin(), cand.begin() + take, cand.end(), [&](std::int32_t a, std::int32_t b) {
      return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
    });
    for (std::int32_t i = 0; i < take; ++i) mask[static_cast<std::size_t>(cand[static_cast<std::size_t>(i)])] = 1;
    return mask;
  }

  /// ceil(ratio * n), forgiving the float rounding of the ratio (0.2f * 200 is 40, not 41).
  static std::int32_t share(float ratio, std::int32_t n) noexcept {
    return static_cast<std::int32_t>(std::ceil(static_cast<double>(ratio) * n * (1.0 - 1e-6)));
  }

  /// Applies high_mask to one stream. Returns the number of tokens demoted.
  template <class Cache>
  std::int32_t apply(Cache& c, seq_id s, std::int32_t layer, std::int32_t head, const float* scores) const {
    const auto m = high_mask(c, s, layer, head, scores);
    return c.apply_precision(s, layer, head, m.data());
  }
};

KVC_END_NAMESPACE
