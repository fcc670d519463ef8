// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `compressor<Scorer>`: what an engine calls to compress a cache with one scorer, at the three
/// phases kvc supports:
///  - `after_prefill(cache, seq, layer, obs)`: one-shot, once the prompt of this layer is in the
///    cache (kvpress/KVCache-Factory semantics);
///  - `after_chunk(cache, seq, layer, obs)`: chunked prefill; the budget applies to the tokens
///    seen so far (a ratio keeps (1 - r) * seen, a token budget keeps that many), so a stream
///    never holds more than its budget plus one chunk;
///  - `after_decode_step(cache, seq, layer, obs)`: decode time; compresses every `interval`
///    steps, or at once when a stream exceeds its target by more than `slack`, to a fixed size
///    (token budget) or a ratio of the tokens seen.
///  - `compress(cache, seq, layer, obs)`: the strict one-shot call (a token budget above the
///    longest stream is an error rather than a no-op).
/// Every call is all-or-nothing for the layer (kv_cache::keep_layer's strong guarantee); the
/// attention observer, when given, is compacted together with the cache.
///
/// \code
///   kvc::evict::compressor<kvc::evict::snapkv> c({}, {kvc::budget::ratio(0.75)});
///   for (int l = 0; l < L; ++l) { /* append layer l */ c.after_prefill(cache, seq, l, {&window_l}); }
/// \endcode

#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvc/budget/allocator.hpp>
#include <kvc/budget/budget.hpp>
#include <kvc/evict/core.hpp>
#include <kvc/evict/observer.hpp>
#include <kvc/evict/select.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct compressor_options {
  /// Per-stream budget: for after_prefill and compress, a ratio of the stream's length or a token
  /// count; for after_chunk and after_decode_step, a ratio of the tokens seen or a token count.
  budget target = budget::ratio(0.5);
  /// Split over layers and heads; unset: the scorer's preferred allocator (pyramidkv), else uniform.
  std::optional<allocator> alloc;
  /// The model's query heads; 0 means num_kv_heads (no GQA).
  std::int32_t num_q_heads = 0;
  /// Overrides the scorer's protection (sinks and recent window) when set.
  std::optional<protection> protect;
  /// Re-rotate kept keys to contiguous positions (StreamingLLM as published, Finch).
  const rope* rerotate = nullptr;
  /// Decode: compress every `interval` steps (per layer) ...
  std::int32_t interval = 1;
  /// ... or at once when a stream exceeds its target by more than `slack` tokens.
  std::int32_t slack = 0;
};

/// What one call did to one layer.
struct compress_report {
  bool compressed = false;
  std::int64_t tokens_before = 0;  ///< Σ over the layer's streams
  std::int64_t tokens_after = 0;
  std::size_t bytes_allocated = 0;  ///< pool bytes allocated (pages copied because a fork shares them)
  std::size_t bytes_released = 0;   ///< pool bytes freed (the emptied pages, and shared pages replaced by copies)
};

namespace detail {
template <class S, class = void>
struct has_preferred_allocator : std::false_type {};
template <class S>
struct has_preferred_allocator<S, void_t<decltype(std::declval<const S&>().preferred_allocator())>> : std::true_type {};
template <class S, class = void>
struct has_runtime_reads : std::false_type {};
template <class S>
struct has_runtime_reads<S, void_t<decltype(std::declval<const S&>().runtime_reads())>> : std::true_type {};
template <class S>
unsigned reads_of(const S& s) {
  if constexpr (has_runtime_reads<S>::value) return s.runtime_reads();
  else return S::reads;
}
template <class S, class = void>
struct has_select : std::false_type {};
template <class S>
struct has_select<S, void_t<decltype(std::declval<const S&>().select(
                         std::declval<const layer_input&>(), std::declval<const observations&>(),
                         std::declval<const layer_scores&>(), std::declval<const budget&>(),
                         std::declval<const allocator&>(), std::declval<protection>(),
                         std::declval<layer_selection&>()))>> : std::true_type {};
/// The gather buffers of compressor::plan on this thread, one for every Scorer type (a
/// thread_local inside the class template would keep one per instantiation).
inline gathered_layer& plan_scratch() {
  thread_local gathered_layer g;
  return g;
}
}  // namespace detail

