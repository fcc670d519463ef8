// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `kvc_python::session_cache`: a cache built from a full spec ("[policy+[merging+]]storage"),
/// with the compressor, attention observer and merging stage its policy needs, behind one lock. It is what
/// examples/llama/kvc_backend.hpp does for the engine, for callers that hold no types at compile
/// time (the Python module). It knows nothing of Python: module.cpp converts arrays and releases
/// the GIL around the calls that take time, so this lock is what keeps two Python threads from
/// running one cache's non-thread-safe members at once.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/evict/evict.hpp>
#include <kvc/kvc.hpp>
#include <kvc/runtime/evictor_registry.hpp>
#include <kvc/runtime/layered_storage.hpp>  // layers(BASE, lA_B=STORAGE, ...)
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/merge_registry.hpp>  // merging stages (cam, d2o, kvmerger)
#include <kvc/runtime/merged_storage.hpp>  // the merged cache they act on
#include <kvc/runtime/mikv_storage.hpp>    // mikv
#include <kvc/runtime/minicache_storage.hpp>  // minicache(...): layer pairs merged after the prompt
#include <kvc/runtime/quant_storages.hpp>  // int8, int4, kivi, fp8, ...
#include <kvc/runtime/quest_storage.hpp>   // quest(budget=...): query-aware page reads
// These register nothing by being included: module.cpp's register_storages() does (the AVX2 and
// AVX-512 variants register theirs in the TUs kvc_add_isa_variants writes). The low-rank storages
// (pca, palu, think, xkv) are registered by lowrank_storages.cpp, a TU of its own (compiled beside
// this one, so the module's build does not grow by their templates): this file reaches them
// through any_cache (query_window, observe_window) only.

namespace kvc_python {

/// The shape of the model whose K/V a cache holds.
struct shape {
  std::int32_t num_layers = 1;
  std::int32_t num_kv_heads = 1;
  std::int32_t head_dim = 64;
  std::int32_t num_q_heads = 0;  ///< 0: num_kv_heads (no GQA)
  std::int32_t page_size = 16;
  std::int32_t max_pages = 1 << 16;
  /// The model's RoPE, when the caller gives it: Expected Attention carries query statistics to
  /// future positions with it, leverage un-rotates keys, pre_rope=1 storages rotate keys on read.
  std::optional<kvc::rope_config> rope;
  /// The model's W_k and W_v (palu: its bases are the weights' singular vectors, taken when the
  /// cache is built, so the matrices need not outlive the constructor); null for other storages.
  const kvc::runtime::projection_weights* weights = nullptr;
};

using kvc::runtime::any_cache_view;  // an any_cache as the compressor's and observer's Cache

enum class phase { prefill, chunk, decode, compress };

class session_cache {
  using compressor_t = kvc::evict::compressor<kvc::evict::any_scorer>;

