// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Budget allocators: how a per-stream budget is split over layers and heads.
///  - uniform:    every stream keeps budget.keep_count(its length).
///  - pyramid:    PyramidKV's linear layer schedule with beta (KVCache-Factory `PyramidKVCluster`).
///  - ada:        Ada-KV's head-adaptive split: every head first keeps its top alpha_safeguard
///                share, then one top-k over all heads of the layer, so streams end with
///                different lengths (kvpress `AdaKVPress`, alpha_safeguard = 0.2).
///  - cake:       CAKE's layer preference (spread of attention) scales each layer's budget.
///  - per_layer:  the caller's budget per layer (kvpress `PerLayerCompressionPress`).
///  - head_labels: DuoAttention/RazorAttention: heads labelled streaming keep sinks + recent
///                only, retrieval heads keep everything.
/// \par Reference
/// Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling", arXiv:2406.02069;
/// Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation", arXiv:2407.11550;
/// Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences", arXiv:2503.12491;
/// Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads", arXiv:2410.10819;
/// Tang et al., "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads", arXiv:2407.15891.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <kvc/budget/budget.hpp>
#include <kvc/error.hpp>

KVC_BEGIN_NAMESPACE

struct allocator {
  enum class kind { uniform, pyramid, ada, cake, per_layer, head_labels };
  kind type = kind::uniform;
  // ada
  double alpha_safeguard = 0.2;
  // pyramid (KVCache-Factory defaults)
  std::int32_t beta = 20;
  std::int32_t window = 64;  ///< the SnapKV window counted in every layer's budget
  // per_layer: one budget per layer
  std::vector<budget> layers;
  // cake: one preference per layer (see evict::cake_preference); see cake_keep()
  std::vector<double> preference;
  /// cake: tokens every layer keeps before the preferences split the rest (the scorer's sinks,
  /// recent window and observation window: kvc::runtime::cake_allocator sets it).
  std::int32_t min_keep = 0;
  // head_labels: [num_layers][num_kv_heads], 1 = retrieval (keep all), 0 = streaming
  std::vector<std::uint8_t> retrieval;
  std::int32_t streaming_sinks = 128;   ///< kvpress DuoAttentionPress on-the-fly defaults
  std::int32_t streaming_recent = 256;

  static allocator uniform() { return {}; }
  static allocator pyramid(std::int32_t beta = 20, std::int32_t window = 64) {
    allocator a;
    a.type = kind::pyramid;
    a.beta = beta;
    a.window = window;
    a.validate();
    return a;
  }
  static allocator ada(double alpha_safeguard = 0.2) {
    allocator a;
    a.type = kind::ada;
    a.alpha_safeguard = alpha_safeguard;
    a.validate();
    return a;
  }
  static allocator per_layer_budgets(std::vector<budget> per_layer) {
    allocator a;
    a.type = kind::per_layer;
    a.layers = std::move(per_layer);
    a.validate();
    return a;
  }
  static allocator cake(std::vector<double> preference, std::int32_t min_keep = 0) {
    allocator a;
    a.type = kind::cake;
    a.preference = std::move(preference);
    a.min_keep = min_keep;
    a.validate();
    return a;
  }
  static allocator head_labels(std::vector<std::uint8_t> retrieval, std::int32_t sinks = 128,
                               std::int32_t recent = 256) {
    allocator a;
    a.type = kind::head_labels;
    a.retrieval = std::move(retrieval);
    a.streaming_sinks = sinks;
    a.streaming_recent = recent;
    a.validate();
    return a;
  }

  void validate() const {
    KVC_EXPECTS(alpha_safeguard >= 0.0 && alpha_safeguard <= 1.0, "alpha_safeguard = ", alpha_safeguard,
                ", expected a fraction in [0, 1]");
    KVC_EXPECTS(beta >= 1, "beta = ", beta, ", expected >= 1");
    KVC_EXPECTS(window >= 0, "window = ", window, ", expected >= 0");
    for (std::size_t i = 0; i < layers.size(); ++i) layers[i].validate("per_layer budget");
    for (std::size_t i = 0; i < preference.size(); ++i)
      KVC_EXPECTS(std::isfinite(preference[i]) && preference[i] >= 0.0, "preference[", i, "] = ", preference[i],
                  ", expected finite >= 0");
    KVC_EXPECTS(min_keep >= 0, "min_keep = ", min_keep, ", expected >= 0 tokens");
    KVC_EXPECTS(streaming_sinks >= 0 && streaming_recent >= 0, "streaming sinks/recent = ", streaming_sinks, "/",
                streaming_recent, ", expected >= 0");
  }

