// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// CaM (Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024):
/// eviction perturbs the attention output whichever tokens go; CaM merges each evicted token's
/// value into kept tokens instead of dropping it, more of it the more attention it had.
///
/// The published rule (the authors' code, per evicted token e, per head): with a_e its attention
/// score and ā the mean score of the kept tokens it is compared with,
///   p_e = clamp(a_e / ā, 0, 1),   mask ~ Bernoulli(p_e),
///   v_j += mask · v_e / M   for each of the M (merge budget, 32) kept tokens that follow e;
/// keys are not changed, e's key is dropped. That is an additive update of values, spread over M
/// recipients, not a weighted mean of disjoint groups, so it is applied through
/// merged_cache::keep_layer_mix_values rather than merge_layer, and log-weights are unchanged.
///
/// What this implements, and where it differs:
///  - the deterministic expectation of the Bernoulli merge: v_j += p_e · v_e / M' (no sampling,
///    so a run is reproducible and the merge is a function of the scores);
///  - ā is the mean score over all kept tokens of the head (the authors' code averages over its
///    start and recent windows, which are the kept tokens of their StreamingLLM-shaped policy);
///  - the recipients are the M kept tokens that follow e in stream order; when fewer than M
///    follow, those that do (M' < M), and when none follows, the M kept tokens nearest before e,
///    so an evicted token always has somewhere to go while any token is kept; dividing by M'
///    keeps the total added p_e · v_e, what M recipients would get;
///  - any keep decision works (kvc/evict's scorers and selection give one per kv head), and any
///    per-token score (e.g. the group-summed probabilities of decode_options::group_probs, or an
///    accumulated H2O score).
/// A merged (log-weighted) evicted token contributes as one token, as in the paper's rule.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/store/merged_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace merge {

struct cam_options {
  /// M: kept tokens each evicted value is spread over (the authors' merge budget, 32).
  std::int32_t merge_span = 32;
};

/// The value updates CaM makes for one kv head: scores [n] (finite, >= 0), kept strictly
/// increasing indices into 0..n-1. Returns one value_mix per (evicted token with p_e > 0,
/// recipient); empty when nothing is kept or nothing is evicted.
inline std::vector<value_mix> cam_plan(const float* scores, std::int32_t n, const std::vector<std::int32_t>& kept,
                                       const cam_options& o = {}) {
  constexpr const char* who = "kvc::merge::cam_plan";
  KVC_EXPECTS_IN(who, o.merge_span >= 1, "cam_options.merge_span = ", o.merge_span, ", expected >= 1");
  KVC_EXPECTS_IN(who, n >= 0, "n = ", n, ", expected >= 0 tokens");
  KVC_EXPECTS_IN(who, n == 0 || scores != nullptr, "scores is null with n = ", n);
  for (std::int32_t t = 0; t < n; ++t)
    KVC_EXPECTS_IN(who, std::isfinite(scores[t]) && scores[t] >= 0.0f, "scores[", t, "] = ", scores[t],
                   ", expected a finite attention score >= 0");
  for (std::size_t i = 0; i < kept.size(); ++i) {
    KVC_EXPECTS_IN(who, kept[i] >= 0 && kept[i] < n, "kept[", i, "] = ", kept[i], ", expected 0..", n - 1);
    KVC_EXPECTS_IN(who, i == 0 || kept[i] > kept[i - 1], "kept[", i, "] = ", kept[i], " after ", kept[i - 1],
                   ", expected strictly increasing indices");
  }
  std::vector<value_mix> out;
  if (kept.empty()) return out;
  double mean = 0;
  for (std::int32_t t : kept) mean += scores[t];
  mean /= static_cast<double>(kept.size());
  const std::int32_t K = static_cast<std::int32_t>(kept.size()), M = o.merge_span;
  std::int32_t next = 0;  // first kept index > e
  for (std::int32_t e = 0; e < n; ++e) {
    while (next < K && kept[static_cast<std::size_t>(next)] <= e) ++next;
    if (next > 0 && kept[static_cast<std::size_t>(next - 1)] == e) continue;  // e is kept
    // p_e = clamp(a_e / ā, 0, 1); ā = 0 means no kept token had attention: any positive score merges fully.
    const double p = mean > 0 ? std::min(1.0, static_cast<double>(scores[e]) / mean) : (scores[e] > 0 ? 1.0 : 0.0);
    if (p <= 0) continue;
    std::int32_t lo = next, hi = std::min(K, next + M);  // the kept tokens after e
    if (lo == K) lo = std::max(0, K - M), hi = K;          // none after: the nearest before
    const float c = static_cast<float>(p / (hi - lo));
    for (std::int32_t i = lo; i < hi; ++i) out.push_back({kept[static_cast<std::size_t>(i)], e, c});
  }
  return out;
}

/// One CaM step on one layer: for every kv head h, keep kept[h] and merge the evicted values by
/// cam_plan(scores[h]). All heads change or none does (merged_cache::keep_layer_mix_values).
/// \param scores  [num_kv_heads][length of the head] attention scores, finite, >= 0
/// \param kept    [num_kv_heads] strictly increasing kept indices (e.g. an evict::layer_selection)
template <class Store>
void cam_merge_layer(basic_merged_cache<Store>& cache, seq_id s, std::int32_t layer, const std::vector<std::vector<float>>& scores,
                     const std::vector<std::vector<std::int32_t>>& kept, const cam_options& o = {}) {
  constexpr const char* who = "kvc::merge::cam_merge_layer";
  const std::int32_t H = cache.config().num_kv_heads;
  KVC_EXPECTS_IN(who, static_cast<std::int32_t>(scores.size()) == H, "scores.size() = ", scores.size(),
                 ", expected num_kv_heads = ", H);
  KVC_EXPECTS_IN(who, static_cast<std::int32_t>(kept.size()) == H, "kept.size() = ", kept.size(),
                 ", expected num_kv_heads = ", H);
  std::vector<std::vector<value_mix>> mixes(static_cast<std::size_t>(H));
  for (std::int32_t h = 0; h < H; ++h) {
    const std::int32_t n = cache.length(s, layer, h);
    const auto& sh = scores[static_cast<std::size_t>(h)];
    KVC_EXPECTS_IN(who, static_cast<std::int32_t>(sh.size()) == n, "scores[", h, "].size() = ", sh.size(),
                   ", expected the head's length ", n);
    mixes[static_cast<std::size_t>(h)] = cam_plan(sh.data(), n, kept[static_cast<std::size_t>(h)], o);
  }
  cache.keep_layer_mix_values(s, layer, kept, mixes);
}

}  // namespace merge
KVC_END_NAMESPACE