 public:
  session_cache(const std::string& spec, const shape& s) : spec_(spec), rope_cfg_(s.rope) {
    const std::int32_t q_heads = s.num_q_heads ? s.num_q_heads : s.num_kv_heads;
    KVC_EXPECTS_IN("kvc.Cache", s.num_kv_heads > 0 && q_heads > 0 && q_heads % s.num_kv_heads == 0,
                   "num_q_heads = ", s.num_q_heads, ", expected a positive multiple of num_kv_heads = ",
                   s.num_kv_heads, " (or 0 for no GQA)");
    if (rope_cfg_) rope_.emplace(*rope_cfg_);
    std::string storage = "fp32", storage_name = "fp32";
    bool have_storage = false;
    for (const kvc::runtime::spec_stage& st : kvc::runtime::parse_spec(spec)) {
      if (kvc::runtime::is_storage(st.name)) {
        if (have_storage)
          kvc::detail::fail(kvc::detail::concat("kvc.Cache: spec = \"", spec, "\" has two storages ('", storage,
                                                "' and '", st.text, "'), expected at most one"));
        storage = st.text;
        storage_name = st.name;
        have_storage = true;
        continue;
      }
      if (kvc::runtime::is_merger(st.name)) {
        if (merge_)
          kvc::detail::fail(kvc::detail::concat("kvc.Cache: spec = \"", spec, "\" has two merging stages ('",
                                                merge_->text, "' and '", st.text, "'), expected at most one"));
        merge_.emplace(kvc::runtime::make_merge_policy(st));
        continue;
      }
      if (!kvc::runtime::is_evictor(st.name))
        kvc::detail::fail(kvc::detail::concat("kvc.Cache: spec = \"", spec, "\": '", st.name,
                                              "' is neither a storage (", kvc::runtime::known_storages(),
                                              "), an eviction policy (", kvc::runtime::known_evictors(),
                                              ") nor a merging stage (", kvc::runtime::known_mergers(), ")"));
      if (ev_)
        kvc::detail::fail(kvc::detail::concat("kvc.Cache: spec = \"", spec, "\" has two eviction policies ('",
                                              ev_->spec, "' and '", st.text, "'), expected at most one"));
      kvc::runtime::evictor_context ctx;
      ctx.num_layers = s.num_layers;
      ctx.num_q_heads = q_heads;
      ctx.rotary = rope_ ? &*rope_ : nullptr;
      ev_.emplace(kvc::runtime::make_evictor(st, ctx));
      if (ev_->what() == kvc::evict::observes::query_stats && !rope_)
        kvc::detail::fail(kvc::detail::concat("kvc.Cache: rope_theta = None, expected the model's RoPE: policy '",
                                              st.name, "' (in \"", spec,
                                              "\") carries pre-RoPE query statistics to future positions"));
    }
    if (storage_name == "palu" && !s.weights)
      kvc::detail::fail(kvc::detail::concat(
          "kvc.Cache: spec = \"", spec, "\": storage '", storage, "' (Palu) takes its bases from the model's W_k and "
          "W_v, but weights = None; expected weights=(wk, wv), float32 [num_layers, num_kv_heads * head_dim, hidden] "
          "each (every layer's k_proj.weight and v_proj.weight), and rope_theta (Palu's keys are pre-RoPE)"));
    if (storage_name != "palu" && s.weights)
      kvc::detail::fail(kvc::detail::concat("kvc.Cache: spec = \"", spec, "\": weights given, but storage '", storage,
                                            "' does not read them, expected weights=None (only palu takes W_k and W_v)"));
    if (storage_name == "minicache" && (ev_ || merge_))
      kvc::detail::fail(kvc::detail::concat("kvc.Cache: spec = \"", spec, "\": storage '", storage,
                                            "' keeps every token of a merged layer pair (its layers must hold the same "
                                            "tokens), so it takes no eviction or merging stage; expected \"", storage, "\" alone"));
    if (merge_ && !ev_)
      kvc::detail::fail(kvc::detail::concat("kvc.Cache: spec = \"", spec, "\": merging stage '", merge_->text,
                                            "' needs an eviction policy before it, e.g. \"snapkv(ratio=0.5)+",
                                            merge_->text, "\" (the policy sets the budget and scores the tokens)"));
    kvc::cache_config c;
    c.num_layers = s.num_layers;
    c.num_kv_heads = s.num_kv_heads;
    c.head_dim = s.head_dim;
    c.page_size = s.page_size;
    c.max_pages = s.max_pages;
    kvc::runtime::storage_options so;
    so.rope = rope_cfg_ ? &*rope_cfg_ : nullptr;
    so.weights = s.weights;
    // The best ISA configuration this CPU runs (python/CMakeLists.txt adds AVX2 and AVX-512 ones
    // to the module, which itself builds for the baseline: SSE2 on x86-64); KVC_ISA forces one.
    // A merging stage needs tokens with log-weights: merged pages (fp16, fp32, int8, int4, kivi),
    // also from the best configuration (the merger reaches them through any_cache::apply_merge).
    cache_ = merge_ ? kvc::runtime::make_merged_cache_for_cpu(storage, c) : kvc::runtime::make_cache_for_cpu(storage, c, so);
    if (merge_) merger_.emplace(*merge_);
    num_q_heads_ = q_heads;
    if (ev_) {
      comp_.emplace(ev_->compressor());
      if (ev_->what() == kvc::evict::observes::attention) observer_.emplace(ev_->observer);
      if (ev_->what() == kvc::evict::observes::query_stats)
        for (std::int32_t l = 0; l < s.num_layers; ++l) qstats_.emplace_back(q_heads, s.head_dim);
    }
  }

