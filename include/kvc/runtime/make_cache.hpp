// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Builds a cache from a storage spec: `fp32`, `fp16`, `bf16` (full-precision pages), or a
/// quantizer spec such as `kivi(bits=2,group=32,residual=128)` when <kvc/quant/...> is available.
///
/// The storage registry and make_cache live in the ISA namespace (docs/isa.md): the builders make
/// caches that run the CPU kernels of the TU's instruction set. A program whose TUs are built with
/// different -m flags has one registry per ISA configuration; a storage registered (by
/// kvc::runtime::register_quant_storages() of runtime/quant_storages.hpp and the like, or with
/// storage_registry()[name] = ...) is visible to make_cache calls from TUs of the same
/// configuration, and make_cache builds the caller's ISA's caches. No header registers a storage
/// by being included: the registration calls are where a program pays for the caches it offers.

#include <algorithm>
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
namespace detail {
KVC_BEGIN_ISA_NAMESPACE
/// The registry's map as the register calls write it, without the built-in fp storages: a TU
/// that only registers (runtime/quant_storages.hpp's register_int8_storage(), ...) does not
/// compile the fp caches' kernels, 16 s of GCC 12 -O2 for a TU that only calls storage_registry()
/// (2026-12-06). storage_registry() adds them where it is called.
inline std::map<std::string, cache_builder>& registered_storages() {
  static std::map<std::string, cache_builder> m;
  return m;
}
KVC_END_ISA_NAMESPACE
/// The built-in storages, which storage_registry() adds: names readers may list without building.
inline constexpr const char* builtin_storages[] = {"bf16", "fp16", "fp32"};
inline bool is_builtin_storage(const std::string& name) {
  for (const char* b : builtin_storages)
    if (name == b) return true;
  return false;
}
}  // namespace detail

KVC_BEGIN_ISA_NAMESPACE

/// Storage builders by name: fp32, fp16 and bf16, and what register_quant_storages()
/// (runtime/quant_storages.hpp) and the like add. One registry per ISA configuration of the
/// program (the TUs built with the same -m flags share it).
/// Threads: lookups are concurrent; registering is a write, done before other threads use it (docs/threading.md).
inline std::map<std::string, cache_builder>& storage_registry() {
  static const bool builtins = [] {
    auto plain = [](auto tag) {
      using T = decltype(tag);
      return [](const spec_stage& st, const cache_config& cfg, const storage_options&) -> std::unique_ptr<any_cache> {
        spec_args(st, "kvc::runtime::make_cache").finish("(none): fp32, fp16 and bf16 take no arguments");
        return std::make_unique<cache_adapter<kv_cache<T>>>(type_name<T>(), cfg);
      };
    };
    auto& m = detail::registered_storages();
    m.emplace("fp32", plain(float{}));
    m.emplace("fp16", plain(half{}));
    m.emplace("bf16", plain(bfloat16{}));
    return true;
  }();
  (void)builtins;
  return detail::registered_storages();
}

/// Every storage name of this configuration, sorted: the registered ones and fp32, fp16, bf16.
/// Reads the names only, so it compiles no cache (see detail::registered_storages).
inline std::vector<std::string> storage_names() {
  std::vector<std::string> v;
  for (const auto& kv : detail::registered_storages()) v.push_back(kv.first);
  for (const char* b : detail::builtin_storages)
    if (!detail::registered_storages().count(b)) v.emplace_back(b);
  std::sort(v.begin(), v.end());
  return v;
}

inline std::string known_storages() {
  std::string s;
  for (const std::string& n : storage_names()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

KVC_END_ISA_NAMESPACE

namespace detail {

/// The storages that live in optional headers, the header of each and the call that registers it:
/// a program that names one without registering it gets a message saying what to call, not
/// "unknown". Returns the header's file name without ".hpp" (the call is register_<it>()), or null.
inline const char* storage_header(const std::string& name) {
  static const char* const quant[] = {"int8", "int4", "int2", "fp8", "kivi", "nuq", "rotated", "outliers", "gear"};
  for (const char* q : quant)
    if (name == q) return "quant_storages";
  if (name == "mikv") return "mikv_storage";
  if (name == "pca" || name == "think" || name == "palu") return "lowrank_storages";
  if (name == "xkv") return "xkv_storage";
  if (name == "minicache") return "minicache_storage";
  if (name == "layers") return "layered_storage";
  if (name == "quest") return "quest_storage";
  return nullptr;
}

KVC_BEGIN_ISA_NAMESPACE  // it reads this ISA's registry

[[noreturn]] inline void unknown_storage(const spec_stage& st) {
  if (const char* header = storage_header(st.name))
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: storage '", st.name, "' (in \"", st.text,
                                          "\") is not registered in this ISA configuration (", KVC_ISA_STR(KVC_ISA_NAMESPACE),
                                          "); expected a call to kvc::runtime::register_", header, "() from <kvc/runtime/",
                                          header, ".hpp> before make_cache, in a TU built with the same -m flags; "
                                          "registered now: ", known_storages()));
  const std::string hint = closest(st.name, storage_names());
  kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: unknown storage '", st.name, "' in \"", st.text,
                                        "\"", hint.empty() ? "" : "; did you mean '", hint, hint.empty() ? "" : "'?",
                                        "; expected one of: ", known_storages()));
}

/// make_cache for the parts a builder makes (the parts of `layers`, the coefficient rows of `pca`
/// and `xkv`). A builder runs inside make_cache, whose storage_registry() call added the built-in
/// storages, so this reads the map as it is: a TU that registers such a builder does not compile
/// the fp caches for it.
inline std::unique_ptr<any_cache> make_part(const spec_stage& st, const cache_config& cfg, const storage_options& opt = {}) {
  auto it = registered_storages().find(st.name);
  if (it == registered_storages().end()) unknown_storage(st);
  return it->second(st, cfg, opt);
}

inline std::unique_ptr<any_cache> make_part(const std::string& spec, const cache_config& cfg, const storage_options& opt = {}) {
  const auto stages = parse_spec(spec);
  KVC_EXPECTS_IN("kvc::runtime::make_cache", stages.size() == 1, "spec = \"", spec, "\", expected exactly one storage stage");
  return make_part(stages[0], cfg, opt);
}

KVC_END_ISA_NAMESPACE
}  // namespace detail

KVC_BEGIN_ISA_NAMESPACE

/// Whether `name` is a storage (as opposed to an eviction policy) in a spec.
inline bool is_storage(const std::string& name) {
  return detail::registered_storages().count(name) != 0 || detail::is_builtin_storage(name);
}

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
  return choose_isa_variant(st, isa).make(st, cfg, opt);
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
