// SPDX-License-Identifier: Apache-2.0
/// \file kvc_backend.hpp
/// The engine's KV store on kvc. Everything an engine writes to adopt kvc is in this file:
///  - storage: a kvc cache built from a storage spec ("fp16", "bf16", "fp32", or a quantized
///    storage once registered with kvc::runtime), appended with the rotated K/V the engine just
///    projected, memory read from kvc's page pool;
///  - attention: kvc's CPU decode attention over what the cache kept;
///  - compression: a kvc::evict::compressor run between forward calls, fed with what its
///    scorer observes (the engine's recent queries, or each step's attention probabilities).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <kvc/evict/evict.hpp>
#include <kvc/kvc.hpp>
#include <kvc/cpu/quant_attention.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/quant/quant_cache.hpp>
#include <kvc/runtime/make_cache.hpp>

#include "kv_backend.hpp"

namespace llama {

/// Forwards the members kvc's compressor and observer read to a runtime::any_cache.
/// kvc/evict/core.hpp probes `Cache::value_type` when it checks for rewrite_keys, and
/// any_cache has no value_type, so passing it directly does not compile (kvc at 2026-11-24).
/// Drop this view once any_cache can be handed to the compressor directly.
struct any_cache_view {
    using value_type = float;
    kvc::runtime::any_cache* c;
    const kvc::cache_config& config() const { return c->config(); }
    int32_t length(kvc::seq_id s, int32_t l, int32_t h) const { return c->length(s, l, h); }
    const int32_t* positions(kvc::seq_id s, int32_t l, int32_t h) const { return c->positions(s, l, h); }
    int32_t seen(kvc::seq_id s, int32_t l) const { return c->seen(s, l); }
    void gather(kvc::seq_id s, int32_t l, int32_t h, float* k, float* v = nullptr) const { c->gather(s, l, h, k, v); }
    void keep_layer(kvc::seq_id s, int32_t l, const std::vector<std::vector<int32_t>>& kept) { c->keep_layer(s, l, kept); }
    std::size_t bytes_in_use() const { return c->bytes_in_use(); }
    std::size_t bytes_in_use(int32_t l) const { return c->bytes_in_use(l); }
};

/// Registers kvc's quantized caches as runtime storages under the names "kivi(bits=2|4)",
/// "int8" and "int4" — unless kvc::runtime already registers those names itself, in which case
/// kvc's own builders win. (kvc/runtime/make_cache.hpp announces a runtime/quant.hpp that will
/// do this; until it lands the engine does it, in these few lines.)
inline void register_quantized_storages() {
    static const bool once = [] {
        auto& r = kvc::runtime::storage_registry();
        using kvc::runtime::any_cache;
        using kvc::runtime::spec_args;
        using kvc::runtime::spec_stage;
        auto config = [](const kvc::cache_config& c, int unit) {
            kvc::quant_cache_config q;
            static_cast<kvc::cache_config&>(q) = c;
            q.page_size = std::max(c.page_size, unit);  // a page must hold whole groups
            return q;
        };
        auto make = [](auto tag, const std::string& name, const kvc::quant_cache_config& q) -> std::unique_ptr<any_cache> {
            using C = typename decltype(tag)::type;
            return std::make_unique<kvc::runtime::cache_adapter<C>>(name, q);
        };
        if (!r.count("kivi"))
            r["kivi"] = [=](const spec_stage& st, const kvc::cache_config& c) -> std::unique_ptr<any_cache> {
                spec_args a(st);
                const int bits = a.integer("bits", 2);
                a.finish("bits (2 or 4; group 32 and residual 128 as in the paper)");
                if (bits == 2) return make(std::common_type<kvc::quant_cache<kvc::quant::kivi<2>>>{}, st.text, config(c, 32));
                if (bits == 4) return make(std::common_type<kvc::quant_cache<kvc::quant::kivi<4>>>{}, st.text, config(c, 32));
                throw std::invalid_argument("kivi: bits = " + std::to_string(bits) + ", expected 2 or 4");
            };
        if (!r.count("int8"))
            r["int8"] = [=](const spec_stage& st, const kvc::cache_config& c) -> std::unique_ptr<any_cache> {
                spec_args(st).finish("(none)");
                return make(std::common_type<kvc::quant_cache<kvc::quant::int8>>{}, st.text, config(c, 1));
            };
        if (!r.count("int4"))
            r["int4"] = [=](const spec_stage& st, const kvc::cache_config& c) -> std::unique_ptr<any_cache> {
                spec_args(st).finish("(none)");
                return make(std::common_type<kvc::quant_cache<kvc::quant::int4>>{}, st.text, config(c, 1));
            };
        return true;
    }();
    (void)once;
}

class kvc_store final : public kv_store {
public:
    /// \param storage     kvc storage spec: "fp16", "bf16", "fp32", ...
    /// \param max_tokens  longest sequence the store must hold; sizes the page pool (the pool
    ///                    reserves address space up front and the OS commits pages on use)
    kvc_store(const kv_shape& s, const std::string& storage, int page_size, int max_tokens, kvc::thread_pool* pool = nullptr)
        : shape_(s), pool_(pool) {
        kvc::cache_config c;
        c.num_layers = s.num_layers;
        c.num_kv_heads = s.num_kv_heads;
        c.head_dim = s.head_dim;
        c.page_size = page_size;
        c.max_pages = static_cast<int32_t>(int64_t{s.num_layers} * s.num_kv_heads * ((max_tokens + page_size - 1) / page_size + 2));
        cache_ = kvc::runtime::make_cache(storage, c);
        seq_ = cache_->add_sequence();
    }

    /// Attaches eviction: the compressor and, for decode-time scorers, the attention observer
    /// that every attention step then feeds.
    void set_compressor(kvc::evict::compressor<kvc::evict::any_scorer> c) {
        comp_.emplace(std::move(c));
        if (comp_->scorer().what() == kvc::evict::observes::attention) observer_.emplace();
    }
    bool compresses() const { return comp_.has_value(); }

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

    enum class phase { prefill, chunk, decode };

    /// Runs the compressor over every layer. `window(layer)` gives the engine's recent rotated
    /// queries for scorers that observe a query window. Returns the tokens dropped.
    template <class WindowFn>
    int64_t compress(phase ph, WindowFn&& window) {
        if (!comp_) return 0;
        int64_t dropped = 0;
        any_cache_view view{cache_.get()};
        for (int l = 0; l < shape_.num_layers; ++l) {
            kvc::evict::observations obs;
            kvc::evict::query_window w;
            if (comp_->scorer().what() == kvc::evict::observes::query_window) {
                w = window(l);
                obs.window = &w;
            }
            if (observer_) obs.attention = &*observer_;
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
               (comp_ ? std::string(", evict ") + comp_->scorer().scorer_name() : std::string());
    }

    kvc::runtime::any_cache& cache() { return *cache_; }
    kvc::seq_id seq() const { return seq_; }

private:
    kv_shape shape_;
    kvc::thread_pool* pool_ = nullptr;
    std::unique_ptr<kvc::runtime::any_cache> cache_;
    kvc::seq_id seq_ = 0;
    std::optional<kvc::evict::compressor<kvc::evict::any_scorer>> comp_;
    std::optional<kvc::evict::attention_observer> observer_;
    std::vector<float> group_probs_;
};

}  // namespace llama