  const std::string& spec() const noexcept { return spec_; }
  std::string storage() const { return cache_->name(); }
  /// The ISA configuration whose kernels run this cache (e.g. "isa_avx2_fma_f16c").
  std::string isa() const { return cache_->isa(); }
  std::optional<std::string> policy() const { return ev_ ? std::optional<std::string>(ev_->spec) : std::nullopt; }
  /// Whether the policy splits its budget over layers by preference (cake, also inside chunkkv or
  /// rkv): compressing a sequence then needs cake_allocate first.
  bool cake() const noexcept { return ev_ && ev_->cake.has_value(); }
  /// The merging stage as written, or nothing.
  std::optional<std::string> merging() const { return merge_ ? std::optional<std::string>(merge_->text) : std::nullopt; }
  /// Whether merged tokens carry log-weights (D2O, KVMerger with mass=1): attention computed
  /// outside kvc over gather()'s rows must add log_weights() to the logits.
  bool log_weighted() const noexcept { return merger_ && merger_->log_weighted(); }
  const kvc::cache_config& config() const { return cache_->config(); }
  std::int32_t num_q_heads() const noexcept { return num_q_heads_; }
  /// What the policy observes: "nothing", "query_window" or "attention" ("nothing" without a policy).
  std::string observes() const {
    if (!ev_) return "nothing";
    switch (ev_->what()) {
      case kvc::evict::observes::query_window: return "query_window";
      case kvc::evict::observes::attention: return "attention";
      case kvc::evict::observes::query_stats: return "query_stats";
      case kvc::evict::observes::nothing: break;
    }
    return "nothing";
  }
  /// Whether rewind() can forget tokens of this cache's storage.
  bool can_rewind() const { return cache_->can_rewind(); }
  bool can_share_layers() const { return cache_->can_share_layers(); }
  /// Whether the storage keeps keys before RoPE (the caller then appends un-rotated keys).
  bool pre_rope_keys() const { return cache_->pre_rope_keys(); }
  /// The queries the policy wants in its window: 0 none, -1 every query of the prompt.
  std::int32_t window() const noexcept { return ev_ ? ev_->window : 0; }
  /// The rotated queries the storage asks for once a layer's prompt is in (any_cache::query_window:
  /// ThinK's observation window; xkv's end-of-prompt signal, 1); 0: observe_window is not needed.
  std::int32_t query_window() const { return cache_->query_window(); }

  kvc::seq_id add_sequence() {
    std::lock_guard<std::mutex> g(m_);
    return cache_->add_sequence();
  }
  void remove_sequence(kvc::seq_id s) {
    std::lock_guard<std::mutex> g(m_);
    need_seq(s, "remove_sequence");
    cache_->remove_sequence(s);
    if (comp_) comp_->remove_sequence(s);
    cake_comp_.erase(s);
    if (observer_) observer_->remove_sequence(s);
    if (merger_) merger_->remove_sequence(s);
  }
  bool contains(kvc::seq_id s) const {
    std::lock_guard<std::mutex> g(m_);
    return cache_->contains(s);
  }
  kvc::seq_id fork(kvc::seq_id s) {
    std::lock_guard<std::mutex> g(m_);
    need_seq(s, "fork");
    const kvc::seq_id t = cache_->fork(s);
    try {
      if (observer_) observer_->fork(s, t);
      if (comp_) comp_->fork(s, t);  // the decode step counters: a fork compresses on its source's steps
      if (const auto c = cake_comp_.find(s); c != cake_comp_.end()) {  // cake: its source's layer budgets
        compressor_t copy = c->second;
        copy.fork(s, t);
        cake_comp_.insert_or_assign(t, std::move(copy));
      }
      if (merger_) merger_->fork(s, t);  // D2O's thresholds: a fork merges as its source would
    } catch (...) {
      if (observer_) observer_->remove_sequence(t);
      if (comp_) comp_->remove_sequence(t);
      cake_comp_.erase(t);
      cache_->remove_sequence(t);  // all or nothing: no half-forked sequence stays behind
      throw;
    }
    return t;
  }

