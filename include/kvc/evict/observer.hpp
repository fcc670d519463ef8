// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `attention_observer`: what decode-time scorers (H2O, TOVA, Scissorhands, A2SF) observe. After
/// each decode attention step the engine hands it the step's probabilities
/// (kvc::cpu::decode_attention's `probs` or `group_probs`); the observer keeps, per stream and
/// aligned with the stream's tokens, the accumulated attention, a decayed accumulation, the last
/// step's attention and a bit history of "unimportant" steps. The compressor compacts it together
/// with the cache on every keep, so stats stay aligned with tokens.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <tuple>
#include <vector>

#include <kvc/evict/core.hpp>
#include <kvc/evict/window_attention.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

/// Per-token statistics of one stream.
struct stream_stats {
  std::vector<float> sum;            ///< Σ over steps of the step's attention (H2O)
  std::vector<float> decayed;        ///< a ← λ·a + p each step (A2SF)
  std::vector<float> last;           ///< the last step's attention (TOVA)
  std::vector<std::uint64_t> low;    ///< bit s set: attention below 1/n, s steps ago (Scissorhands)
  /// How many observed queries saw the token (a causal prefill window's early queries do not see
  /// its late tokens; a token appended after some steps missed them): sum / count is kvpress's
  /// observed attention, the mean attention a token got from the queries that saw it.
  std::vector<float> count;
  std::int64_t steps = 0;
};

struct observer_params {
  group_agg agg = group_agg::mean;  ///< how a kv-head combines its query heads' attention
  float forgetting = 1.0f;          ///< A2SF forgetting factor λ (1: plain accumulation)
  bool track_sum = true, track_decayed = true, track_last = true, track_low = true;
  /// Off by default: it costs one more pass over the stream per observed step and 4 bytes per
  /// token, and only h2o(normalize=1) reads it (the registry turns it on for that spec).
  bool track_count = false;
};

/// Threads: not synchronised: non-const calls on one instance need exclusive access (docs/threading.md).
class attention_observer {
 public:
  explicit attention_observer(const observer_params& p = {}) : p_(p) {
    KVC_EXPECTS_IN("kvc::evict::attention_observer::attention_observer", p.forgetting > 0.0f && p.forgetting <= 1.0f, "forgetting = ", p.forgetting,
                ", expected a factor in (0, 1]");
  }
  const observer_params& params() const noexcept { return p_; }

  /// One decode step of one layer from per-query-head probabilities (decode_options::probs):
  /// probs[qh * stride + t] for the G = num_q_heads / num_kv_heads heads of each group.
  template <class Cache>
  void observe(const Cache& cache, std::int32_t seq, std::int32_t layer, const float* probs, std::int32_t num_q_heads,
               std::int32_t stride) {
    const std::int32_t H = cache.config().num_kv_heads;
    KVC_EXPECTS_IN("kvc::evict::attention_observer::observe", num_q_heads > 0 && num_q_heads % H == 0, "num_q_heads = ", num_q_heads,
                ", expected a positive multiple of num_kv_heads = ", H);
    KVC_EXPECTS_IN("kvc::evict::attention_observer::observe", probs != nullptr, "probs = null, expected decode_options::probs of the step");
    const std::int32_t G = num_q_heads / H;
    for (std::int32_t h = 0; h < H; ++h) {
      const std::int32_t n = cache.length(seq, layer, h);
      KVC_EXPECTS_IN("kvc::evict::attention_observer::observe", stride >= n, "stride = ", stride, ", expected >= the stream length ", n);
      buf_.resize(static_cast<std::size_t>(n));
      aggregate_group(probs + static_cast<std::size_t>(h) * G * stride, G, n, static_cast<std::size_t>(stride), p_.agg,
                      buf_.data());
      step(stats_for(seq, layer, h, n), buf_.data(), n);
    }
  }

