// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `any_cache`: one run-time interface over every kvc cache (plain kv_cache<T>, the quantized
/// caches), for harnesses that choose the storage from a spec string. It has the same member
/// names as the caches, so policies written generically over a Cache work on it unchanged. The
/// virtual call costs nothing next to a decode step; engines that know their types at compile
/// time use the caches directly.
///
/// `any_cache` is ISA-neutral: one type in every TU. Its implementations (cache_adapter, and
/// mikv_cache in runtime/mikv_storage.hpp) run the CPU kernels, so they live in the ISA namespace
/// (docs/isa.md): a cache built in a TU compiled with -mavx2 is a
/// `kvc::runtime::isa_avx2_fma_f16c::cache_adapter<...>` and runs that TU's kernels wherever it is
/// called from. Callers still write `kvc::runtime::cache_adapter`.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/prefill_attention.hpp>
#include <kvc/error.hpp>
#include <kvc/isa.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/store/merged_cache_fwd.hpp>  // merge::merged_cache<T>

KVC_BEGIN_NAMESPACE
namespace merge {
struct minicache_report;  // kvc/merge/minicache.hpp
struct d2o_threshold;     // kvc/merge/d2o.hpp
}  // namespace merge
namespace runtime {
struct merge_policy;  // runtime/merge_policy.hpp
}  // namespace runtime

namespace runtime {

/// Threads: every implementation follows the caches' contract; mikv's attention() writes its sequence (docs/threading.md).
class any_cache {
 public:
  virtual ~any_cache() = default;

  virtual const cache_config& config() const = 0;
  /// The storage as a spec ("fp16", "kivi(bits=2,group=32,residual=128)", ...).
  virtual std::string name() const = 0;
  /// The ISA namespace whose kernels this cache runs, e.g. "isa_avx2_fma_f16c" (docs/isa.md; an
  /// implementation outside kvc may return "").
  virtual const char* isa() const { return ""; }

  virtual seq_id add_sequence() = 0;
  virtual void remove_sequence(seq_id s) = 0;
  virtual bool contains(seq_id s) const = 0;
  /// Throws kvc::error when the storage cannot share pages between sequences.
  virtual seq_id fork(seq_id s) = 0;

