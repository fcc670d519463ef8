// SPDX-License-Identifier: Apache-2.0
/// \file stores.hpp
/// Turns a cache spec into a KV store plus the compression hooks the engine calls between
/// forward passes. Specs use kvc's runtime grammar (kvc/runtime/spec.hpp):
///   "dense"                         the engine's own float arrays (kv_backend.hpp), the reference
///   "full" | "fp16" | "bf16" | "fp32" | any storage kvc::runtime registers (quantized ones too)
///   EVICTOR(ratio=R | tokens=N, ...) [+ STORAGE]
///       e.g. "snapkv(ratio=0.75)", "streaming_llm(tokens=256)+fp32", "h2o(ratio=0.5,recent=32)"
///   EVICTOR(...) + MERGE(...) [+ STORAGE]     merging instead of dropping (fp16 or fp32 storage)
///       e.g. "snapkv(ratio=0.5)+d2o", "snapkv(ratio=0.75)+cam(span=32)", "snapkv(ratio=0.5)+kvmerger(eps=0.75)"
/// ratio is kvpress's compression ratio (the fraction evicted); tokens is a per-stream count.
/// Storage defaults to fp16. Evictors and their parameters come from kvc's registry
/// (kvc/runtime/evictor_registry.hpp); merging policies from kvc/runtime/merge_registry.hpp;
/// storages from the engine's registrations (registry.hpp: kvc/runtime/quant_storages.hpp and the
/// other storage headers). Declarations only: the definitions live in stores.cpp and the registry
/// TUs (registry.hpp), the only translation units that include kvc's runtime registries. An
/// engine should do the same: hide kvc's runtime behind a few .cpp files, not in a header every
/// file includes.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <kvc/parallel/thread_pool.hpp>

#include "kv_backend.hpp"
#include "model.hpp"

namespace llama {

/// Engine-wide settings for building kvc stores.
struct store_options {
    int page_size = 16;
    int max_tokens = 8192;
    kvc::thread_pool* pool = nullptr;  ///< threads for decode attention; null = serial
    /// The model's W_k and W_v per layer (attach_weights), for storages that factor them (palu).
    int weights_in = 0;
    std::vector<const float*> wk, wv;
};

/// Points `opt` at the model's key and value projections (palu reads them when a store is built).
void attach_weights(store_options& opt, const model& m);

/// What the engine needs to run a sequence under one cache configuration.
struct store_factory {
    std::string spec;
    int query_window = 0;  ///< rotated queries the engine must remember for the policy
    std::function<std::unique_ptr<kv_store>()> create;
    std::function<void(session&)> after_prefill = [](session&) {};  ///< one-shot, after the prompt
    std::function<void(session&)> after_chunk = [](session&) {};    ///< chunked prefill / streaming
    std::function<void(session&)> after_decode = [](session&) {};   ///< after each decode step
};

/// The names of kvc's storages and evictors, one line each, for --help.
std::vector<std::string> available_stores();

/// Turns a spec into a store factory and compression hooks; throws std::invalid_argument naming
/// the stage it cannot use.
store_factory parse_store(const std::string& spec, const kv_shape& shape, const store_options& opt = {});

/// Every eviction policy kvc's registry knows, by name.
std::vector<std::string> evictor_names();

/// How many of positions [lo, hi) stream (layer, head) still holds; -1 when the store is not kvc's.
int kept_in_range(const kv_store& store, int layer, int head, std::int32_t lo, std::int32_t hi);

/// The original positions stream (layer, head) still holds, in stream order (ascending unless a
/// policy re-rotated keys); nullopt when the store is not kvc's. One call per stream, linear in
/// its length (kept_in_range per position was quadratic).
std::optional<std::vector<std::int32_t>> kept_positions(const kv_store& store, int layer, int head);

/// Every stream's kept positions as one line of JSON:
///   {"spec": SPEC, EXTRA "layers": L, "kv_heads": H, "positions": [[[p, ...], ...head], ...layer]}
/// `extra` is inserted verbatim (e.g. `"window": 0, `); throws std::invalid_argument when the
/// store is not kvc's (the dense reference keeps every token and tracks no positions).
std::string kept_positions_json(const kv_store& store, const std::string& spec, const kv_shape& shape,
                                const std::string& extra = "");

}  // namespace llama
