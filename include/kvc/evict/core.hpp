// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// The eviction framework shared by every scorer:
///  - what a scorer reads (`layer_input`: the streams of one layer gathered as float) and what it
///    may observe (`observations`: a query window, decode attention, query statistics);
///  - `layer_scores`, one float per token per kv-head (higher = keep);
///  - `select_top`: exact-size selection that protects sinks and the recent window, breaks ties
///    deterministically (higher score first, then lower index) and returns sorted indices;
///  - GQA aggregation over the query group (mean or max);
///  - `apply_layer`: the single mutation point (kv_cache::keep_layer, so emptied pages go back to
///    the pool at once), with optional re-rotation of kept keys to contiguous positions.
///
/// A scorer S is a small value type:
/// \code
///   struct S {
///     using params_type = s_params;                 // named fields, published defaults
///     using observation_type = no_observation;      // or query_window, attention_observer, query_stats
///     static constexpr unsigned reads = reads_keys; // which of K/V it reads (gathered as float)
///     static constexpr const char* name = "s";
///     explicit S(const params_type&);
///     protection protect() const;                   // sinks / recent window it protects
///     void score(const layer_input&, const observations&, layer_scores&) const;
///   };
/// \endcode

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvc/attention/rope.hpp>
#include <kvc/error.hpp>
#include <kvc/store/page_pool.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

/// How a kv-head combines the scores of the query heads of its GQA group.
enum class group_agg { mean, max };

inline const char* to_string(group_agg a) noexcept { return a == group_agg::mean ? "mean" : "max"; }

/// Tokens every selection keeps whatever their score: the first `sinks` tokens of the stream
/// (attention sinks, StreamingLLM) and the last `recent` tokens (the local window). When the
/// budget is smaller than both together, sinks are kept first, then the most recent tokens.
struct protection {
  std::int32_t sinks = 4;
  std::int32_t recent = 0;
};

/// Bits of `reads`: what the scorer needs gathered from the cache.
inline constexpr unsigned reads_nothing = 0u;
inline constexpr unsigned reads_keys = 1u;
inline constexpr unsigned reads_values = 2u;

/// One stream (one kv-head of one layer of one sequence) as a scorer sees it.
struct head_input {
  const float* k = nullptr;                ///< [n][head_dim], null unless the scorer reads keys
  const float* v = nullptr;                ///< [n][head_dim], null unless the scorer reads values
  const std::int32_t* positions = nullptr; ///< [n] original positions
  std::int32_t n = 0;
};

/// The kv-heads of one layer of one sequence.
struct layer_input {
  std::int32_t seq = 0;
  std::int32_t layer = 0;
  std::int32_t num_layers = 1;
  std::int32_t num_kv_heads = 1;
  std::int32_t num_q_heads = 1;  ///< query heads of the model (a multiple of num_kv_heads)
  std::int32_t head_dim = 0;
  std::int32_t seen = 0;         ///< tokens ever appended to this layer of the sequence
  std::vector<head_input> heads; ///< [num_kv_heads]
  std::int32_t group() const noexcept { return num_q_heads / num_kv_heads; }
};

/// Scores of one layer: scores[h][t] for token t of kv-head h; higher means keep.
using layer_scores = std::vector<std::vector<float>>;

/// Nothing observed: the scorer reads keys and values only.
struct no_observation {};

/// A window of queries at prefill (SnapKV's observation window, Finch's question span, or every
/// prompt query for non-causal chunked attention).
struct query_window {
  const float* q = nullptr;                ///< [n][num_q_heads][head_dim], rotated like the stored keys
  const std::int32_t* positions = nullptr; ///< [n] query positions; null: the layer's last n positions
  std::int32_t n = 0;
  std::int32_t num_q_heads = 0;
  std::int32_t head_dim = 0;
  /// Position of query i.
  std::int32_t position(std::int32_t i, std::int32_t seen) const noexcept {
    return positions ? positions[i] : seen - n + i;
  }
};