  /// Layer `layer` of s takes layer `from`'s tokens by reference (any_cache::share_layer: pages
  /// gain a reference, the layer's own go back, the first write copies), and the attention
  /// observer's per-token statistics of `from` with them, so H2O-like policies score the tokens the
  /// layer now holds; a merging stage's per-layer state (D2O's threshold) and the merged tokens'
  /// log-weights come along too. The compressor's decode-step counters stay the layer's own.
  /// All or nothing.
  void share_layer(kvc::seq_id s, std::int32_t layer, std::int32_t from) {
    std::lock_guard<std::mutex> g(m_);
    need_seq(s, "share_layer");
    const std::int32_t L = cache_->config().num_layers;
    KVC_EXPECTS_IN("kvc.Cache.share_layer", layer >= 0 && layer < L, "layer = ", layer, ", expected 0..", L - 1);
    KVC_EXPECTS_IN("kvc.Cache.share_layer", from >= 0 && from < L && from != layer, "source = ", from,
                   ", expected 0..", L - 1, " and not layer = ", layer);
    if (!can_share_layers())
      kvc::detail::fail(kvc::detail::concat("kvc.Cache.share_layer: spec = \"", spec_, "\": storage '", cache_->name(),
                                            "' cannot share layers, expected a plain, quantized or merged storage "
                                            "(fp32, fp16, bf16, int8, kivi, ..., cam+fp16)"));
    // Plan (copies; may throw) -> the store's share (strong) -> commit (cannot throw).
    std::optional<kvc::evict::attention_observer::layer_stats> stats;
    if (observer_) stats = observer_->copy_layer(s, from, layer);
    if (merger_) merger_->plan_share_layer(s, layer, from);
    cache_->share_layer(s, layer, from);
    if (observer_) observer_->replace_layer(s, layer, std::move(*stats));
    if (merger_) merger_->commit_share_layer(s, layer, from);
  }

  /// MiniCache (any_cache::merge_layers): merges every layer pair of s, once its prompt is in
  /// every layer. Other storages have nothing to merge across layers: refused by name.
  kvc::merge::minicache_report cross_layer_merge(kvc::seq_id s) {
    std::lock_guard<std::mutex> g(m_);
    need_seq(s, "cross_layer_merge");
    kvc::merge::minicache_report r;
    if (!cache_->merge_layers(s, &r))
      kvc::detail::fail(kvc::detail::concat("kvc.Cache.cross_layer_merge: spec = \"", spec_, "\": storage '",
                                            cache_->name(), "' merges nothing across layers, expected minicache(...)"));
    return r;
  }

  /// k, v: [n][num_kv_heads][head_dim]; positions: [n] or null.
  void append(kvc::seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions) {
    std::lock_guard<std::mutex> g(m_);
    need_seq(s, "append");
    cache_->append(s, layer, k, v, n, positions);
  }

