// SPDX-License-Identifier: Apache-2.0
/// \file stores.hpp
/// Turns a cache spec into a KV store plus the compression hooks the engine calls between
/// forward passes. Specs use kvc's runtime grammar (kvc/runtime/spec.hpp):
///   "dense"                         the engine's own float arrays (kv_backend.hpp), the reference
///   "full" | "fp16" | "bf16" | "fp32" | any storage kvc::runtime registers (quantized ones too)
///   EVICTOR(ratio=R | tokens=N, ...) [+ STORAGE]
///       e.g. "snapkv(ratio=0.75)", "streaming_llm(tokens=256)+fp32", "h2o(ratio=0.5,recent=32)"
/// ratio is kvpress's compression ratio (the fraction evicted); tokens is a per-stream count.
/// Storage defaults to fp16. Evictors and their parameters come from kvc's registry
/// (kvc/runtime/evictor_registry.hpp); storages from kvc/runtime/quant_storages.hpp.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kv_backend.hpp"
#include "kvc_backend.hpp"
#include "model.hpp"

namespace llama {

/// Engine-wide settings for building kvc stores.
struct store_options {
    int page_size = 16;
    int max_tokens = 8192;
    kvc::thread_pool* pool = nullptr;  ///< threads for decode attention; null = serial
};

/// What the engine needs to run a sequence under one cache configuration.
struct store_factory {
    std::string spec;
    int query_window = 0;  ///< rotated queries the engine must remember for the policy
    std::function<std::unique_ptr<kv_store>()> create;
    std::function<void(session&)> after_prefill = [](session&) {};  ///< one-shot, after the prompt
    std::function<void(session&)> after_chunk = [](session&) {};    ///< chunked prefill / streaming
    std::function<void(session&)> after_decode = [](session&) {};   ///< after each decode step
};

/// The model facts kvc's evictor builders read (kvc::runtime::evictor_context), with the
/// engine's RoPE as a kvc::rope: adjacent pairs, the file's theta and rotated channels.
inline std::shared_ptr<const kvc::rope> model_rope(const kv_shape& shape) {
    kvc::rope_config rc;
    rc.head_dim = shape.head_dim;
    rc.rotary_dim = shape.rope_dims;
    rc.theta = shape.rope_theta;
    rc.style = kvc::rope_style::interleaved;
    return std::make_shared<const kvc::rope>(rc);
}

inline std::vector<std::string> available_stores() {
    std::vector<std::string> v{"dense", "full (= fp16)"};
    for (const auto& kv : kvc::runtime::storage_registry()) v.push_back(kv.first + "    (storage)");
    for (const auto& kv : kvc::runtime::evictor_registry())
        v.push_back(kv.first + "(ratio=R|tokens=N,...)[+STORAGE]    (evictor; parameters: kvc/runtime/evictor_registry.hpp)");
    return v;
}

inline store_factory parse_store(const std::string& spec, const kv_shape& shape, const store_options& opt = {}) {
    store_factory f;
    f.spec = spec;
    if (spec == "dense") {
        f.create = [shape] { return std::make_unique<dense_kv>(shape); };
        return f;
    }
    std::string storage = "fp16";
    std::optional<kvc::runtime::evictor> ev;
    std::shared_ptr<const kvc::rope> rope = model_rope(shape);
    int window = 0;
    if (spec != "full" && spec != "kvc") {
        bool have_storage = false;
        for (const kvc::runtime::spec_stage& st : kvc::runtime::parse_spec(spec)) {
            if (kvc::runtime::is_storage(st.name)) {
                if (have_storage) throw std::invalid_argument("cache spec '" + spec + "': more than one storage stage");
                storage = st.text;
                have_storage = true;
                continue;
            }
            if (!kvc::runtime::is_evictor(st.name))
                throw std::invalid_argument("cache spec '" + spec + "': '" + st.name + "' is neither a kvc storage (" +
                                            kvc::runtime::known_storages() + ") nor a kvc eviction policy (" +
                                            kvc::runtime::known_evictors() + ")");
            if (ev) throw std::invalid_argument("cache spec '" + spec + "': more than one evictor");
            kvc::runtime::evictor_context ctx;
            ctx.num_layers = shape.num_layers;
            ctx.num_q_heads = shape.num_q_heads;
            ctx.rotary = rope.get();
            ev.emplace(kvc::runtime::make_evictor(st, ctx));
            // Queries the engine remembers per layer: the policy's window, or the whole prompt.
            window = ev->window < 0 ? opt.max_tokens : ev->window;
        }
    }
    std::optional<kvc::evict::compressor<kvc::evict::any_scorer>> comp;
    if (ev) comp.emplace(ev->compressor());
    f.query_window = window;
    f.create = [shape, opt, storage, comp, ev, rope]() -> std::unique_ptr<kv_store> {
        auto s = std::make_unique<kvc_store>(shape, storage, opt.page_size, opt.max_tokens, opt.pool);
        if (comp) s->set_compressor(*comp, ev->observer);  // a fresh copy per sequence: decode counters start at 0
        if (ev && ev->cake) s->set_cake(*ev);
        s->keep_alive(rope);  // scorers point at it (leverage un-rotates keys)
        return s;
    };
    if (comp) {
        auto run = [](session& s, kvc_store::phase ph) {
            auto* k = static_cast<kvc_store*>(s.kv.get());
            k->compress(ph, [&](int layer) {
                kvc::evict::query_window w;
                const matrix& q = s.recent_q.at(static_cast<std::size_t>(layer));
                w.q = q.data();
                w.n = static_cast<int32_t>(q.rows());
                w.num_q_heads = static_cast<int32_t>(q.cols()) / k->cache().config().head_dim;
                w.head_dim = k->cache().config().head_dim;
                return w;
            });
        };
        f.after_prefill = [run](session& s) { run(s, kvc_store::phase::prefill); };
        f.after_chunk = [run](session& s) { run(s, kvc_store::phase::chunk); };
        f.after_decode = [run](session& s) { run(s, kvc_store::phase::decode); };
    }
    return f;
}

}  // namespace llama