/// Threads: one instance is not synchronised: one per thread, or a lock; distinct instances may work on different sequences of one cache (docs/threading.md).
template <class Scorer>
class compressor {
  static_assert(is_scorer_v<Scorer>,
                "kvc::evict::compressor<Scorer>: Scorer must provide params_type, observation_type, "
                "static constexpr unsigned reads, protection protect() const and "
                "void score(const layer_input&, const observations&, layer_scores&) const");

 public:
  using scorer_type = Scorer;

  explicit compressor(const Scorer& s = Scorer{}, const compressor_options& o = {}) : s_(s), o_(o) {
    o_.target.validate("target");
    KVC_EXPECTS_IN("kvc::evict::compressor::compressor", o_.interval >= 1, "compressor_options.interval = ", o_.interval, ", expected >= 1 decode step");
    KVC_EXPECTS_IN("kvc::evict::compressor::compressor", o_.slack >= 0, "compressor_options.slack = ", o_.slack, ", expected >= 0 tokens");
    KVC_EXPECTS_IN("kvc::evict::compressor::compressor", o_.num_q_heads >= 0, "compressor_options.num_q_heads = ", o_.num_q_heads, ", expected >= 0");
    if (!o_.alloc) {
      if constexpr (detail::has_preferred_allocator<Scorer>::value) o_.alloc = s_.preferred_allocator();
      else o_.alloc = allocator::uniform();
    }
    o_.alloc->validate();
  }

  const Scorer& scorer() const noexcept { return s_; }
  const compressor_options& options() const noexcept { return o_; }
  protection protect() const { return o_.protect ? *o_.protect : s_.protect(); }

  /// Strict one-shot compression of one layer: a token budget above the longest stream, or a bad
  /// budget, throws kvc::error and leaves the cache unchanged.
  template <class Cache>
  compress_report compress(Cache& cache, std::int32_t seq, std::int32_t layer, const observations& obs = {}) {
    const std::int32_t longest = longest_stream(cache, seq, layer);
    if (o_.target.type == budget::kind::tokens && o_.target.value > longest)
      ::kvc::detail::fail(::kvc::detail::concat("kvc::evict::compressor::compress: tokens = ",
                                                static_cast<std::int64_t>(o_.target.value),
                                                ", expected <= the longest stream of layer ", layer, " (", longest,
                                                " tokens); the cache is unchanged"));
    return run(cache, seq, layer, obs, o_.target);
  }

  /// One-shot compression after the prompt of `layer` is in the cache; nothing to do when the
  /// budget covers every stream.
  template <class Cache>
  compress_report after_prefill(Cache& cache, std::int32_t seq, std::int32_t layer, const observations& obs = {}) {
    return run(cache, seq, layer, obs, o_.target);
  }

  /// After a prefill chunk: keeps the budget of the tokens seen so far.
  template <class Cache>
  compress_report after_chunk(Cache& cache, std::int32_t seq, std::int32_t layer, const observations& obs = {}) {
    return run(cache, seq, layer, obs, seen_budget(cache, seq, layer));
  }

  /// After one decode step of `layer` (the new token appended, the observer fed).
  template <class Cache>
  compress_report after_decode_step(Cache& cache, std::int32_t seq, std::int32_t layer, const observations& obs = {}) {
    const std::optional<budget> b = decode_step_budget(cache, seq, layer);
    if (!b) return {};
    return run(cache, seq, layer, obs, *b);
  }

  /// after_decode_step's schedule without its eviction: counts one decode step of `layer` and
  /// returns the budget to compress to when the step is due (every `interval` steps, or the
  /// longest stream more than `slack` over the budget) and some stream exceeds it; nothing
  /// otherwise. For a stage that acts on plan's selection itself (a merging stage,
  /// kvc/runtime/merge_registry.hpp) and must compress on the steps eviction would.
  template <class Cache>
  std::optional<budget> decode_step_budget(const Cache& cache, std::int32_t seq, std::int32_t layer) {
    const budget b = seen_budget(cache, seq, layer);
    std::int64_t& steps = steps_[{seq, layer}];
    ++steps;
    const std::int32_t target = static_cast<std::int32_t>(b.value);
    const std::int32_t longest = longest_stream(cache, seq, layer);
    const bool due = steps % o_.interval == 0 || longest > target + o_.slack;
    if (!due || longest <= target) return std::nullopt;
    return b;
  }

  /// Forgets the decode step counters of a sequence.
  void remove_sequence(std::int32_t seq) { detail::erase_entries(steps_, seq); }

