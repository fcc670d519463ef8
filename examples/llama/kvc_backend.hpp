// SPDX-License-Identifier: Apache-2.0
/// \file kvc_backend.hpp
/// The engine's KV store on kvc. Everything an engine writes to adopt kvc is in this file:
///  - storage: a kvc cache built from a storage spec ("fp16", "bf16", "fp32", or any quantized
///    storage kvc::runtime registers: "int8", "kivi(bits=2)", "fp8", ...), appended with the rotated K/V the engine just
///    projected, memory read from kvc's page pool;
///  - attention: kvc's CPU decode attention over what the cache kept;
///  - compression: a kvc::evict::compressor run between forward calls, fed with what its
///    scorer observes (the engine's recent queries, each step's attention probabilities, or
///    statistics of the queries before RoPE, which the engine hands over through observe_queries).
///  - merging: optionally a kvc::runtime::merger after the compressor's selection (CaM, D2O,
///    KVMerger), over a cache whose tokens carry log-weights (kvc::runtime::make_merged_cache).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <kvc/evict/evict.hpp>
#include <kvc/kvc.hpp>
#include <kvc/runtime/evictor_registry.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/merge_registry.hpp>  // merging stages (cam, d2o, kvmerger) and the merged cache
// The storages make_cache builds (int8, kivi, mikv, pca, layers, quest, ...) are registered by the
// engine's registration TUs (registry.hpp), not by this header.

#include "kv_backend.hpp"

namespace llama {

using kvc::runtime::any_cache_view;  // an any_cache as the compressor's and observer's Cache

class kvc_store final : public kv_store {
public:
    /// \param storage     kvc storage spec: "fp16", "bf16", "fp32", ...
    /// \param max_tokens  longest sequence the store must hold; sizes the page pool (the pool
    ///                    reserves address space up front and the OS commits pages on use)
    /// \param merge       a merging stage applied after each compression (the cache then holds
    ///                    merged tokens: storage fp16 or fp32); null: eviction drops
    /// \param weights     the model's W_k and W_v, for storages that factor them (palu); may be null
    kvc_store(const kv_shape& s, const std::string& storage, int page_size, int max_tokens, kvc::thread_pool* pool = nullptr,
              const kvc::runtime::merge_policy* merge = nullptr, const kvc::runtime::projection_weights* weights = nullptr)
        : shape_(s), pool_(pool) {
        kvc::cache_config c;
        c.num_layers = s.num_layers;
        c.num_kv_heads = s.num_kv_heads;
        c.head_dim = s.head_dim;
        c.page_size = page_size;
        c.max_pages = static_cast<int32_t>(int64_t{s.num_layers} * s.num_kv_heads * ((max_tokens + page_size - 1) / page_size + 2));
        kvc::rope_config rc;  // the engine's RoPE, for storages that keep keys before it (pre_rope=1)
        rc.head_dim = s.head_dim;
        rc.rotary_dim = s.rope_dims;
        rc.theta = s.rope_theta;
        rc.style = kvc::rope_style::interleaved;
        kvc::runtime::storage_options so;
        so.rope = &rc;
        so.weights = weights;
        if (merge) {
            cache_ = kvc::runtime::make_merged_cache(storage, c);
            merger_.emplace(*merge);
        } else {
            cache_ = kvc::runtime::make_cache(storage, c, so);
        }
        seq_ = cache_->add_sequence();
        // The former prefill (every prompt token attended alone), for A/B timing and checks.
        const char* tp = std::getenv("KVC_LLAMA_TOKEN_PREFILL");
        token_prefill_ = tp && *tp && std::string(tp) != "0";
    }