  /// Forgets every token of the sequences `seqs` at positions >= n, in every layer
  /// (kv_cache::rewind): seen becomes n, and the attention observer's per-token statistics (H2O's
  /// sums, ...) lose the same tokens. What assisted and speculative decoding need after a rejected
  /// draft, for every row of a batch at once. Everything is checked first, for every sequence and
  /// layer, and the stores' rewinds allocate no page, so a refusal leaves the cache unchanged. Not
  /// rewound (the caller decides whether that matters): tokens evicted or merged while the dropped
  /// ones were present, the compressor's decode-step counters, query statistics, and the
  /// attention the dropped queries paid to older tokens.
  void rewind(const std::vector<kvc::seq_id>& seqs, std::int32_t n) {
    std::lock_guard<std::mutex> g(m_);
    for (kvc::seq_id s : seqs) need_seq(s, "rewind");
    if (!cache_->can_rewind())
      kvc::detail::fail(kvc::detail::concat("kvc.Cache.rewind: spec = \"", spec_, "\": storage '", cache_->name(), "'",
                                            merge_ ? " with a merging stage (a merged token may hold members from the "
                                                     "dropped positions)"
                                                   : "",
                                            " cannot rewind, expected a plain or quantized storage without merging "
                                            "(fp32, fp16, bf16, int8, kivi, ...)"));
    const auto& c = cache_->config();
    // [sequence][layer][kv head]: the tokens each stream keeps.
    std::vector<std::vector<std::vector<std::int32_t>>> lengths(seqs.size());
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const kvc::seq_id s = seqs[i];
      for (std::int32_t l = 0; l < c.num_layers; ++l) {
        const std::int32_t seen = cache_->seen(s, l);
        KVC_EXPECTS_IN("kvc.Cache.rewind", n >= 0 && n <= seen, "n = ", n, ", expected 0..", seen,
                       " (the tokens layer ", l, " of seq ", s, " has seen)");
        std::vector<std::int32_t> len;
        for (std::int32_t h = 0; h < c.num_kv_heads; ++h) {
          // The tokens at positions >= n must be the stream's newest: a suffix.
          const std::int32_t L = cache_->length(s, l, h);
          const std::int32_t* p = cache_->positions(s, l, h);
          std::int32_t m = 0;
          while (m < L && p[m] < n) ++m;
          for (std::int32_t t = m; t < L; ++t)
            KVC_EXPECTS_IN("kvc.Cache.rewind", p[t] >= n, "seq ", s, ", layer ", l, ", kv head ", h,
                           " holds position ", p[t], " at stream index ", t, " after position ", p[m], " at index ",
                           m, ", expected positions ascending in append order (keys re-rotated to new positions "
                           "cannot be rewound)");
          len.push_back(m);
        }
        lengths[i].push_back(std::move(len));
      }
    }
    for (std::size_t i = 0; i < seqs.size(); ++i)
      for (std::int32_t l = 0; l < c.num_layers; ++l) {
        cache_->rewind(seqs[i], l, n);
        if (observer_) observer_->truncate(seqs[i], l, lengths[i][static_cast<std::size_t>(l)]);
      }
  }

  /// q: [num_q_heads][head_dim] -> out: the same shape. Feeds the policy's attention observer.
  void attention(kvc::seq_id s, std::int32_t layer, const float* q, float* out, float scale) {
    std::lock_guard<std::mutex> g(m_);
    need_seq(s, "attention");
    kvc::decode_options opt;
    opt.scale = scale;
    if (!observer_) {
      cache_->attention(s, layer, q, num_q_heads_, out, opt);
      return;
    }
    std::int32_t longest = 0;
    for (std::int32_t h = 0; h < cache_->config().num_kv_heads; ++h) longest = std::max(longest, cache_->length(s, layer, h));
    probs_.assign(static_cast<std::size_t>(num_q_heads_) * static_cast<std::size_t>(std::max(longest, 1)), 0.0f);
    opt.probs = probs_.data();
    opt.probs_stride = std::max(longest, 1);
    cache_->attention(s, layer, q, num_q_heads_, out, opt);
    observer_->observe(any_cache_view{cache_.get()}, s, layer, probs_.data(), num_q_heads_, opt.probs_stride);
  }