  virtual void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
                      const std::int32_t* positions = nullptr) = 0;
  virtual void keep(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n) = 0;
  virtual void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) = 0;

  /// Forgets the newest tokens of one layer (kv_cache::rewind): every head drops the tokens at
  /// positions >= n and seen(s, layer) becomes n. Storages without it (merged tokens may hold
  /// members from the dropped positions; low-rank and mixed-precision stores) throw kvc::error
  /// naming the storage, as does a bad n; the cache is then unchanged.
  virtual void rewind(seq_id /*s*/, std::int32_t layer, std::int32_t n) {
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::any_cache::rewind: storage '", name(), "' cannot rewind (layer ",
                                          layer, " to n = ", n, "), expected a plain or quantized storage (fp32, "
                                          "fp16, bf16, int8, kivi, ...)"));
  }
  /// Whether rewind() is available for this storage.
  virtual bool can_rewind() const { return false; }

  /// Makes layer `layer` of s hold what layer `from` holds, by reference (kv_cache::share_layer,
  /// quant_cache::share_layer: nothing allocated, copy-on-write afterwards). Storages without it
  /// (mikv, the low-rank ones, MiniCache) throw kvc::error naming the storage, as does a bad
  /// argument; the cache is then unchanged.
  virtual void share_layer(seq_id /*s*/, std::int32_t layer, std::int32_t from) {
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::any_cache::share_layer: storage '", name(),
                                          "' cannot share layers (layer ", layer, " from layer ", from,
                                          "), expected a plain or quantized storage (fp32, fp16, bf16, quest, "
                                          "int8, kivi, ...)"));
  }
  /// Whether share_layer() is available for this storage.
  virtual bool can_share_layers() const { return false; }

  virtual std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const = 0;
  virtual const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const = 0;
  virtual std::int32_t seen(seq_id s, std::int32_t layer) const = 0;
  virtual void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out = nullptr) const = 0;

  /// Decode attention for one layer: q [num_q_heads][head_dim] -> out [num_q_heads][head_dim].
  virtual void attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                         const decode_options& opt = {}) const = 0;

  /// Decode attention for one layer of a batch of sequences (an engine's continuous batch, one
  /// query token each): q and out [n][num_q_heads][head_dim], opt.lse [n][num_q_heads]; the
  /// sequences may differ in length and one may appear twice. Plain kv_cache storages (fp32, fp16,
  /// bf16 with no read policy) run kvc::cpu::decode_attention_batch, one plan over the whole batch
  /// on opt.pool; every other storage runs attention() per sequence. No probabilities. Every
  /// sequence id is checked before anything is written.
  virtual void attention_batch(const seq_id* seqs, std::int32_t n, std::int32_t layer, const float* q,
                               std::int32_t num_q_heads, float* out, const decode_options& opt = {}) const {
    check_batch(seqs, n, opt);
    const std::size_t stride = static_cast<std::size_t>(num_q_heads) * static_cast<std::size_t>(config().head_dim);
    decode_options one = opt;
    for (std::int32_t b = 0; b < n; ++b) {
      if (opt.lse) one.lse = opt.lse + static_cast<std::size_t>(b) * static_cast<std::size_t>(num_q_heads);
      attention(seqs[b], layer, q + b * stride, num_q_heads, out + b * stride, one);
    }
  }

  /// Whether prefill_attention() is available: false for storages whose attention() records what
  /// it attends (mikv's importance), whose prompt must then be attended token by token.
  virtual bool has_prefill_attention() const { return false; }
  /// Causal prefill attention for one layer (kvc::cpu::prefill_attention): q and out
  /// [num_queries][num_q_heads][head_dim], query i at q_positions[i]; opt.lse is
  /// [num_queries][num_q_heads]. Throws kvc::error where has_prefill_attention() is false.
  virtual void prefill_attention(seq_id /*s*/, std::int32_t /*layer*/, const float* /*q*/, std::int32_t /*num_queries*/,
                                 const std::int32_t* /*q_positions*/, std::int32_t /*num_q_heads*/, float* /*out*/,
                                 const decode_options& /*opt*/ = {}) const {
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::any_cache::prefill_attention: storage '", name(),
                                          "' has no prefill attention (has_prefill_attention() is false), expected "
                                          "attention() token by token"));
  }

  /// How many of the next `limit` tokens may be appended in one call and then attended together by
  /// prefill_attention() with the stored forms a token-by-token append and attention would show
  /// (kv_cache: all; quant_cache: up to the next re-encoding of its residual window). 1 by
  /// default: token by token is always right. At least 1 when limit >= 1.
  virtual std::int32_t chunk_tokens(seq_id /*s*/, std::int32_t /*layer*/, std::int32_t limit) const {
    return std::min<std::int32_t>(limit, 1);
  }

  virtual std::size_t bytes_in_use() const = 0;
  virtual std::size_t bytes_in_use(std::int32_t layer) const = 0;
  /// Pool bytes allocated and released since construction (kvc::memory_traffic).
  virtual memory_traffic traffic() const = 0;
  virtual std::size_t metadata_bytes() const = 0;
  virtual std::int64_t tokens_held() const = 0;
  /// Whether keys are appended before RoPE (KVQuant's pre-RoPE keys): the caller then appends
  /// un-rotated keys with their positions, and the cache rotates them when it reads them.
  virtual bool pre_rope_keys() const { return false; }

  /// The merge::merged_cache this cache is (runtime/merged_storage.hpp), when its tokens carry
  /// log-weights, else null. ISA-neutral, unlike a dynamic_cast to the adapter (one type per ISA
  /// namespace): a merging stage built in one ISA configuration reaches a cache that another built
  /// (make_merged_cache_for_cpu).
  virtual merge::merged_cache<half>* merged_fp16() noexcept { return nullptr; }
  virtual merge::merged_cache<float>* merged_fp32() noexcept { return nullptr; }
  const merge::merged_cache<half>* merged_fp16() const noexcept { return const_cast<any_cache*>(this)->merged_fp16(); }
  const merge::merged_cache<float>* merged_fp32() const noexcept { return const_cast<any_cache*>(this)->merged_fp32(); }
  /// Whether the tokens carry log-weights (a merged cache of any storage: fp16, fp32 or codes,
  /// runtime/merged_storage.hpp), so a merging stage can merge into it.
  virtual bool holds_log_weights() const noexcept { return false; }
  /// One stream's log-weights (length() floats) where the tokens carry them, else null.
  virtual const std::vector<float>* log_weights(seq_id /*s*/, std::int32_t /*layer*/, std::int32_t /*head*/) const {
    return nullptr;
  }
  /// Keeps kept[h] of every kv head of `layer` and merges what it drops by policy p
  /// (runtime::apply_merge_policy on the cache's own store type; tau: D2O's threshold of the layer).
  /// The merging stage (runtime::merger) calls it; a cache that holds no log-weights refuses.
  virtual void apply_merge(const merge_policy& /*p*/, merge::d2o_threshold* /*tau*/, seq_id /*s*/, std::int32_t /*layer*/,
                           const std::vector<std::vector<float>>& /*scores*/,
                           const std::vector<std::vector<std::int32_t>>& /*kept*/) {
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::any_cache::apply_merge: storage '", name(),
                                          "' holds no log-weights; expected a cache from make_merged_cache"));
  }

  /// Merges the storage's layers across each other for sequence s, once its prompt is in every
  /// layer (MiniCache's layer pairs, runtime/minicache_storage.hpp: cross_layer_merge) and
  /// returns true, with what it did in *report when given; other storages return false and
  /// change nothing. Virtual rather than a dynamic_cast, so it reaches a cache of any ISA
  /// configuration.
  virtual bool merge_layers(seq_id /*s*/, merge::minicache_report* /*report*/ = nullptr) { return false; }

  /// Rotated queries the storage asks to observe once a layer's prompt is in the cache (ThinK's
  /// observation window, runtime/think_storage.hpp); 0: none, and observe_window() does nothing.
  virtual std::int32_t query_window() const { return 0; }
  /// The caller's last n (<= query_window()) rotated queries of one layer, [n][num_q_heads][head_dim],
  /// at the layer's last n positions: called once the prompt of `layer` is in the cache and any
  /// eviction of it is done. A storage that fits on them does so at its first call per layer.
  virtual void observe_window(seq_id /*s*/, std::int32_t /*layer*/, const float* /*q*/, std::int32_t /*n*/,
                              std::int32_t /*num_q_heads*/) {}
 protected:
  /// attention_batch's arguments: a batch of live sequences, no probabilities.
  void check_batch(const seq_id* seqs, std::int32_t n, const decode_options& opt) const {
    constexpr const char* who = "kvc::runtime::any_cache::attention_batch";
    KVC_EXPECTS_IN(who, n > 0 && seqs != nullptr, "n = ", n, ", expected at least one sequence");
    KVC_EXPECTS_IN(who, !opt.probs && !opt.group_probs,
                   "opt.probs or opt.group_probs is set, expected neither: a batched call returns no probabilities "
                   "(call attention() per sequence for them)");
    for (std::int32_t b = 0; b < n; ++b)
      KVC_EXPECTS_IN(who, contains(seqs[b]), "seqs[", b, "] = ", seqs[b],
                     " is not a live sequence of this cache, expected ids from add_sequence/fork, not removed");
  }
};