  /// Checks the allocator against a model's shape (the per-layer lists must name every layer/head).
  void check_shape(std::int32_t num_layers, std::int32_t num_kv_heads) const {
    if (type == kind::per_layer)
      KVC_EXPECTS(static_cast<std::int32_t>(layers.size()) == num_layers, "per_layer budgets: ", layers.size(),
                  " layers given, expected num_layers = ", num_layers);
    if (type == kind::cake)
      KVC_EXPECTS(static_cast<std::int32_t>(preference.size()) == num_layers, "cake preference: ", preference.size(),
                  " layers given, expected num_layers = ", num_layers);
    if (type == kind::head_labels)
      KVC_EXPECTS(static_cast<std::int64_t>(retrieval.size()) == std::int64_t{num_layers} * num_kv_heads,
                  "head labels: ", retrieval.size(), " given, expected num_layers * num_kv_heads = ",
                  std::int64_t{num_layers} * num_kv_heads);
  }

  /// Whether (layer, head) is a retrieval head (head_labels only; true otherwise).
  bool is_retrieval(std::int32_t layer, std::int32_t head, std::int32_t num_kv_heads) const {
    if (type != kind::head_labels) return true;
    // Without these checks (layer 0, head num_kv_heads) would silently read layer 1's first label.
    KVC_EXPECTS(num_kv_heads > 0 && head >= 0 && head < num_kv_heads, "head = ", head, " (layer ", layer,
                ") is unknown: expected 0..", num_kv_heads - 1, " (num_kv_heads = ", num_kv_heads, ")");
    KVC_EXPECTS(layer >= 0, "layer = ", layer, ", expected >= 0");
    const std::size_t i = static_cast<std::size_t>(layer) * num_kv_heads + head;
    KVC_EXPECTS(i < retrieval.size(), "head (layer ", layer, ", kv_head ", head, ") is unknown: ", retrieval.size(),
                " head labels given");
    return retrieval[i] != 0;
  }

  /// Tokens kept by one stream of `length` tokens in `layer` under the per-stream budget `b`
  /// (not for ada, which needs the scores of the whole layer). A token budget above the length
  /// keeps everything. `seen`: the tokens the layer has seen (the same for every layer of a
  /// sequence; a value below `length` counts as `length`), from which cake splits its layer budgets so that every layer
  /// computes the same split even when earlier compressions left the layers different lengths.
  std::int32_t keep_for(const budget& b, std::int32_t length, std::int32_t layer, std::int32_t num_layers,
                        std::int32_t seen = 0) const {
    switch (type) {
      case kind::uniform:
      case kind::ada:
      case kind::head_labels: return b.keep_count_clamped(length);
      case kind::per_layer:
        KVC_EXPECTS(layer >= 0 && layer < static_cast<std::int32_t>(layers.size()), "layer = ", layer,
                    ", expected 0..", static_cast<std::int32_t>(layers.size()) - 1, " (per_layer budgets given)");
        return layers[static_cast<std::size_t>(layer)].keep_count_clamped(length);
      case kind::cake: {
        KVC_EXPECTS(layer >= 0 && layer < static_cast<std::int32_t>(preference.size()), "layer = ", layer,
                    ", expected 0..", static_cast<std::int32_t>(preference.size()) - 1, " (cake preferences given)");
        const std::int32_t all = std::max(seen, length);
        return std::min(length, cake_keep(b.keep_count_clamped(all), all)[static_cast<std::size_t>(layer)]);
      }
      case kind::pyramid: return pyramid_keep(b.keep_count_clamped(length), length, layer, num_layers);
    }
    return length;
  }