/// Statistics of pre-RoPE queries (expected attention): per query head the mean and, optionally,
/// the covariance, and the RoPE that maps them to future positions.
struct query_stats {
  const float* mean = nullptr;  ///< [num_q_heads][head_dim]
  const float* cov = nullptr;   ///< [num_q_heads][head_dim][head_dim], or null (mean only)
  std::int32_t num_q_heads = 0;
  std::int32_t head_dim = 0;
  std::int32_t next_position = -1;  ///< first future position; -1: the layer's seen()
  const rope* rotary = nullptr;     ///< required: how keys were rotated
};

class attention_observer;

/// Everything a scorer may observe; each scorer reads the member of its observation_type.
struct observations {
  const query_window* window = nullptr;
  attention_observer* attention = nullptr;
  const query_stats* stats = nullptr;
};

namespace detail {

template <class O>
struct observation_name;
template <>
struct observation_name<no_observation> {
  static constexpr const char* value = "nothing";
};
template <>
struct observation_name<query_window> {
  static constexpr const char* value = "a query_window (observations::window)";
};
template <>
struct observation_name<attention_observer> {
  static constexpr const char* value = "an attention_observer (observations::attention)";
};
template <>
struct observation_name<query_stats> {
  static constexpr const char* value = "query_stats (observations::stats)";
};

[[noreturn]] inline void missing_observation(const char* scorer, const char* what) {
  ::kvc::detail::fail(::kvc::detail::concat("kvc::evict::", scorer, ": observations = none, expected ", what));
}

inline const query_window& need_window(const observations& o, const char* scorer) {
  if (!o.window) missing_observation(scorer, observation_name<query_window>::value);
  return *o.window;
}
inline const query_stats& need_stats(const observations& o, const char* scorer) {
  if (!o.stats) missing_observation(scorer, observation_name<query_stats>::value);
  return *o.stats;
}

/// Strict weak order "a ranks before b": higher score first, NaN last, then lower index.
struct rank_before {
  const float* s;
  bool operator()(std::int32_t a, std::int32_t b) const noexcept {
    float x = s[a], y = s[b];
    if (std::isnan(x)) x = -std::numeric_limits<float>::infinity();
    if (std::isnan(y)) y = -std::numeric_limits<float>::infinity();
    if (x != y) return x > y;
    return a < b;
  }
};

inline float l2(const float* x, std::int32_t d) noexcept {
  double s = 0;
  for (std::int32_t i = 0; i < d; ++i) s += static_cast<double>(x[i]) * x[i];
  return static_cast<float>(std::sqrt(s));
}

/// Softmax of x[0..n) in place (max-subtracted, in double accumulation).
inline void softmax_inplace(float* x, std::int32_t n) noexcept {
  if (n <= 0) return;
  float m = x[0];
  for (std::int32_t i = 1; i < n; ++i) m = std::max(m, x[i]);
  double s = 0;
  for (std::int32_t i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] - m));
  const float inv = static_cast<float>(1.0 / s);
  for (std::int32_t i = 0; i < n; ++i) x[i] *= inv;
}

/// The state a compressor or observer keeps per sequence lives in std::maps keyed by a pair or
/// tuple whose first element is the sequence (then layer, head). These two follow the cache's
/// fork and remove_sequence for such a map.
template <class Key>
Key first_key_of(std::int32_t seq) {
  Key k;
  std::apply([](auto&... x) { ((x = std::numeric_limits<std::decay_t<decltype(x)>>::min()), ...); }, k);
  std::get<0>(k) = seq;
  return k;
}

