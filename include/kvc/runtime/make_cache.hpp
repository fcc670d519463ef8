// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Builds a cache from a storage spec: `fp32`, `fp16`, `bf16` (full-precision pages), or a
/// quantizer spec such as `kivi(bits=2,group=32,residual=128)` when <kvc/quant/...> is available.
///
/// The storage registry and make_cache live in the ISA namespace (docs/isa.md): the builders make
/// caches that run the CPU kernels of the TU's instruction set. A program whose TUs are built with
/// different -m flags has one registry per ISA configuration; a storage registered (by including
/// runtime/quant_storages.hpp, or with storage_registry()[name] = ...) is visible to make_cache
/// calls from TUs of the same configuration, and make_cache builds the caller's ISA's caches.

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <kvc/attention/rope.hpp>
#include <kvc/error.hpp>
#include <kvc/isa.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/isa_dispatch.hpp>
#include <kvc/runtime/spec.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/types.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {

/// The model's key and value projection weights, per layer: W_k and W_v as [num_kv_heads ·
/// head_dim][in] row-major floats, k = W_k x before RoPE (kvc/lowrank/palu.hpp). Borrowed: read
/// while the cache is built, not kept.
struct projection_weights {
  std::int32_t in = 0;              ///< columns: the width of the projections' input
  std::vector<const float*> wk, wv; ///< [num_layers]
};

/// What a storage may need from the model beyond the cache's shape.
struct storage_options {
  /// The model's RoPE. Storages that keep keys before RoPE (`pre_rope=1`, KVQuant) need it to
  /// rotate keys on the fly; the caller then appends un-rotated keys (any_cache::pre_rope_keys()).
  const rope_config* rope = nullptr;
  /// The model's W_k and W_v, for storages whose bases come from the weights (`palu`).
  const projection_weights* weights = nullptr;
};

using cache_builder =
    std::function<std::unique_ptr<any_cache>(const spec_stage&, const cache_config&, const storage_options&)>;

// ---- per ISA (docs/isa.md): the builders make caches that run this TU's kernels ----
KVC_BEGIN_ISA_NAMESPACE

/// Storage builders by name; quantized storages register themselves here (runtime/quant_storages.hpp).
/// One registry per ISA configuration of the program (the TUs built with the same -m flags share it).
/// Threads: lookups are concurrent; registering is a write, done before other threads use it (docs/threading.md).
inline std::map<std::string, cache_builder>& storage_registry() {
  static std::map<std::string, cache_builder> r = [] {
    std::map<std::string, cache_builder> m;
    auto plain = [](auto tag) {
      using T = decltype(tag);
      return [](const spec_stage& st, const cache_config& cfg, const storage_options&) -> std::unique_ptr<any_cache> {
        spec_args(st, "kvc::runtime::make_cache").finish("(none): fp32, fp16 and bf16 take no arguments");
        return std::make_unique<cache_adapter<kv_cache<T>>>(type_name<T>(), cfg);
      };
    };
    m["fp32"] = plain(float{});
    m["fp16"] = plain(half{});
    m["bf16"] = plain(bfloat16{});
    return m;
  }();
  return r;
}

inline std::string known_storages() {
  std::string s;
  for (const auto& kv : storage_registry()) s += (s.empty() ? "" : ", ") + kv.first;
  return s;
}

KVC_END_ISA_NAMESPACE

