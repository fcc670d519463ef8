// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// The run-time cache whose tokens carry log-weights (merge::basic_merged_cache: fp16 or fp32
/// pages, or int8, int4 and KIVI-2/4 codes),
/// for the merging stages of a spec (runtime/merge_registry.hpp): `make_merged_cache` builds one
/// with the calling TU's kernels; `make_merged_cache_for_cpu` with the best ISA configuration of
/// the program this CPU runs that called `register_merged_storage()` (docs/isa.md). A program
/// built for the baseline (SSE2) runs D2O or KVMerger decode at AVX2 speed by compiling one more
/// TU with AVX2 flags that includes this header and calls register_merged_storage()
/// (kvc_add_isa_variants(... HEADERS kvc/runtime/merged_storage.hpp) writes it). The merging
/// stage reaches the cache through any_cache::apply_merge (the cache applies the policy to its
/// own store type), so it may come from any configuration.

#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/merged_attention.hpp>
#include <kvc/cpu/merged_quant_attention.hpp>
#include <kvc/cpu/prefill_attention.hpp>
#include <kvc/error.hpp>
#include <kvc/isa.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/isa_dispatch.hpp>
#include <kvc/runtime/merge_policy.hpp>
#include <kvc/runtime/quant_storages.hpp>  // quant_config, read_extras: the quantized storages' arguments
#include <kvc/runtime/spec.hpp>
#include <kvc/store/merged_cache.hpp>
#include <kvc/store/quant_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {

// ---- per ISA (docs/isa.md): the cache runs this TU's merged kernels ----
KVC_BEGIN_ISA_NAMESPACE

/// any_cache over a merge::basic_merged_cache<Store>: decode attention adds each token's
/// log-weight to its logit (kvc/cpu/merged_attention.hpp for fp16/fp32 pages,
/// kvc/cpu/merged_quant_attention.hpp for codes; Fast: the quantized kernel's integer paths,
/// cpu::quant_attention_options::fast()). Until a merge, every log-weight is 0 and it attends as
/// its store does. Prefill attention: over fp pages cpu::merged_prefill_attention; over codes
/// cpu::prefill_attention's blocked kernel on the decoded rows, each logit raised by its token's
/// log-weight (exact float math, as the quant storages' prefill; Fast applies to decode only).
/// Threads: merged_cache's contract (docs/threading.md).
template <class Store, bool Fast = false>
class merged_cache_adapter final : public any_cache {
  using cache_type = merge::basic_merged_cache<Store>;
  static constexpr bool encoded = cache_type::encoded;

 public:
  /// name, then the store's constructor arguments (a cache_config; a quant_cache_config and codecs).
  template <class... Args>
  explicit merged_cache_adapter(std::string name, Args&&... args)
      : name_(std::move(name)), c_(std::forward<Args>(args)...) {}

  cache_type& get() noexcept { return c_; }
  const cache_type& get() const noexcept { return c_; }

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
    if constexpr (encoded)
      kvc::cpu::merged_decode_attention(c_, s, layer, q, num_q_heads, out, opt,
                                        Fast ? kvc::cpu::quant_attention_options::fast() : kvc::cpu::quant_attention_options{});
    else kvc::cpu::merged_decode_attention(c_, s, layer, q, num_q_heads, out, opt);
  }
  bool has_prefill_attention() const override { return true; }
  std::int32_t chunk_tokens(seq_id s, std::int32_t layer, std::int32_t limit) const override {
    return c_.cache().chunk_tokens(s, layer, limit);
  }
  void prefill_attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_queries,
                         const std::int32_t* q_positions, std::int32_t num_q_heads, float* out,
                         const decode_options& opt) const override {
    if constexpr (encoded) kvc::cpu::prefill_attention(c_, s, layer, q, num_queries, q_positions, num_q_heads, out, opt);
    else kvc::cpu::merged_prefill_attention(c_, s, layer, q, num_queries, q_positions, num_q_heads, out, opt);
  }
  std::size_t bytes_in_use() const override { return c_.bytes_in_use(); }
  std::size_t bytes_in_use(std::int32_t layer) const override { return c_.bytes_in_use(layer); }
  memory_traffic traffic() const override { return c_.cache().traffic(); }
  merge::merged_cache<half>* merged_fp16() noexcept override {
    if constexpr (std::is_same<Store, kv_cache<half>>::value) return &c_;
    else return nullptr;
  }
  merge::merged_cache<float>* merged_fp32() noexcept override {
    if constexpr (std::is_same<Store, kv_cache<float>>::value) return &c_;
    else return nullptr;
  }
  bool holds_log_weights() const noexcept override { return true; }
  const std::vector<float>* log_weights(seq_id s, std::int32_t layer, std::int32_t head) const override {
    return &c_.log_weights(s, layer, head);
  }
  void apply_merge(const merge_policy& p, merge::d2o_threshold* tau, seq_id s, std::int32_t layer,
                   const std::vector<std::vector<float>>& scores,
                   const std::vector<std::vector<std::int32_t>>& kept) override {
    apply_merge_policy(c_, p, tau, s, layer, scores, kept);
  }
  std::size_t metadata_bytes() const override { return c_.metadata_bytes(); }
  std::int64_t tokens_held() const override { return c_.cache().tokens_held(); }

 private:
  std::string name_;
  cache_type c_;
};