/// Gives `to` a copy of every entry of `from`; refuses from = to and a `to` that has entries
/// (`what`: what the entries are, for the message). All or nothing: the copies are made apart
/// and spliced in (map::merge allocates nothing), so a bad_alloc leaves the map as it was.
template <class Map>
void fork_entries(Map& m, std::int32_t from, std::int32_t to, const char* who, const char* what) {
  using Key = typename Map::key_type;
  KVC_EXPECTS_IN(who, from != to, "from = to = ", from, ", expected two different sequences");
  const auto first = m.lower_bound(first_key_of<Key>(to));
  KVC_EXPECTS_IN(who, first == m.end() || std::get<0>(first->first) != to, "to = ", to, ", expected a sequence with no ",
                 what, " yet (call remove_sequence first)");
  Map copies;
  for (auto it = m.lower_bound(first_key_of<Key>(from)); it != m.end() && std::get<0>(it->first) == from; ++it) {
    Key k = it->first;
    std::get<0>(k) = to;
    copies.emplace(k, it->second);
  }
  m.merge(copies);
}

/// Erases every entry of sequence `seq`.
template <class Map>
void erase_entries(Map& m, std::int32_t seq) {
  using Key = typename Map::key_type;
  for (auto it = m.lower_bound(first_key_of<Key>(seq)); it != m.end() && std::get<0>(it->first) == seq;)
    it = m.erase(it);
}

}  // namespace detail

/// Number of tokens `p` protects in a stream of n tokens.
inline std::int32_t protected_count(protection p, std::int32_t n) noexcept {
  return std::min(n, std::max(0, p.sinks) + std::max(0, p.recent));
}

/// Whether token t of a stream of n tokens is protected.
inline bool is_protected(protection p, std::int32_t t, std::int32_t n) noexcept {
  return t < p.sinks || t >= n - p.recent;
}

/// Chooses exactly `keep` of the n tokens: protected tokens first (sinks, then the most recent),
/// then the highest scores, ties to the lower index, NaN scores last. `out` is sorted ascending.
///
/// Threshold selection: nth_element on a float copy of the candidates' scores finds the take-th
/// best value x; one pass in index order then keeps every score above x and the lowest-indexed
/// ones equal to x, so the result comes out sorted with no sort and no index comparator. Against
/// nth_element over indices with rank_before plus a sort of the kept indices, bench_evict raw_ratio
/// (score + select / decode step, ctx:32768, ratio 0.75, CPU time, 2026-11): tova 32x8x128 0.50 ->
/// 0.30, 9x3x64 1.45 -> 0.63; h2o 32x8x128 0.60 -> 0.35, 9x3x64 0.8-1.1 -> 0.66.
inline void select_top(const float* scores, std::int32_t n, std::int32_t keep, protection p,
                       std::vector<std::int32_t>& out) {
  KVC_EXPECTS_IN("kvc::evict::select_top", keep >= 0 && keep <= n, "keep = ", keep, ", expected 0..", n, " (the stream's length)");
  KVC_EXPECTS_IN("kvc::evict::select_top", p.sinks >= 0 && p.recent >= 0, "protection = {sinks ", p.sinks, ", recent ", p.recent,
              "}, expected both >= 0");
  out.clear();
  out.reserve(static_cast<std::size_t>(keep));
  if (keep == n) {
    out.resize(static_cast<std::size_t>(n));
    std::iota(out.begin(), out.end(), 0);
    return;
  }
  const std::int32_t sinks = std::min(p.sinks, n);
  const std::int32_t recent = std::min(p.recent, n - sinks);
  if (keep <= sinks + recent) {
    const std::int32_t s = std::min(keep, sinks);
    for (std::int32_t t = 0; t < s; ++t) out.push_back(t);
    for (std::int32_t t = n - (keep - s); t < n; ++t) out.push_back(t);
    return;
  }
  const std::int32_t lo = sinks, hi = n - recent;  // candidates [lo, hi)
  const std::int32_t take = keep - sinks - recent;  // 0 < take < hi - lo here (keep < n)
  // NaN ranks with -inf (both last, ties to the lower index), as rank_before orders them.
  const auto key = [](float x) noexcept { return std::isnan(x) ? -std::numeric_limits<float>::infinity() : x; };
  thread_local std::vector<float> buf;  // reused: a fresh allocation per call showed in decode steps
  buf.resize(static_cast<std::size_t>(hi - lo));
  for (std::int32_t t = lo; t < hi; ++t) buf[static_cast<std::size_t>(t - lo)] = key(scores[t]);
  std::nth_element(buf.begin(), buf.begin() + (take - 1), buf.end(), std::greater<float>());
  const float x = buf[static_cast<std::size_t>(take - 1)];
  // How many of the kept candidates score exactly x: take minus those strictly above it.
  std::int32_t above = 0;
  for (std::int32_t t = lo; t < hi; ++t) above += key(scores[t]) > x;
  std::int32_t ties = take - above;
  for (std::int32_t t = 0; t < sinks; ++t) out.push_back(t);
  for (std::int32_t t = lo; t < hi; ++t) {
    const float k = key(scores[t]);
    if (k > x) out.push_back(t);
    else if (k == x && ties > 0) {
      out.push_back(t);
      --ties;
    }
  }
  for (std::int32_t t = hi; t < n; ++t) out.push_back(t);
}