    /// Attaches eviction: the compressor and, for decode-time scorers, the attention observer
    /// that every attention step then feeds.
    /// \param observer  how the attention observer accumulates (A2SF's forgetting factor)
    void set_compressor(kvc::evict::compressor<kvc::evict::any_scorer> c, const kvc::evict::observer_params& observer = {}) {
        comp_.emplace(std::move(c));
        if (comp_->scorer().what() == kvc::evict::observes::attention) observer_.emplace(observer);
        if (comp_->scorer().what() == kvc::evict::observes::query_stats) {
            // Expected attention: mean and covariance of the pre-RoPE queries the engine hands
            // over (observe_queries), and the engine's RoPE to carry them to future positions.
            kvc::rope_config rc;
            rc.head_dim = shape_.head_dim;
            rc.rotary_dim = shape_.rope_dims;
            rc.theta = shape_.rope_theta;
            rc.style = kvc::rope_style::interleaved;  // the engine rotates pairs (2i, 2i+1)
            rope_.emplace(rc);
            for (int l = 0; l < shape_.num_layers; ++l) qstats_.emplace_back(shape_.num_q_heads, shape_.head_dim);
        }
    }
    /// CAKE: layer budgets from the layers' attention spread, computed over every layer before
    /// each compression (kvc::runtime::cake_allocator).
    void set_cake(kvc::runtime::evictor ev) { cake_.emplace(std::move(ev)); }

    /// Keeps alive what the compressor's scorers point at (the model's kvc::rope).
    void keep_alive(std::shared_ptr<const void> p) { alive_.push_back(std::move(p)); }

    bool wants_queries() const override { return !qstats_.empty(); }
    bool wants_pre_rope_keys() const override { return cache_->pre_rope_keys(); }
    void observe_queries(int layer, const float* q, int n) override {
        qstats_.at(static_cast<std::size_t>(layer)).add(q, n);
    }
    bool compresses() const { return comp_.has_value(); }
    int query_window() const override { return cache_->query_window(); }

    /// Hands every layer's recent rotated queries to a storage that asks for them (ThinK fits its
    /// channels on them, any_cache::observe_window); after the compressor, so it sees what was kept.
    template <class WindowFn>
    void observe_windows(WindowFn&& window) {
        if (cache_->query_window() <= 0) return;
        for (int l = 0; l < shape_.num_layers; ++l) {
            const kvc::evict::query_window w = window(l);
            const int n = std::min<int>(w.n, cache_->query_window());
            if (n <= 0) continue;
            cache_->observe_window(seq_, l, w.q + static_cast<std::size_t>(w.n - n) * w.num_q_heads * w.head_dim, n, w.num_q_heads);
        }
    }

    void append(int layer, const float* k, const float* v, int n, const int32_t* positions) override {
        cache_->append(seq_, layer, k, v, n, positions);
    }

    void attend(int layer, const float* q, float* out) override {
        kvc::decode_options opt;
        opt.pool = pool_;
        if (observer_) {  // H2O, TOVA, Scissorhands: the step's attention, summed over each group
            int32_t longest = 0;
            for (int h = 0; h < shape_.num_kv_heads; ++h) longest = std::max(longest, cache_->length(seq_, layer, h));
            group_probs_.assign(static_cast<std::size_t>(shape_.num_kv_heads) * longest, 0.0f);
            opt.group_probs = group_probs_.data();
            opt.probs_stride = longest;
            cache_->attention(seq_, layer, q, shape_.num_q_heads, out, opt);
            observer_->observe_group(any_cache_view{cache_.get()}, seq_, layer, group_probs_.data(), longest, shape_.num_q_heads / shape_.num_kv_heads);
            return;
        }
        cache_->attention(seq_, layer, q, shape_.num_q_heads, out, opt);
    }

    /// Decode-time observers (H2O, TOVA, Scissorhands) see every prompt token's attention, one
    /// step at a time, and mikv records what its attention() reads: those keep the token-by-token
    /// prefill, so they accumulate what they did before.
    bool attends_chunks() const override {
        return !token_prefill_ && !observer_ && cache_->has_prefill_attention();
    }
    int chunk_run(int layer, int limit) const override { return cache_->chunk_tokens(seq_, layer, limit); }
    void attend_chunk(int layer, const float* q, int n, const int32_t* positions, float* out) override {
        kvc::decode_options opt;
        opt.pool = pool_;
        cache_->prefill_attention(seq_, layer, q, n, positions, shape_.num_q_heads, out, opt);
    }