  /// Expected Attention: adds n pre-RoPE queries [n][num_q_heads][head_dim] of `layer` to its statistics.
  void observe_queries(std::int32_t layer, const float* q, std::int32_t n) {
    std::lock_guard<std::mutex> g(m_);
    if (qstats_.empty())
      kvc::detail::fail(kvc::detail::concat("kvc.Cache.observe_queries: spec = \"", spec_,
                                            "\" has no policy observing query statistics, expected one such as "
                                            "expected_attention"));
    need_layer(layer, "observe_queries");
    qstats_[static_cast<std::size_t>(layer)].add(q, n);
  }

  /// The storage's end-of-prompt call (any_cache::observe_window): q [n][num_q_heads][head_dim],
  /// the layer's last n rotated queries, 1 <= n <= query_window(), once the prompt of `layer` is in
  /// the cache and any eviction of it is done. ThinK chooses the layer's channels on its first
  /// call; xkv moves a group to latents once every layer of it was observed. The storages check
  /// their own state and leave the cache unchanged when they refuse.
  void observe_window(kvc::seq_id s, std::int32_t layer, const float* q, std::int32_t n) {
    std::lock_guard<std::mutex> g(m_);
    need_seq(s, "observe_window");
    need_layer(layer, "observe_window");
    const std::int32_t w = cache_->query_window();
    if (w <= 0)
      kvc::detail::fail(kvc::detail::concat("kvc.Cache.observe_window: storage '", cache_->name(),
                                            "' observes no queries (query_window = 0), expected a call only when "
                                            "query_window > 0 (think, xkv)"));
    KVC_EXPECTS_IN("kvc.Cache.observe_window", n >= 1 && n <= w, "q has ", n, " queries, expected 1..query_window = ", w,
                   " (the layer's last rotated queries)");
    KVC_EXPECTS_IN("kvc.Cache.observe_window", n <= cache_->seen(s, layer), "q has ", n, " queries but layer ", layer,
                   " of seq ", s, " has seen ", cache_->seen(s, layer),
                   " tokens, expected the queries of the layer's last positions (append the prompt first)");
    cache_->observe_window(s, layer, q, n, num_q_heads_);
  }

  /// CAKE: every layer's preference (kvc::evict::cake_preference) from its query window over s,
  /// [num_layers] windows of the layers' last rotated queries, and the compressor s's phases then
  /// run with those layer budgets (kvc::runtime::cake_allocator), s's own: other sequences keep
  /// theirs. Call it once every layer of the prompt is in, before the layers' after_prefill; a
  /// sequence compressed without it is refused. A fork takes its source's.
  void cake_allocate(kvc::seq_id s, const std::vector<kvc::evict::query_window>& windows) {
    std::lock_guard<std::mutex> g(m_);
    constexpr const char* who = "kvc.Cache.cake_allocate";
    need_seq(s, "cake_allocate");
    if (!ev_ || !ev_->cake)
      kvc::detail::fail(kvc::detail::concat(who, ": spec = \"", spec_, "\" has no cake policy, expected cake(...): "
                                            "other policies take their budgets from the spec"));
    const std::int32_t L = cache_->config().num_layers;
    KVC_EXPECTS_IN(who, static_cast<std::int32_t>(windows.size()) == L, "windows has ", windows.size(),
                   " entries, expected one query window per layer (", L, ")");
    kvc::runtime::evictor ev = *ev_;
    ev.options.alloc = kvc::runtime::cake_allocator(ev, any_cache_view{cache_.get()}, s,
                                                   [&](std::int32_t l) { return windows[static_cast<std::size_t>(l)]; });
    cake_comp_.insert_or_assign(s, ev.compressor());  // a new prompt's budgets; its decode-step counters restart
  }