  /// CAKE's layer budgets when every layer has seen `length` tokens and the uniform budget is
  /// `base` per layer: each layer first keeps f = min(min_keep, base), then the remaining L·(base − f)
  /// tokens are split in proportion to the preferences, B_l = f + (L·(base − f))·P_l / ΣP (CAKE's
  /// B_l = P_l / ΣP · B_total, Qin et al. 2025, Sec. 3, over the budget above the floor), capped
  /// at `length` with the excess passed on to the uncapped layers by preference (equally among
  /// those without any), rounded by largest remainder (ties to the lower layer). The total is
  /// exactly L·base, and no layer keeps fewer than f tokens.
  /// Why the floor: CAKE's shares without one gave SmolLM2's least-preferred layers fewer tokens
  /// than sinks + observation window under decode-time streaming; those layers then dropped
  /// tokens the window scores as most important (GPL-3 stream protocol, ratio 0.5: Δppl +37.0,
  /// against +2.1 for snapkv with the same scores; see docs/results.md).
  std::vector<std::int32_t> cake_keep(std::int32_t base, std::int32_t length) const {
    const std::size_t L = preference.size();
    std::vector<std::int32_t> keep(L, base);
    double total = 0;
    for (double p : preference) total += p;
    if (L == 0 || !(total > 0)) return keep;
    const std::int32_t f = std::min(min_keep, base);
    const std::int32_t cap = length - f;  // >= base - f >= 0 since base <= length
    std::int64_t rest = static_cast<std::int64_t>(L) * (base - f);
    std::vector<double> x(L, 0.0);
    std::vector<char> capped(L, 0);
    for (bool again = true; again;) {  // water-filling: at most L rounds
      again = false;
      double s = 0;
      std::size_t active = 0;
      for (std::size_t l = 0; l < L; ++l)
        if (!capped[l]) s += preference[l], ++active;
      if (active == 0) break;
      for (std::size_t l = 0; l < L; ++l)
        if (!capped[l]) x[l] = static_cast<double>(rest) * (s > 0 ? preference[l] / s : 1.0 / static_cast<double>(active));
      for (std::size_t l = 0; l < L; ++l)
        if (!capped[l] && x[l] >= cap) {
          capped[l] = 1;
          x[l] = cap;
          rest -= cap;
          again = true;
        }
    }
    std::int64_t given = 0;
    std::vector<std::pair<double, std::size_t>> frac;
    for (std::size_t l = 0; l < L; ++l) {
      const double fl = std::floor(x[l]);
      keep[l] = f + static_cast<std::int32_t>(fl);
      given += static_cast<std::int64_t>(fl);
      if (!capped[l]) frac.push_back({x[l] - fl, l});
    }
    // Largest remainders first; the rounding never lifts a layer past its cap (x < cap there).
    std::stable_sort(frac.begin(), frac.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    const std::int64_t want = static_cast<std::int64_t>(L) * (base - f);
    for (std::size_t i = 0; given < want && i < frac.size(); ++i, ++given) ++keep[frac[i].second];
    // Rounding error in the shares can leave Σ floor one above the total: take it back from the
    // smallest remainders.
    for (std::size_t i = frac.size(); given > want && i-- > 0;)
      if (keep[frac[i].second] > f) --keep[frac[i].second], --given;
    return keep;
  }

  /// KVCache-Factory's PyramidKVCluster schedule: capacity C (window included) per layer on
  /// average; min = (C - w) / beta, max = 2 (C - w) - min (clipped to q_len - w), decreasing
  /// linearly in integer steps from layer 0; short prompts fall back to uniform C.
  std::int32_t pyramid_keep(std::int32_t C, std::int32_t q_len, std::int32_t layer, std::int32_t num_layers) const {
    const std::int32_t w = window;
    if (q_len <= C) return q_len;
    if (C - w <= 0 || num_layers < 2 || q_len < (C - w) * 2) return C;
    std::int32_t min_num = (C - w) / beta;
    std::int32_t max_num = (C - w) * 2 - min_num;
    if (max_num >= q_len - w) {
      max_num = q_len - w;
      min_num = (C - w) * 2 - max_num;
    }
    const std::int32_t steps = (max_num - min_num) / (num_layers - 1);
    return std::min(q_len, max_num - layer * steps + w);
  }

  std::string name() const {
    switch (type) {
      case kind::uniform: return "uniform";
      case kind::pyramid: return "pyramid";
      case kind::ada: return "ada";
      case kind::cake: return "cake";
      case kind::per_layer: return "per_layer";
      case kind::head_labels: return "head_labels";
    }
    return "?";
  }
};

KVC_END_NAMESPACE