/// An any_cache as the `Cache` of evict::compressor, evict::attention_observer and the merging
/// stages: the members they read, and keep_layer, forwarded. The compressor probes its Cache's
/// member types (kvc/evict/core.hpp: value_type, keep_layer_rewrite_keys), which an abstract
/// any_cache does not have; the view says what eviction may use of it.
struct any_cache_view {
  using value_type = float;
  any_cache* c;
  const cache_config& config() const { return c->config(); }
  std::int32_t length(seq_id s, std::int32_t l, std::int32_t h) const { return c->length(s, l, h); }
  const std::int32_t* positions(seq_id s, std::int32_t l, std::int32_t h) const { return c->positions(s, l, h); }
  std::int32_t seen(seq_id s, std::int32_t l) const { return c->seen(s, l); }
  void gather(seq_id s, std::int32_t l, std::int32_t h, float* k, float* v = nullptr) const { c->gather(s, l, h, k, v); }
  void keep_layer(seq_id s, std::int32_t l, const std::vector<std::vector<std::int32_t>>& kept) {
    c->keep_layer(s, l, kept);
  }
  std::size_t bytes_in_use() const { return c->bytes_in_use(); }
  std::size_t bytes_in_use(std::int32_t l) const { return c->bytes_in_use(l); }
};

