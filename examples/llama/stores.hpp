// SPDX-License-Identifier: Apache-2.0
/// \file stores.hpp
/// Turns a cache spec into a KV store plus the compression hooks the engine calls between
/// forward passes. Specs use kvc's runtime grammar (kvc/runtime/spec.hpp):
///   "dense"                         the engine's own float arrays (kv_backend.hpp), the reference
///   "full" | "fp16" | "bf16" | "fp32" | any storage kvc::runtime registers (quantized ones too)
///   EVICTOR(ratio=R | tokens=N, ...) [+ STORAGE]
///       e.g. "snapkv(ratio=0.75)", "streaming_llm(tokens=256)+fp32", "h2o(ratio=0.5,recent=32)"
/// ratio is kvpress's compression ratio (the fraction evicted); tokens is a per-stream count.
/// Storage defaults to fp16. Adding an evictor is one line in `evictor_registry()`.
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

using evictor_builder = std::function<kvc::evict::any_scorer(kvc::runtime::spec_args&)>;

/// Evictors by spec name. Each line reads the policy's own arguments (budget arguments are
/// read by parse_store). Scorers needing observations the engine does not produce yet
/// (expected_attention's query statistics) are not listed.
inline const std::map<std::string, evictor_builder>& evictor_registry() {
    namespace ev = kvc::evict;
    static const std::map<std::string, evictor_builder> r = {
        {"streaming_llm", [](auto& a) { ev::streaming_llm_params p; p.sinks = a.integer("sinks", p.sinks); return ev::any_scorer(ev::streaming_llm(p)); }},
        {"snapkv", [](auto& a) { ev::snapkv_params p; p.window = a.integer("window", p.window); p.kernel = a.integer("kernel", p.kernel); p.sinks = a.integer("sinks", p.sinks); return ev::any_scorer(ev::snapkv(p)); }},
        {"pyramidkv", [](auto& a) { ev::pyramidkv_params p; p.window = a.integer("window", p.window); p.kernel = a.integer("kernel", p.kernel); p.beta = a.integer("beta", p.beta); p.sinks = a.integer("sinks", p.sinks); return ev::any_scorer(ev::pyramidkv(p)); }},
        {"knorm", [](auto& a) { ev::knorm_params p; p.protect.sinks = a.integer("sinks", p.protect.sinks); return ev::any_scorer(ev::knorm(p)); }},
        {"keydiff", [](auto& a) { ev::keydiff_params p; p.protect.sinks = a.integer("sinks", p.protect.sinks); return ev::any_scorer(ev::keydiff(p)); }},
        {"random", [](auto& a) { ev::random_params p; p.seed = static_cast<uint64_t>(a.integer("seed", 0)); return ev::any_scorer(ev::random(p)); }},
        {"h2o", [](auto& a) { ev::h2o_params p; p.recent = a.integer("recent", p.recent); p.sinks = a.integer("sinks", p.sinks); return ev::any_scorer(ev::h2o(p)); }},
        {"tova", [](auto& a) { ev::tova_params p; p.sinks = a.integer("sinks", p.sinks); return ev::any_scorer(ev::tova(p)); }},
        {"scissorhands", [](auto& a) { ev::scissorhands_params p; p.history = a.integer("history", p.history); p.recent = a.integer("recent", p.recent); p.sinks = a.integer("sinks", p.sinks); return ev::any_scorer(ev::scissorhands(p)); }},
        {"lagkv", [](auto& a) { ev::lagkv_params p; p.sinks = a.integer("sinks", p.sinks); p.lag = a.integer("lag", p.lag); return ev::any_scorer(ev::lagkv(p)); }},
    };
    return r;
}

inline std::vector<std::string> available_stores() {
    register_quantized_storages();
    std::vector<std::string> v{"dense", "full (= fp16)"};
    for (const auto& kv : kvc::runtime::storage_registry()) v.push_back(kv.first + "    (storage)");
    for (const auto& kv : evictor_registry()) v.push_back(kv.first + "(ratio=R|tokens=N,...)[+STORAGE]    (evictor)");
    return v;
}

inline store_factory parse_store(const std::string& spec, const kv_shape& shape, const store_options& opt = {}) {
    register_quantized_storages();
    store_factory f;
    f.spec = spec;
    if (spec == "dense") {
        f.create = [shape] { return std::make_unique<dense_kv>(shape); };
        return f;
    }
    std::string storage = "fp16";
    std::optional<kvc::evict::compressor<kvc::evict::any_scorer>> comp;
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
            auto it = evictor_registry().find(st.name);
            if (it == evictor_registry().end()) {
                std::string known;
                for (const auto& kv : evictor_registry()) known += ", " + kv.first;
                throw std::invalid_argument("cache spec '" + spec + "': '" + st.name + "' is neither a kvc storage (" +
                                            kvc::runtime::known_storages() + ") nor an evictor this engine runs (" +
                                            known.substr(2) + ")");
            }
            if (comp) throw std::invalid_argument("cache spec '" + spec + "': more than one evictor");
            kvc::runtime::spec_args a(st);
            kvc::evict::compressor_options co;
            if (a.has("tokens")) co.target = kvc::budget::tokens(a.integer("tokens"));
            else co.target = kvc::budget::ratio(a.number("ratio"));
            co.num_q_heads = shape.num_q_heads;
            kvc::evict::any_scorer sc = it->second(a);
            a.finish("ratio, tokens and the policy's own parameters");
            if (sc.what() == kvc::evict::observes::query_window) window = st.find("window") ? static_cast<int>(st.find("window")->value.number) : 64;
            comp.emplace(sc, co);
        }
    }
    f.query_window = window;
    f.create = [shape, opt, storage, comp]() -> std::unique_ptr<kv_store> {
        auto s = std::make_unique<kvc_store>(shape, storage, opt.page_size, opt.max_tokens, opt.pool);
        if (comp) s->set_compressor(*comp);  // a fresh copy per sequence: decode counters start at 0
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