  /// One decode step from group sums (decode_options::group_probs, [num_kv_heads][stride]); the
  /// mean over the group is group_probs / group_size. Only for agg = mean.
  template <class Cache>
  void observe_group(const Cache& cache, std::int32_t seq, std::int32_t layer, const float* group_probs,
                     std::int32_t stride, std::int32_t group_size) {
    KVC_EXPECTS_IN("kvc::evict::attention_observer::observe_group", p_.agg == group_agg::mean, "agg = max, expected mean: group_probs are sums over the group; "
                                           "pass per-head probs to observe() for max");
    KVC_EXPECTS_IN("kvc::evict::attention_observer::observe_group", group_size > 0, "group_size = ", group_size, ", expected > 0");
    KVC_EXPECTS_IN("kvc::evict::attention_observer::observe_group", group_probs != nullptr, "group_probs = null");
    const std::int32_t H = cache.config().num_kv_heads;
    for (std::int32_t h = 0; h < H; ++h) {
      const std::int32_t n = cache.length(seq, layer, h);
      KVC_EXPECTS_IN("kvc::evict::attention_observer::observe_group", stride >= n, "stride = ", stride, ", expected >= the stream length ", n);
      // The group mean r / group_size is taken inside step's passes: a separate pass into a buffer
      // was a third of observe_group's time (bench_evict observer_ratio, 2026-11).
      step(stats_for(seq, layer, h, n), group_probs + static_cast<std::size_t>(h) * stride, n, -1, nullptr,
           static_cast<float>(group_size));
    }
  }

  /// Seeds the statistics at prefill with the attention of a window of queries (each query counts
  /// as one step), so decode-time scorers can also compress right after prefill.
  template <class Cache>
  void observe_window(const Cache& cache, std::int32_t seq, std::int32_t layer, const query_window& w) {
    gathered_layer g;
    gather_layer(cache, seq, layer, w.num_q_heads, reads_keys, g);
    check_window(w, g.in, "attention_observer::observe_window");
    const std::int32_t H = g.in.num_kv_heads, G = g.in.group();
    std::vector<float> probs, per_q;
    for (std::int32_t h = 0; h < H; ++h) {
      const head_input& hi = g.in.heads[static_cast<std::size_t>(h)];
      const std::int32_t n = hi.n;
      per_q.assign(static_cast<std::size_t>(G) * w.n * n, 0.0f);
      for (std::int32_t gq = 0; gq < G; ++gq) {
        window_probs(hi, w, h * G + gq, g.in.seen, g.in.head_dim, probs);
        for (std::int32_t i = 0; i < w.n; ++i)
          std::copy(probs.begin() + static_cast<std::ptrdiff_t>(i) * n, probs.begin() + static_cast<std::ptrdiff_t>(i + 1) * n,
                    per_q.begin() + (static_cast<std::ptrdiff_t>(i) * G + gq) * n);
      }
      stream_stats& st = stats_for(seq, layer, h, n);
      buf_.resize(static_cast<std::size_t>(n));
      for (std::int32_t i = 0; i < w.n; ++i) {
        aggregate_group(per_q.data() + static_cast<std::size_t>(i) * G * n, G, n, static_cast<std::size_t>(n), p_.agg,
                        buf_.data());
        // Tokens this query cannot see are not "unimportant" for it: count only visible ones.
        step(st, buf_.data(), n, w.position(i, g.in.seen), hi.positions);
      }
    }
  }

  /// The statistics of one stream, or null if it has never been observed.
  const stream_stats* find(std::int32_t seq, std::int32_t layer, std::int32_t head) const {
    auto it = s_.find(std::make_tuple(seq, layer, head));
    return it == s_.end() ? nullptr : &it->second;
  }

  /// Compacts the statistics of every head of one layer exactly as kv_cache::keep_layer does.
  /// Checks every head's indices (strictly increasing, within the statistics held) before touching
  /// any, so a bad selection throws kvc::error and leaves the statistics unchanged.
  void keep_layer(std::int32_t seq, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) {
    for (std::size_t h = 0; h < kept.size(); ++h) {
      auto it = s_.find(std::make_tuple(seq, layer, static_cast<std::int32_t>(h)));
      if (it == s_.end()) continue;
      const stream_stats& st = it->second;
      const std::size_t have = held(st);
      const auto& k = kept[h];
      for (std::size_t i = 0; i < k.size(); ++i)
        KVC_EXPECTS_IN("kvc::evict::attention_observer::keep_layer", k[i] >= 0 && static_cast<std::size_t>(k[i]) < have && (i == 0 || k[i] > k[i - 1]),
                    "attention_observer::keep_layer: kept[", h, "][", i, "] = ", k[i],
                    ", expected strictly increasing indices in 0..", static_cast<std::int64_t>(have) - 1,
                    " (the tokens observed in head ", h, ")");
    }
    for (std::size_t h = 0; h < kept.size(); ++h) {
      auto it = s_.find(std::make_tuple(seq, layer, static_cast<std::int32_t>(h)));
      if (it == s_.end()) continue;
      stream_stats& st = it->second;
      compact(st.sum, kept[h]);
      compact(st.decayed, kept[h]);
      compact(st.last, kept[h]);
      compact(st.low, kept[h]);
      compact(st.count, kept[h]);
    }
  }