/// out[t] = mean or max over g of per_q[g * stride + t], for a group of G query heads.
inline void aggregate_group(const float* per_q, std::int32_t G, std::int32_t n, std::size_t stride, group_agg agg,
                            float* out) noexcept {
  for (std::int32_t t = 0; t < n; ++t) out[t] = per_q[t];
  for (std::int32_t g = 1; g < G; ++g) {
    const float* r = per_q + static_cast<std::size_t>(g) * stride;
    if (agg == group_agg::max)
      for (std::int32_t t = 0; t < n; ++t) out[t] = std::max(out[t], r[t]);
    else
      for (std::int32_t t = 0; t < n; ++t) out[t] += r[t];
  }
  if (agg == group_agg::mean && G > 1)
    for (std::int32_t t = 0; t < n; ++t) out[t] /= static_cast<float>(G);
}

/// Checks a scorer filled one finite-or-NaN score per token of every head.
inline void check_scores(const layer_input& in, const layer_scores& s, const char* scorer) {
  KVC_EXPECTS_IN(::kvc::detail::concat("kvc::evict::", scorer, "::score"), static_cast<std::int32_t>(s.size()) == in.num_kv_heads, scorer, " produced ", s.size(),
              " heads of scores, expected ", in.num_kv_heads);
  for (std::int32_t h = 0; h < in.num_kv_heads; ++h)
    KVC_EXPECTS_IN(::kvc::detail::concat("kvc::evict::", scorer, "::score"), static_cast<std::int32_t>(s[static_cast<std::size_t>(h)].size()) == in.heads[static_cast<std::size_t>(h)].n,
                scorer, " produced ", s[static_cast<std::size_t>(h)].size(), " scores for head ", h, ", expected ",
                in.heads[static_cast<std::size_t>(h)].n);
}

/// Resizes `out` to one score per token of every head.
inline void shape_scores(const layer_input& in, layer_scores& out) {
  out.resize(static_cast<std::size_t>(in.num_kv_heads));
  for (std::int32_t h = 0; h < in.num_kv_heads; ++h)
    out[static_cast<std::size_t>(h)].assign(static_cast<std::size_t>(in.heads[static_cast<std::size_t>(h)].n), 0.0f);
}

// ---- traits -------------------------------------------------------------------------------