/// A merged cache over codes KQ/VQ, from a storage stage's extras (sinks=, fast=).
template <class KQ, class VQ>
std::unique_ptr<any_cache> make_merged_quant(const spec_stage& st, const cache_config& cfg, const runtime::detail::quant_extras& x,
                                             KQ kq = KQ{}, VQ vq = VQ{}) {
  if (x.fast)
    return std::make_unique<merged_cache_adapter<quant_cache<KQ, VQ>, true>>(st.text, runtime::detail::quant_config<KQ, VQ>(cfg, x), kq, vq);
  return std::make_unique<merged_cache_adapter<quant_cache<KQ, VQ>>>(st.text, runtime::detail::quant_config<KQ, VQ>(cfg, x), kq, vq);
}

/// A cache that can hold merged tokens, from a storage spec: fp16 (the default), fp32, or codes:
/// int8 | int4 (sinks=N, fast=0|1) and kivi(bits=2|4, residual=128, sinks=N). The merge reads
/// members decoded and writes the merged row encoded again (merge::basic_merged_cache).
/// pre_rope=1 is refused (the caller's RoPE is not passed here); other codecs are not offered
/// (each is one more instantiation of the quantized kernel in every TU that builds merged caches).
inline std::unique_ptr<any_cache> make_merged_cache(const std::string& storage, const cache_config& cfg) {
  constexpr const char* who = "kvc::runtime::make_merged_cache";
  if (storage == "fp16" || storage == "full") return std::make_unique<merged_cache_adapter<kv_cache<half>>>("fp16", cfg);
  if (storage == "fp32") return std::make_unique<merged_cache_adapter<kv_cache<float>>>("fp32", cfg);
  const std::vector<spec_stage> stages = parse_spec(storage);
  const spec_stage& st = stages.at(0);
  KVC_EXPECTS_IN(who, stages.size() == 1 && (st.name == "int8" || st.name == "int4" || st.name == "kivi"), "storage '",
                 storage, "' cannot hold merged tokens; expected fp16, fp32, int8, int4 or kivi(bits=2|4)");
  spec_args a(st, who);
  if (st.name == "kivi") {
    const int bits = a.integer("bits", 2);
    const int res = a.integer("residual", 128);
    const runtime::detail::quant_extras x = runtime::detail::read_extras(a, storage_options{});
    a.finish("bits, residual, sinks");
    KVC_EXPECTS_IN(who, bits == 2 || bits == 4, "'", st.text, "': bits = ", bits,
                   ", expected 2 or 4 (the kivi widths merged caches offer)");
    KVC_EXPECTS_IN(who, res >= 0 && res % 32 == 0, "'", st.text, "': residual = ", res,
                   ", expected a multiple of 32 tokens >= 0 (whole KIVI key groups)");
    if (bits == 2) return make_merged_quant<quant::kivi<2>, quant::kivi<2>>(st, cfg, x, quant::kivi<2>(res), quant::kivi<2>(res));
    return make_merged_quant<quant::kivi<4>, quant::kivi<4>>(st, cfg, x, quant::kivi<4>(res), quant::kivi<4>(res));
  }
  const int bits = st.name == "int8" ? 8 : 4;
  const runtime::detail::quant_extras x = runtime::detail::read_extras(a, storage_options{}, bits);
  a.finish("sinks, fast");
  runtime::detail::check_fast(st, x, bits, cfg);
  if (bits == 8) return make_merged_quant<quant::int8, quant::int8>(st, cfg, x);
  return make_merged_quant<quant::int4, quant::int4>(st, cfg, x);
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