namespace detail {
template <class C, class = void>
struct has_fork : std::false_type {};
template <class C>
struct has_fork<C, std::void_t<decltype(std::declval<C&>().fork(seq_id{}))>> : std::true_type {};
template <class C, class = void>
struct has_rewind : std::false_type {};
template <class C>
struct has_rewind<C, std::void_t<decltype(std::declval<C&>().rewind(seq_id{}, std::int32_t{}, std::int32_t{}))>>
    : std::true_type {};
template <class C, class = void>
struct has_share_layer : std::false_type {};
template <class C>
struct has_share_layer<C, std::void_t<decltype(std::declval<C&>().share_layer(seq_id{}, std::int32_t{},
                                                                              std::int32_t{}))>> : std::true_type {};
template <class C, class = void>
struct has_pre_rope : std::false_type {};
template <class C>
struct has_pre_rope<C, std::void_t<decltype(std::declval<const C&>().config().pre_rope)>> : std::true_type {};
template <class C>
struct is_kv_cache : std::false_type {};
template <class T>
struct is_kv_cache<kv_cache<T>> : std::true_type {};
}  // namespace detail

// ---- per ISA from here (docs/isa.md): the implementations call the CPU kernels ----
KVC_BEGIN_ISA_NAMESPACE

/// Calls `kvc::cpu::decode_attention(cache, ...)`. A qualified call in a template binds to the
/// overloads declared *before* the template's definition, so a cache whose overload lives in a
/// later header (quant_cache's in <kvc/cpu/quant_attention.hpp>) passes its own functor, defined
/// after that header (see runtime/quant_storages.hpp); include order then does not matter.
struct cpu_attention {
  template <class Cache>
  void operator()(const Cache& c, seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                  const decode_options& opt) const {
    kvc::cpu::decode_attention(c, s, layer, q, num_q_heads, out, opt);
  }
};

/// Wraps a concrete cache. Attention goes through an `Attend` functor (by default
/// `kvc::cpu::decode_attention(cache, ...)`, the overload each cache type provides); the adapter
/// holds it, so a read policy carries its settings in it (attend(), runtime/quest_storage.hpp).
/// Threads: the wrapped cache's contract (docs/threading.md).
template <class Cache, class Attend = cpu_attention>
class cache_adapter final : public any_cache {
 public:
  template <class... Args>
  explicit cache_adapter(std::string name, Args&&... args) : name_(std::move(name)), c_(std::forward<Args>(args)...) {}

  Cache& get() noexcept { return c_; }
  const Cache& get() const noexcept { return c_; }
  Attend& attend() noexcept { return attend_; }