  /// Drops the statistics of every token at stream index >= lengths[h] in head h of one layer
  /// (a stream rewound to its first lengths[h] tokens, kv_cache::rewind). Never throws for a
  /// head without statistics or holding fewer; lengths.size() must be the heads observed.
  void truncate(std::int32_t seq, std::int32_t layer, const std::vector<std::int32_t>& lengths) {
    for (std::size_t h = 0; h < lengths.size(); ++h)
      KVC_EXPECTS_IN("kvc::evict::attention_observer::truncate", lengths[h] >= 0, "lengths[", h, "] = ", lengths[h],
                     ", expected >= 0");
    for (std::size_t h = 0; h < lengths.size(); ++h) {
      auto it = s_.find(std::make_tuple(seq, layer, static_cast<std::int32_t>(h)));
      if (it == s_.end()) continue;
      const std::size_t n = static_cast<std::size_t>(lengths[h]);
      stream_stats& st = it->second;
      auto cut = [n](auto& v) { v.resize(std::min(v.size(), n)); };
      cut(st.sum);
      cut(st.decayed);
      cut(st.last);
      cut(st.low);
      cut(st.count);
    }
  }

  /// Gives sequence `to` a copy of `from`'s statistics, as kv_cache::fork gives it `from`'s
  /// tokens: without it a forked beam would start its history at zero and its first decode-time
  /// eviction would rank the shared prefix as never attended. `to` must hold no statistics yet.
  void fork(std::int32_t from, std::int32_t to) {
    detail::fork_entries(s_, from, to, "kvc::evict::attention_observer::fork", "statistics");
  }

  void remove_sequence(std::int32_t seq) { detail::erase_entries(s_, seq); }

  /// Statistics of every kv head of one layer, keyed as another layer's (share_layer's plan).
  using layer_stats = std::map<std::tuple<std::int32_t, std::int32_t, std::int32_t>, stream_stats>;

  /// Layer `layer` of seq takes a copy of layer `from`'s statistics, as the store's share_layer
  /// gives it from's tokens: without it the layer's statistics would describe tokens it no longer
  /// holds. The copy carries from's history (what from's queries paid each token) as the prior a
  /// fork carries; the layer's own queries add to it from the next step. Strong guarantee.
  void share_layer(std::int32_t seq, std::int32_t layer, std::int32_t from) {
    replace_layer(seq, layer, copy_layer(seq, from, layer));
  }
  /// The plan half of share_layer: copies of from's statistics keyed as `as_layer`'s. May throw
  /// (std::bad_alloc, layer == from), changing nothing.
  layer_stats copy_layer(std::int32_t seq, std::int32_t from, std::int32_t as_layer) const {
    KVC_EXPECTS_IN("kvc::evict::attention_observer::share_layer", from != as_layer, "from = layer = ", from,
                   ", expected two different layers");
    layer_stats copies;
    for (auto it = first_of(seq, from), end = first_of(seq, from + 1); it != end; ++it)
      copies.emplace(std::make_tuple(seq, as_layer, std::get<2>(it->first)), it->second);
    return copies;
  }
  /// The commit half: drops layer's statistics and moves `copies` (from copy_layer) in; allocates
  /// nothing (map nodes are spliced).
  void replace_layer(std::int32_t seq, std::int32_t layer, layer_stats&& copies) noexcept {
    s_.erase(first_of(seq, layer), first_of(seq, layer + 1));
    s_.merge(copies);
  }