namespace detail {
template <class...>
using void_t = void;
template <class S, class = void>
struct is_scorer : std::false_type {};
template <class S>
struct is_scorer<S, void_t<typename S::params_type, typename S::observation_type, decltype(S::reads),
                           decltype(std::declval<const S&>().protect()),
                           decltype(std::declval<const S&>().score(std::declval<const layer_input&>(),
                                                                   std::declval<const observations&>(),
                                                                   std::declval<layer_scores&>()))>>
    : std::true_type {};

struct rewrite_probe {
  template <class T>
  void operator()(std::int32_t, std::int32_t, T*) const noexcept {}
};
template <class C, class = void>
struct has_rewrite_keys : std::false_type {};
template <class C>
struct has_rewrite_keys<C, void_t<decltype(std::declval<C&>().keep_layer_rewrite_keys(
                               0, 0, std::declval<const std::vector<std::vector<std::int32_t>>&>(), rewrite_probe{},
                               static_cast<const std::vector<std::vector<std::int32_t>>*>(nullptr)))>>
    : std::true_type {};
template <class C, class = void>
struct has_traffic : std::false_type {};
template <class C>
struct has_traffic<C, void_t<decltype(std::declval<const C&>().traffic())>> : std::true_type {};
}  // namespace detail

/// Whether S has the scorer shape (params_type, observation_type, reads, protect(), score()).
template <class S>
inline constexpr bool is_scorer_v = detail::is_scorer<S>::value;

// ---- cache access (generic over kv_cache and the quantized caches) -----------------------------

/// Owns the float copies of one layer's streams and the layer_input pointing into them.
struct gathered_layer {
  layer_input in;
  std::vector<std::vector<float>> k, v;
};

/// Gathers what a scorer reads from the streams of one layer of any cache with config(),
/// length(), positions(), gather() and seen().
template <class Cache>
void gather_layer(const Cache& cache, std::int32_t seq, std::int32_t layer, std::int32_t num_q_heads, unsigned reads,
                  gathered_layer& g) {
  const auto& cfg = cache.config();
  const std::int32_t H = cfg.num_kv_heads, D = cfg.head_dim;
  KVC_EXPECTS_IN("kvc::evict::gather_layer", num_q_heads > 0 && num_q_heads % H == 0, "num_q_heads = ", num_q_heads,
              ", expected a positive multiple of num_kv_heads = ", H);
  layer_input& in = g.in;
  in.seq = seq;
  in.layer = layer;
  in.num_layers = cfg.num_layers;
  in.num_kv_heads = H;
  in.num_q_heads = num_q_heads;
  in.head_dim = D;
  in.seen = cache.seen(seq, layer);
  in.heads.assign(static_cast<std::size_t>(H), head_input{});
  g.k.resize(static_cast<std::size_t>(H));
  g.v.resize(static_cast<std::size_t>(H));
  for (std::int32_t h = 0; h < H; ++h) {
    head_input& hi = in.heads[static_cast<std::size_t>(h)];
    hi.n = cache.length(seq, layer, h);
    hi.positions = cache.positions(seq, layer, h);
    auto& kb = g.k[static_cast<std::size_t>(h)];
    auto& vb = g.v[static_cast<std::size_t>(h)];
    if (reads & (reads_keys | reads_values)) {
      kb.resize((reads & reads_keys) ? static_cast<std::size_t>(hi.n) * D : 0);
      vb.resize((reads & reads_values) ? static_cast<std::size_t>(hi.n) * D : 0);
      cache.gather(seq, layer, h, (reads & reads_keys) ? kb.data() : nullptr,
                   (reads & reads_values) ? vb.data() : nullptr);
      hi.k = (reads & reads_keys) ? kb.data() : nullptr;
      hi.v = (reads & reads_values) ? vb.data() : nullptr;
    }
  }
}

/// Options of the mutation step.
struct apply_options {
  /// When set, kept keys are re-rotated so that kept token i sits at position i (StreamingLLM as
  /// published; kvpress's KeyRerotationPress). The cache's positions are rewritten to 0..n-1; an
  /// engine that re-rotates must then pass explicit positions to append.
  const rope* rerotate = nullptr;
};