namespace detail {

/// The storages that live in optional headers, and the header that registers each: a TU that
/// names one without including its header gets a message saying what to include, not "unknown".
inline const char* storage_header(const std::string& name) {
  static const char* const quant[] = {"int8", "int4", "int2", "fp8", "kivi", "rotated", "outliers", "gear"};
  for (const char* q : quant)
    if (name == q) return "<kvc/runtime/quant_storages.hpp>";
  if (name == "mikv") return "<kvc/runtime/mikv_storage.hpp>";
  if (name == "pca" || name == "think" || name == "palu") return "<kvc/runtime/lowrank_storages.hpp>";
  if (name == "xkv") return "<kvc/runtime/xkv_storage.hpp>";
  if (name == "minicache") return "<kvc/runtime/minicache_storage.hpp>";
  if (name == "layers") return "<kvc/runtime/layered_storage.hpp>";
  if (name == "quest") return "<kvc/runtime/quest_storage.hpp>";
  return nullptr;
}

KVC_BEGIN_ISA_NAMESPACE  // it reads this ISA's registry

[[noreturn]] inline void unknown_storage(const spec_stage& st) {
  if (const char* header = storage_header(st.name))
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: storage '", st.name, "' (in \"", st.text,
                                          "\") is not registered in this program; expected #include ", header,
                                          " in a translation unit of the program (it registers the storage); "
                                          "registered now: ", known_storages()));
  std::vector<std::string> names;
  for (const auto& kv : storage_registry()) names.push_back(kv.first);
  const std::string hint = closest(st.name, names);
  kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: unknown storage '", st.name, "' in \"", st.text,
                                        "\"", hint.empty() ? "" : "; did you mean '", hint, hint.empty() ? "" : "'?",
                                        "; expected one of: ", known_storages()));
}

KVC_END_ISA_NAMESPACE
}  // namespace detail

KVC_BEGIN_ISA_NAMESPACE

/// Whether `name` is a storage (as opposed to an eviction policy) in a spec.
inline bool is_storage(const std::string& name) { return storage_registry().count(name) != 0; }

/// The cache a storage stage describes.
inline std::unique_ptr<any_cache> make_cache(const spec_stage& st, const cache_config& cfg,
                                             const storage_options& opt = {}) {
  auto it = storage_registry().find(st.name);
  if (it == storage_registry().end()) detail::unknown_storage(st);
  return it->second(st, cfg, opt);
}

inline std::unique_ptr<any_cache> make_cache(const std::string& spec, const cache_config& cfg,
                                             const storage_options& opt = {}) {
  const auto stages = parse_spec(spec);
  KVC_EXPECTS(stages.size() == 1, "spec = \"", spec, "\", expected exactly one storage stage");
  return make_cache(stages[0], cfg, opt);
}

/// This configuration's entry for make_cache_for_cpu (runtime/isa_dispatch.hpp): one per program
/// and ISA configuration, registered before main.
inline const bool isa_variant_registered = add_isa_variant(
    {KVC_ISA_STR(KVC_ISA_NAMESPACE), KVC_ISA_RANK, &kvc::detail::isa_runs_here, &is_storage,
     static_cast<std::unique_ptr<any_cache> (*)(const spec_stage&, const cache_config&, const storage_options&)>(
         &make_cache)});

KVC_END_ISA_NAMESPACE

/// make_cache with the best ISA configuration of the program this CPU runs, one that registered
/// the stage's storage (or the configuration `isa` or the environment variable KVC_ISA names,
/// e.g. "isa_sse2" to force the fallback): runtime/isa_dispatch.hpp, docs/isa.md. The cache's
/// isa() says which one runs it.
inline std::unique_ptr<any_cache> make_cache_for_cpu(const spec_stage& st, const cache_config& cfg,
                                                     const storage_options& opt = {}, const char* isa = nullptr) {
  return choose_isa_variant(st.name, isa).make(st, cfg, opt);
}

inline std::unique_ptr<any_cache> make_cache_for_cpu(const std::string& spec, const cache_config& cfg,
                                                     const storage_options& opt = {}, const char* isa = nullptr) {
  const auto stages = parse_spec(spec);
  KVC_EXPECTS_IN("kvc::runtime::make_cache_for_cpu", stages.size() == 1, "spec = \"", spec,
                 "\", expected exactly one storage stage");
  return make_cache_for_cpu(stages[0], cfg, opt, isa);
}
}  // namespace runtime
KVC_END_NAMESPACE