  /// Host bytes held by the statistics.
  std::size_t bytes() const noexcept {
    std::size_t b = 0;
    for (const auto& kv : s_)
      b += 4 * (kv.second.sum.size() + kv.second.decayed.size() + kv.second.last.size() + kv.second.count.size()) +
           8 * kv.second.low.size();
    return b;
  }

 private:
  /// The first entry at or after (seq, layer, any head): the layer's entries end at layer + 1's.
  layer_stats::const_iterator first_of(std::int32_t seq, std::int32_t layer) const {
    return s_.lower_bound(std::make_tuple(seq, layer, std::numeric_limits<std::int32_t>::min()));
  }

  stream_stats& stats_for(std::int32_t seq, std::int32_t layer, std::int32_t h, std::int32_t n) {
    stream_stats& st = s_[std::make_tuple(seq, layer, h)];
    const std::size_t have = held(st);
    KVC_EXPECTS_IN("kvc::evict::attention_observer::observe", have <= static_cast<std::size_t>(n),
                   "observer stats of (seq ", seq, ", layer ", layer, ", head ", h, ") hold ", have,
                   " tokens but the stream has ", n,
                   "; expected compaction through the compressor (or attention_observer::keep_layer)");
    if (p_.track_sum) st.sum.resize(static_cast<std::size_t>(n), 0.0f);
    if (p_.track_decayed) st.decayed.resize(static_cast<std::size_t>(n), 0.0f);
    if (p_.track_last) st.last.resize(static_cast<std::size_t>(n), 0.0f);
    if (p_.track_low) st.low.resize(static_cast<std::size_t>(n), 0u);
    if (p_.track_count) st.count.resize(static_cast<std::size_t>(n), 0.0f);
    return st;
  }

  /// The tokens a stream's statistics cover (the longest tracked field).
  static std::size_t held(const stream_stats& st) {
    return std::max({st.sum.size(), st.decayed.size(), st.last.size(), st.low.size(), st.count.size()});
  }

  /// One step of attention p[t] / div (div: the group size for group sums, else 1, exact).
  void step(stream_stats& st, const float* p, std::int32_t n, std::int32_t qpos = -1,
            const std::int32_t* kpos = nullptr, float div = 1.0f) {
    std::int32_t visible = n;
    if (kpos) {
      visible = 0;
      for (std::int32_t t = 0; t < n; ++t) visible += kpos[t] <= qpos;
    }
    if (p_.track_sum)
      for (std::int32_t t = 0; t < n; ++t) st.sum[static_cast<std::size_t>(t)] += p[t] / div;
    if (p_.track_decayed) {
      const float l = p_.forgetting;
      for (std::int32_t t = 0; t < n; ++t)
        st.decayed[static_cast<std::size_t>(t)] = l * st.decayed[static_cast<std::size_t>(t)] + p[t] / div;
    }
    if (p_.track_last)
      for (std::int32_t t = 0; t < n; ++t) st.last[static_cast<std::size_t>(t)] = p[t] / div;
    if (p_.track_low) {
      const float thr = visible > 0 ? 1.0f / static_cast<float>(visible) : 0.0f;
      for (std::int32_t t = 0; t < n; ++t) {
        const bool seen_by_q = !kpos || kpos[t] <= qpos;
        auto& b = st.low[static_cast<std::size_t>(t)];
        if (seen_by_q) b = (b << 1) | (p[t] / div < thr ? 1u : 0u);
      }
    }
    if (p_.track_count)
      for (std::int32_t t = 0; t < n; ++t) st.count[static_cast<std::size_t>(t)] += !kpos || kpos[t] <= qpos ? 1.0f : 0.0f;
    ++st.steps;
  }

  template <class V>
  static void compact(V& x, const std::vector<std::int32_t>& kept) {
    if (x.empty()) return;
    for (std::size_t i = 0; i < kept.size(); ++i) x[i] = x[static_cast<std::size_t>(kept[i])];
    x.resize(kept.size());
  }

  observer_params p_;
  layer_stats s_;  ///< (seq, layer, kv head) -> statistics
  std::vector<float> buf_;
};

}  // namespace evict
KVC_END_NAMESPACE
