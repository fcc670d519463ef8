// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// The run-time cache whose tokens carry log-weights (merge::merged_cache, fp16 or fp32 pages),
/// for the merging stages of a spec (runtime/merge_registry.hpp): `make_merged_cache` builds one
/// with the calling TU's kernels; `make_merged_cache_for_cpu` with the best ISA configuration of
/// the program this CPU runs that called `register_merged_storage()` (docs/isa.md). A program
/// built for the baseline (SSE2) runs D2O or KVMerger decode at AVX2 speed by compiling one more
/// TU with AVX2 flags that includes this header and calls register_merged_storage()
/// (kvc_add_isa_variants(... HEADERS kvc/runtime/merged_storage.hpp) writes it). The merging
/// stage reaches the cache through any_cache::merged_fp16/fp32, so it may come from any
/// configuration.

#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/merged_attention.hpp>
#include <kvc/error.hpp>
#include <kvc/isa.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/isa_dispatch.hpp>
#include <kvc/store/merged_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {

// ---- per ISA (docs/isa.md): the cache runs this TU's merged kernels ----
KVC_BEGIN_ISA_NAMESPACE

/// any_cache over a merge::merged_cache<T>: decode and prefill attention add each token's
/// log-weight to its logit (kvc/cpu/merged_attention.hpp). Until a merge, every log-weight is
/// 0 and it attends as kv_cache<T> does.
/// Threads: merged_cache's contract (docs/threading.md).
template <class T>
class merged_cache_adapter final : public any_cache {
 public:
  merged_cache_adapter(std::string name, const cache_config& cfg) : name_(std::move(name)), c_(cfg) {}

  merge::merged_cache<T>& get() noexcept { return c_; }
  const merge::merged_cache<T>& get() const noexcept { return c_; }

  const cache_config& config() const override { return c_.config(); }
  std::string name() const override { return name_; }
  const char* isa() const override { return KVC_ISA_STR(KVC_ISA_NAMESPACE); }
  seq_id add_sequence() override { return c_.add_sequence(); }
  void remove_sequence(seq_id s) override { c_.remove_sequence(s); }
  bool contains(seq_id s) const override { return c_.contains(s); }
  seq_id fork(seq_id s) override { return c_.fork(s); }
  void share_layer(seq_id s, std::int32_t layer, std::int32_t from) override { c_.share_layer(s, layer, from); }
  bool can_share_layers() const override { return true; }
  void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions) override {
    c_.append(s, layer, k, v, n, positions);
  }
  void keep(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n) override {
    KVC_EXPECTS_IN("kvc::runtime::merged_cache_adapter::keep", head >= 0 && head < config().num_kv_heads,
                   "head = ", head, ", expected 0..", config().num_kv_heads - 1);
    KVC_EXPECTS_IN("kvc::runtime::merged_cache_adapter::keep", n >= 0 && (n == 0 || kept != nullptr), "n = ", n,
                   " with kept ", kept ? "set" : "null", ", expected n >= 0 indices");
    // One head through keep_layer: the other heads keep every token.
    std::vector<std::vector<std::int32_t>> all(static_cast<std::size_t>(config().num_kv_heads));
    for (std::int32_t h = 0; h < config().num_kv_heads; ++h) {
      auto& v = all[static_cast<std::size_t>(h)];
      if (h == head) v.assign(kept, kept + n);
      else
        for (std::int32_t t = 0; t < c_.length(s, layer, h); ++t) v.push_back(t);
    }
    c_.keep_layer(s, layer, all);
  }
  void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) override {
    c_.keep_layer(s, layer, kept);
  }
  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const override { return c_.length(s, layer, head); }
  const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const override {
    return c_.cache().positions(s, layer, head);
  }
  std::int32_t seen(seq_id s, std::int32_t layer) const override { return c_.cache().seen(s, layer); }
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out) const override {
    c_.cache().gather(s, layer, head, k_out, v_out);
  }
  void attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                 const decode_options& opt) const override {
    kvc::cpu::merged_decode_attention(c_, s, layer, q, num_q_heads, out, opt);
  }
  bool has_prefill_attention() const override { return true; }
  std::int32_t chunk_tokens(seq_id s, std::int32_t layer, std::int32_t limit) const override {
    return c_.cache().chunk_tokens(s, layer, limit);
  }
  void prefill_attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_queries,
                         const std::int32_t* q_positions, std::int32_t num_q_heads, float* out,
                         const decode_options& opt) const override {
    kvc::cpu::merged_prefill_attention(c_, s, layer, q, num_queries, q_positions, num_q_heads, out, opt);
  }
  std::size_t bytes_in_use() const override { return c_.bytes_in_use(); }
  std::size_t bytes_in_use(std::int32_t layer) const override { return c_.bytes_in_use(layer); }
  memory_traffic traffic() const override { return c_.cache().traffic(); }
  merge::merged_cache<half>* merged_fp16() noexcept override {
    if constexpr (std::is_same<T, half>::value) return &c_;
    else return nullptr;
  }
  merge::merged_cache<float>* merged_fp32() noexcept override {
    if constexpr (std::is_same<T, float>::value) return &c_;
    else return nullptr;
  }
  std::size_t metadata_bytes() const override { return c_.metadata_bytes(); }
  std::int64_t tokens_held() const override { return c_.cache().tokens_held(); }

 private:
  std::string name_;
  merge::merged_cache<T> c_;
};

/// A cache that can hold merged tokens, from a storage spec: fp16 (the default) or fp32. Other
/// storages (quantized codes) cannot take a weighted mean of rows in place yet.
inline std::unique_ptr<any_cache> make_merged_cache(const std::string& storage, const cache_config& cfg) {
  if (storage == "fp16" || storage == "full") return std::make_unique<merged_cache_adapter<half>>("fp16", cfg);
  if (storage == "fp32") return std::make_unique<merged_cache_adapter<float>>("fp32", cfg);
  kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_merged_cache: storage '", storage,
                                        "' cannot hold merged tokens; expected fp16 or fp32 (merge::merged_cache "
                                        "pages; merging over quantized storages is not implemented)"));
}

/// This configuration's make_merged_cache, for make_merged_cache_for_cpu: call it once, in a TU of
/// every ISA configuration that should offer merged caches (kvc's headers register nothing by
/// being included). Calling it again changes nothing.
inline void register_merged_storage() {
  isa_variant v{KVC_ISA_STR(KVC_ISA_NAMESPACE), KVC_ISA_RANK, &kvc::detail::isa_runs_here, nullptr, nullptr};
  v.make_merged = &make_merged_cache;
  add_isa_variant(v);
}

KVC_END_ISA_NAMESPACE

/// make_merged_cache with the best ISA configuration of the program this CPU runs that called
/// register_merged_storage() (or the configuration `isa` or the environment variable KVC_ISA
/// names, e.g. "isa_sse2" to force the fallback). The cache's isa() says which one runs it.
inline std::unique_ptr<any_cache> make_merged_cache_for_cpu(const std::string& storage, const cache_config& cfg,
                                                            const char* isa = nullptr) {
  return detail::choose_isa_variant(
             "kvc::runtime::make_merged_cache_for_cpu", isa, [](const isa_variant& e) { return e.make_merged != nullptr; },
             "the merged cache", "a call to kvc::runtime::register_merged_storage() in a TU of that configuration",
             "a call to kvc::runtime::register_merged_storage() in a TU of this program")
      .make_merged(storage, cfg);
}

}  // namespace runtime
KVC_END_NAMESPACE