    enum class phase { prefill, chunk, decode };

    /// Runs the compressor over every layer. `window(layer)` gives the engine's recent rotated
    /// queries for scorers that observe a query window. Returns the tokens dropped.
    template <class WindowFn>
    int64_t compress(phase ph, WindowFn&& window) {
        if (!comp_) return 0;
        int64_t dropped = 0;
        any_cache_view view{cache_.get()};
        if (cake_) {  // the layer budgets depend on every layer's window: a fresh compressor per call
            kvc::runtime::evictor ev = *cake_;
            ev.options.alloc = kvc::runtime::cake_allocator(ev, view, seq_, window);
            comp_.emplace(ev.compressor());
        }
        for (int l = 0; l < shape_.num_layers; ++l) {
            kvc::evict::observations obs;
            kvc::evict::query_window w;
            kvc::evict::query_stats qs;
            if (comp_->scorer().what() == kvc::evict::observes::query_window) {
                w = window(l);
                obs.window = &w;
            }
            if (!qstats_.empty()) {
                qs = qstats_[static_cast<std::size_t>(l)].view(&*rope_);
                obs.stats = &qs;
            }
            if (observer_) obs.attention = &*observer_;
            if (merger_) {  // the compressor's selection and scores, then the merge instead of eviction
                const kvc::evict::compress_report r = ph == phase::prefill ? merger_->after_prefill(*comp_, *cache_, seq_, l, obs)
                                                      : ph == phase::chunk ? merger_->after_chunk(*comp_, *cache_, seq_, l, obs)
                                                                           : merger_->after_decode_step(*comp_, *cache_, seq_, l, obs);
                dropped += r.tokens_before - r.tokens_after;
                continue;
            }
            kvc::evict::compress_report r = ph == phase::prefill ? comp_->after_prefill(view, seq_, l, obs)
                                            : ph == phase::chunk ? comp_->after_chunk(view, seq_, l, obs)
                                                                 : comp_->after_decode_step(view, seq_, l, obs);
            dropped += r.tokens_before - r.tokens_after;
        }
        return dropped;
    }

    int length(int layer, int kv_head) const override { return cache_->length(seq_, layer, kv_head); }
    std::size_t bytes_in_use() const override { return cache_->bytes_in_use(); }
    std::string describe() const override {
        return "kvc " + cache_->name() + ", pages of " + std::to_string(cache_->config().page_size) + " tokens" +
               (comp_ ? std::string(", evict ") + comp_->scorer().scorer_name() : std::string()) +
               (merger_ ? ", merge " + merger_->policy().text : std::string());
    }

    kvc::runtime::any_cache& cache() { return *cache_; }
    const kvc::runtime::any_cache& cache() const { return *cache_; }
    kvc::seq_id seq() const { return seq_; }

private:
    kv_shape shape_;
    kvc::thread_pool* pool_ = nullptr;
    bool token_prefill_ = false;  // KVC_LLAMA_TOKEN_PREFILL: attend the prompt token by token
    std::unique_ptr<kvc::runtime::any_cache> cache_;
    kvc::seq_id seq_ = 0;
    std::optional<kvc::evict::compressor<kvc::evict::any_scorer>> comp_;
    std::optional<kvc::evict::attention_observer> observer_;
    std::vector<float> group_probs_;
    std::optional<kvc::rope> rope_;                                   // expected attention
    std::vector<kvc::evict::query_stats_accumulator> qstats_;         // [layer], pre-RoPE queries
    std::optional<kvc::runtime::evictor> cake_;
    std::optional<kvc::runtime::merger> merger_;                     // merging after eviction
    std::vector<std::shared_ptr<const void>> alive_;
};

}  // namespace llama