  /// One compressor phase on one layer. `window` is the policy's query window when it observes one.
  kvc::evict::compress_report compress(phase ph, kvc::seq_id s, std::int32_t layer, const kvc::evict::query_window* window) {
    std::lock_guard<std::mutex> g(m_);
    need_seq(s, "compress");
    if (!comp_)
      kvc::detail::fail(kvc::detail::concat("kvc.Cache: spec = \"", spec_,
                                            "\" has no eviction policy, expected one (e.g. \"snapkv(ratio=0.5)+",
                                            cache_->name(), "\") to compress"));
    const auto cake = cake_comp_.find(s);
    if (ev_->cake && cake == cake_comp_.end())
      kvc::detail::fail(kvc::detail::concat("kvc.Cache: spec = \"", spec_, "\": policy 'cake' splits the budget over "
                                            "layers by every layer's query window, expected cache.cake_allocate(seq = ",
                                            s, ", windows) once the prompt is in every layer, before compressing"));
    compressor_t& comp = ev_->cake ? cake->second : *comp_;
    kvc::evict::observations obs;
    if (ev_->what() == kvc::evict::observes::query_window) {
      if (!window)
        kvc::detail::fail(kvc::detail::concat("kvc.Cache: queries = None, expected the last ",
                                              ev_->window < 0 ? std::string("(every) prompt") : std::to_string(ev_->window),
                                              " rotated queries [n, num_q_heads, head_dim]: policy '", ev_->spec,
                                              "' observes a query window"));
      obs.window = window;
    }
    if (observer_) obs.attention = &*observer_;
    kvc::evict::query_stats qs;
    if (!qstats_.empty()) {
      need_layer(layer, "compress");
      qs = qstats_[static_cast<std::size_t>(layer)].view(&*rope_);
      obs.stats = &qs;
    }
    any_cache_view view{cache_.get()};
    if (merger_) return merge(comp, ph, s, layer, obs);
    switch (ph) {
      case phase::prefill: return comp.after_prefill(view, s, layer, obs);
      case phase::chunk: return comp.after_chunk(view, s, layer, obs);
      case phase::decode: return comp.after_decode_step(view, s, layer, obs);
      case phase::compress: break;
    }
    return comp.compress(view, s, layer, obs);
  }

  /// Each kept token's log-weight (log of the mass it stands for; 0 for a token that stands for
  /// itself), [length]: every cache has them, all 0 without a merging stage.
  std::vector<float> log_weights(kvc::seq_id s, std::int32_t layer, std::int32_t head) const {
    std::lock_guard<std::mutex> g(m_);
    need_seq(s, "log_weights");
    need_layer(layer, "log_weights");
    KVC_EXPECTS_IN("kvc.Cache.log_weights", head >= 0 && head < cache_->config().num_kv_heads, "head = ", head,
                   ", expected 0..", cache_->config().num_kv_heads - 1);
    const kvc::runtime::any_cache& c = *cache_;
    if (const std::vector<float>* w = c.log_weights(s, layer, head)) return *w;
    return std::vector<float>(static_cast<std::size_t>(cache_->length(s, layer, head)), 0.0f);
  }

  std::int32_t length(kvc::seq_id s, std::int32_t layer, std::int32_t head) const {
    std::lock_guard<std::mutex> g(m_);
    need_seq(s, "length");
    return cache_->length(s, layer, head);
  }
  std::vector<std::int32_t> positions(kvc::seq_id s, std::int32_t layer, std::int32_t head) const {
    std::lock_guard<std::mutex> g(m_);
    need_seq(s, "positions");
    const std::int32_t n = cache_->length(s, layer, head);
    const std::int32_t* p = cache_->positions(s, layer, head);
    return std::vector<std::int32_t>(p, p + n);
  }
  std::int32_t seen(kvc::seq_id s, std::int32_t layer) const {
    std::lock_guard<std::mutex> g(m_);
    need_seq(s, "seen");
    return cache_->seen(s, layer);
  }
  /// The kept K and V of one stream as float, each [length][head_dim].
  void gather(kvc::seq_id s, std::int32_t layer, std::int32_t head, std::vector<float>& k, std::vector<float>& v) const {
    std::lock_guard<std::mutex> g(m_);
    need_seq(s, "gather");
    const std::size_t n = static_cast<std::size_t>(cache_->length(s, layer, head));
    k.resize(n * static_cast<std::size_t>(cache_->config().head_dim));
    v.resize(k.size());
    cache_->gather(s, layer, head, k.data(), v.data());
  }