/// What one mutation did to the pools, in bytes. Both directions, never their difference: a keep
/// after fork can copy shared pages it writes while it frees emptied ones.
/// bytes_in_use() after = before + bytes_allocated - bytes_released.
struct apply_result {
  std::size_t bytes_allocated = 0;
  std::size_t bytes_released = 0;
};

/// Pool traffic of a cache: its own counters when it has them (every kvc cache), else the net
/// change of bytes_in_use split by sign.
template <class Cache>
memory_traffic traffic_of(const Cache& cache) {
  if constexpr (detail::has_traffic<Cache>::value) return cache.traffic();
  else return {cache.bytes_in_use(), 0};
}

/// Keeps kept[h] of every head of one layer (keep_layer: all heads or none, emptied pages released
/// at once) and, if asked, re-rotates the kept keys, all in one all-or-nothing step
/// (keep_layer_rewrite_keys): if anything throws, the layer, its positions and the pools are as
/// before. Returns the pool bytes the step allocated and released.
template <class Cache>
apply_result apply_layer(Cache& cache, std::int32_t seq, std::int32_t layer,
                         const std::vector<std::vector<std::int32_t>>& kept, const apply_options& opt = {}) {
  const std::int32_t H = cache.config().num_kv_heads;
  const memory_traffic before = traffic_of(cache);
  if (opt.rerotate) {
    if constexpr (!detail::has_rewrite_keys<Cache>::value) {
      ::kvc::detail::fail(
          "kvc::evict::apply_layer: rerotate = set, but this cache type has no rewrite_keys (quantized keys "
          "cannot be re-rotated in place); expected rerotate = null");
    } else {
      KVC_EXPECTS_IN("kvc::evict::apply_layer", opt.rerotate->config().head_dim == cache.config().head_dim, "apply_options.rerotate head_dim = ",
                  opt.rerotate->config().head_dim, ", expected the cache's head_dim = ", cache.config().head_dim);
      // Plan: old positions of the kept tokens (indices are validated by the cache) and the new ones.
      std::vector<std::vector<std::int32_t>> old_pos(static_cast<std::size_t>(H)), new_pos(static_cast<std::size_t>(H));
      for (std::int32_t h = 0; h < H && static_cast<std::size_t>(h) < kept.size(); ++h) {
        const std::int32_t* p = cache.positions(seq, layer, h);
        const std::int32_t L = cache.length(seq, layer, h);
        auto& op = old_pos[static_cast<std::size_t>(h)];
        for (std::int32_t i : kept[static_cast<std::size_t>(h)]) op.push_back(i >= 0 && i < L ? p[i] : 0);
        new_pos[static_cast<std::size_t>(h)].resize(op.size());
        std::iota(new_pos[static_cast<std::size_t>(h)].begin(), new_pos[static_cast<std::size_t>(h)].end(), 0);
      }
      const rope* r = opt.rerotate;
      cache.keep_layer_rewrite_keys(
          seq, layer, kept,
          [&](std::int32_t h, std::int32_t i, auto* row) {
            r->rerotate(row, static_cast<double>(i) - old_pos[static_cast<std::size_t>(h)][static_cast<std::size_t>(i)]);
          },
          kept.size() == static_cast<std::size_t>(H) ? &new_pos : nullptr);
    }
  } else {
    cache.keep_layer(seq, layer, kept);
  }
  const memory_traffic after = traffic_of(cache);
  apply_result res;
  if constexpr (detail::has_traffic<Cache>::value) {
    res.bytes_allocated = static_cast<std::size_t>(after.bytes_allocated - before.bytes_allocated);
    res.bytes_released = static_cast<std::size_t>(after.bytes_released - before.bytes_released);
  } else {
    const std::size_t b = before.bytes_allocated, a = after.bytes_allocated;
    (a >= b ? res.bytes_allocated : res.bytes_released) = a >= b ? a - b : b - a;
  }
  return res;
}

}  // namespace evict
KVC_END_NAMESPACE