  const cache_config& config() const override { return c_.config(); }
  std::string name() const override { return name_; }
  const char* isa() const override { return KVC_ISA_STR(KVC_ISA_NAMESPACE); }
  seq_id add_sequence() override { return c_.add_sequence(); }
  void remove_sequence(seq_id s) override { c_.remove_sequence(s); }
  bool contains(seq_id s) const override { return c_.contains(s); }
  seq_id fork(seq_id s) override {
    if constexpr (detail::has_fork<Cache>::value) return c_.fork(s);
    else kvc::detail::fail(kvc::detail::concat("kvc::runtime::any_cache::fork: storage '", name_,
                                               "' cannot share pages between sequences"));
  }
  void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions) override {
    c_.append(s, layer, k, v, n, positions);
  }
  void keep(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n) override {
    c_.keep(s, layer, head, kept, n);
  }
  void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) override {
    c_.keep_layer(s, layer, kept);
  }
  void rewind(seq_id s, std::int32_t layer, std::int32_t n) override {
    if constexpr (detail::has_rewind<Cache>::value) c_.rewind(s, layer, n);
    else any_cache::rewind(s, layer, n);
  }
  bool can_rewind() const override { return detail::has_rewind<Cache>::value; }
  void share_layer(seq_id s, std::int32_t layer, std::int32_t from) override {
    if constexpr (detail::has_share_layer<Cache>::value) c_.share_layer(s, layer, from);
    else any_cache::share_layer(s, layer, from);
  }
  bool can_share_layers() const override { return detail::has_share_layer<Cache>::value; }
  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const override { return c_.length(s, layer, head); }
  const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const override {
    return c_.positions(s, layer, head);
  }
  std::int32_t seen(seq_id s, std::int32_t layer) const override { return c_.seen(s, layer); }
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out) const override {
    c_.gather(s, layer, head, k_out, v_out);
  }
  void attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                 const decode_options& opt) const override {
    attend_(c_, s, layer, q, num_q_heads, out, opt);
  }
  /// One plan over the batch for a plain kv_cache read whole; per sequence otherwise (a read
  /// policy such as Quest, or a cache with its own kernel).
  void attention_batch(const seq_id* seqs, std::int32_t n, std::int32_t layer, const float* q,
                       std::int32_t num_q_heads, float* out, const decode_options& opt) const override {
    if constexpr (detail::is_kv_cache<Cache>::value && std::is_same<Attend, cpu_attention>::value) {
      check_batch(seqs, n, opt);
      kvc::cpu::decode_attention_batch(c_, seqs, n, layer, q, num_q_heads, out, opt);
    } else {
      any_cache::attention_batch(seqs, n, layer, q, num_q_heads, out, opt);
    }
  }
  bool has_prefill_attention() const override { return true; }
  std::int32_t chunk_tokens(seq_id s, std::int32_t layer, std::int32_t limit) const override {
    return c_.chunk_tokens(s, layer, limit);
  }
  void prefill_attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_queries,
                         const std::int32_t* q_positions, std::int32_t num_q_heads, float* out,
                         const decode_options& opt) const override {
    kvc::cpu::prefill_attention(c_, s, layer, q, num_queries, q_positions, num_q_heads, out, opt);
  }
  std::size_t bytes_in_use() const override { return c_.bytes_in_use(); }
  std::size_t bytes_in_use(std::int32_t layer) const override { return c_.bytes_in_use(layer); }
  memory_traffic traffic() const override { return c_.traffic(); }
  std::size_t metadata_bytes() const override { return c_.metadata_bytes(); }
  std::int64_t tokens_held() const override { return c_.tokens_held(); }
  bool pre_rope_keys() const override {
    if constexpr (detail::has_pre_rope<Cache>::value) return c_.config().pre_rope;
    else return false;
  }

 private:
  std::string name_;
  Cache c_;
  Attend attend_{};
};

KVC_END_ISA_NAMESPACE
}  // namespace runtime
KVC_END_NAMESPACE