  std::size_t bytes_in_use() const {
    std::lock_guard<std::mutex> g(m_);
    return cache_->bytes_in_use();
  }
  std::size_t bytes_in_use(std::int32_t layer) const {
    std::lock_guard<std::mutex> g(m_);
    return cache_->bytes_in_use(layer);
  }
  kvc::memory_traffic traffic() const {
    std::lock_guard<std::mutex> g(m_);
    return cache_->traffic();
  }
  std::size_t metadata_bytes() const {
    std::lock_guard<std::mutex> g(m_);
    return cache_->metadata_bytes();
  }
  std::int64_t tokens_held() const {
    std::lock_guard<std::mutex> g(m_);
    return cache_->tokens_held();
  }

 private:
  /// The sequence check every call makes first, so an unknown id is reported the same way
  /// whatever the storage (and before the compressor or observer see it).
  void need_seq(kvc::seq_id s, const char* call) const {
    if (!cache_->contains(s))
      kvc::detail::fail(kvc::detail::concat("kvc.Cache.", call, ": seq = ", s,
                                            ", expected a sequence of this cache (from add_sequence or fork)"));
  }

  /// A compressor phase with the merging stage in place of eviction (merger's after_prefill /
  /// after_chunk / after_decode_step); the explicit compress() at the policy's target, refusing
  /// a token budget above the longest stream as compressor::compress does.
  kvc::evict::compress_report merge(compressor_t& comp, phase ph, kvc::seq_id s, std::int32_t layer,
                                    const kvc::evict::observations& obs) {
    switch (ph) {
      case phase::prefill: return merger_->after_prefill(comp, *cache_, s, layer, obs);
      case phase::chunk: return merger_->after_chunk(comp, *cache_, s, layer, obs);
      case phase::decode: return merger_->after_decode_step(comp, *cache_, s, layer, obs);
      case phase::compress: break;
    }
    need_layer(layer, "compress");
    const kvc::budget b = comp.options().target;
    std::int32_t longest = 0;
    for (std::int32_t h = 0; h < cache_->config().num_kv_heads; ++h) longest = std::max(longest, cache_->length(s, layer, h));
    KVC_EXPECTS_IN("kvc.Cache.compress", b.type != kvc::budget::kind::tokens || b.value <= longest, "tokens = ",
                   static_cast<std::int64_t>(b.value), ", expected <= the longest stream of layer ", layer, " (",
                   longest, " tokens); the cache is unchanged");
    return merger_->compress(comp, *cache_, s, layer, obs, b);
  }

  void need_layer(std::int32_t layer, const char* call) const {
    if (layer < 0 || layer >= cache_->config().num_layers)
      kvc::detail::fail(kvc::detail::concat("kvc.Cache.", call, ": layer = ", layer, ", expected 0..",
                                            cache_->config().num_layers - 1));
  }

  std::string spec_;
  std::optional<kvc::rope_config> rope_cfg_;
  std::optional<kvc::rope> rope_;  ///< what the evictor and the statistics point at
  std::optional<kvc::runtime::evictor> ev_;
  std::unique_ptr<kvc::runtime::any_cache> cache_;
  std::int32_t num_q_heads_ = 0;
  std::optional<compressor_t> comp_;
  /// cake: each sequence's compressor, with the layer budgets cake_allocate set from its windows.
  std::map<kvc::seq_id, compressor_t> cake_comp_;
  std::optional<kvc::evict::attention_observer> observer_;
  std::optional<kvc::runtime::merge_policy> merge_;
  std::optional<kvc::runtime::merger> merger_;  ///< the merging stage after the eviction's selection
  std::vector<float> probs_;
  std::vector<kvc::evict::query_stats_accumulator> qstats_;  ///< [layer], pre-RoPE queries
  mutable std::mutex m_;
};

}  // namespace kvc_python