  /// Gives sequence `to` a copy of `from`'s decode step counters, as kv_cache::fork gives it
  /// `from`'s tokens: without it a forked beam would count its steps from zero, compress on other
  /// steps than its source (interval > 1) and keep another number of tokens. `to` must have no
  /// counters yet.
  void fork(std::int32_t from, std::int32_t to) {
    detail::fork_entries(steps_, from, to, "kvc::evict::compressor::fork", "decode step counters");
  }

  /// Scores and selection of one layer without mutating anything (plan). When `scores` is not
  /// null it receives the scorer's per-token scores ([kv head][token], the stream's order):
  /// merging policies (kvc/merge/) weigh what eviction would drop by them.
  template <class Cache>
  layer_selection plan(const Cache& cache, std::int32_t seq, std::int32_t layer, const observations& obs,
                       const budget& b, layer_scores* scores = nullptr) const {
    // The floats gathered for a scorer stay with the thread for its next plan (the largest layer
    // gathered so far: 134 MB of keys at 32k tokens of 32x8x128). A fresh buffer per call was
    // zeroed and page-faulted in every time, most of R-KV's plan there: bench_evict rkv_h2o
    // raw_ratio 32x8x128 ctx 4096 / 32768 (2026-11) 9.1 / 11.7 -> 2.2 / 2.6 decode steps
    // (9x3x64, whose 8 MB per-head buffers malloc already recycled: 1.6 / 2.8, unchanged).
    gathered_layer& g = detail::plan_scratch();
    gather_layer(cache, seq, layer, q_heads(cache), detail::reads_of(s_), g);
    o_.alloc->check_shape(g.in.num_layers, g.in.num_kv_heads);
    layer_scores sc;
    s_.score(g.in, obs, sc);
    check_scores(g.in, sc, Scorer::name);
    layer_selection sel;
    if constexpr (detail::has_select<Scorer>::value) s_.select(g.in, obs, sc, b, *o_.alloc, protect(), sel);
    else select_layer(g.in, sc, b, *o_.alloc, protect(), sel);
    if (scores) *scores = std::move(sc);
    return sel;
  }

  /// The budget in tokens after_chunk and after_decode_step apply: a ratio of the tokens seen,
  /// or the token budget itself (after_prefill and compress apply options().target).
  template <class Cache>
  budget seen_budget(const Cache& cache, std::int32_t seq, std::int32_t layer) const {
    if (o_.target.type == budget::kind::tokens) return o_.target;
    return budget::tokens(o_.target.keep_count(cache.seen(seq, layer)));
  }

 private:
  template <class Cache>
  std::int32_t q_heads(const Cache& cache) const {
    return o_.num_q_heads ? o_.num_q_heads : cache.config().num_kv_heads;
  }

  template <class Cache>
  static std::int32_t longest_stream(const Cache& cache, std::int32_t seq, std::int32_t layer) {
    std::int32_t m = 0;
    for (std::int32_t h = 0; h < cache.config().num_kv_heads; ++h) m = std::max(m, cache.length(seq, layer, h));
    return m;
  }

  template <class Cache>
  compress_report run(Cache& cache, std::int32_t seq, std::int32_t layer, const observations& obs, const budget& b) {
    compress_report r;
    const std::int32_t H = cache.config().num_kv_heads;
    for (std::int32_t h = 0; h < H; ++h) r.tokens_before += cache.length(seq, layer, h);
    r.tokens_after = r.tokens_before;
    layer_selection sel = plan(cache, seq, layer, obs, b);
    bool changes = false;
    for (std::int32_t h = 0; h < H; ++h)
      changes |= static_cast<std::int32_t>(sel[static_cast<std::size_t>(h)].size()) != cache.length(seq, layer, h);
    if (!changes) return r;
    apply_options ao;
    ao.rerotate = o_.rerotate;
    const apply_result ar = apply_layer(cache, seq, layer, sel, ao);
    r.bytes_allocated = ar.bytes_allocated;
    r.bytes_released = ar.bytes_released;
    if (obs.attention) obs.attention->keep_layer(seq, layer, sel);
    r.compressed = true;
    r.tokens_after = 0;
    for (const auto& v : sel) r.tokens_after += static_cast<std::int64_t>(v.size());
    return r;
  }

  Scorer s_;
  compressor_options o_;
  std::map<std::pair<std::int32_t, std::int32_t>, std::int64_t> steps_;
};

}  // namespace evict
KVC_END_NAMESPACE
