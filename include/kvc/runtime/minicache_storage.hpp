// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// MiniCache as a run-time storage (kvc/merge/minicache.hpp): register_minicache_storage() registers
///
///   minicache(start=-1, t=0.6, gamma=0.05)    fp16 pages; start -1: num_layers / 2
///
/// with make_cache. The cache attends as fp16 until cross_layer_merge(cache, seq) merges every
/// pair of layers of the sequence (once, after its prompt); later tokens stay unmerged. It does
/// not compose with eviction (keep/keep_layer throw) and cannot fork.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <kvc/cpu/minicache_attention.hpp>
#include <kvc/error.hpp>
#include <kvc/isa.hpp>
#include <kvc/merge/minicache.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/spec.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {
KVC_BEGIN_ISA_NAMESPACE

/// any_cache over merge::minicache_cache<half>. positions() returns a buffer the adapter owns,
/// valid until the next positions() call (a merged layer's tokens come from two streams).
/// Threads: minicache_cache's contract; positions() writes the adapter (one caller at a time).
class minicache_adapter final : public any_cache {
 public:
  minicache_adapter(std::string name, const cache_config& cfg, const merge::minicache_options& o)
      : name_(std::move(name)), c_(cfg, o) {}

  merge::minicache_cache<half>& get() noexcept { return c_; }
  const merge::minicache_cache<half>& get() const noexcept { return c_; }

  const cache_config& config() const override { return c_.config(); }
  std::string name() const override { return name_; }
  const char* isa() const override { return KVC_ISA_STR(KVC_ISA_NAMESPACE); }
  seq_id add_sequence() override { return c_.add_sequence(); }
  void remove_sequence(seq_id s) override { c_.remove_sequence(s); }
  bool contains(seq_id s) const override { return c_.contains(s); }
  seq_id fork(seq_id) override { refuse("fork", "share pages between sequences"); }
  void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions) override {
    c_.append(s, layer, k, v, n, positions);
  }
  void keep(seq_id, std::int32_t, std::int32_t, const std::int32_t*, std::int32_t) override {
    refuse("keep", "evict (a pair's layers must hold the same tokens)");
  }
  void keep_layer(seq_id, std::int32_t, const std::vector<std::vector<std::int32_t>>&) override {
    refuse("keep_layer", "evict (a pair's layers must hold the same tokens)");
  }
  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const override { return c_.length(s, layer, head); }
  const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const override {
    pos_.assign(static_cast<std::size_t>(c_.length(s, layer, head)), 0);
    c_.positions(s, layer, head, pos_.data());
    return pos_.data();
  }
  std::int32_t seen(seq_id s, std::int32_t layer) const override { return c_.seen(s, layer); }
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out) const override {
    c_.gather(s, layer, head, k_out, v_out);
  }
  void attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                 const decode_options& opt) const override {
    kvc::cpu::minicache_decode_attention(c_, s, layer, q, num_q_heads, out, opt);
  }
  bool has_prefill_attention() const override { return true; }
  std::int32_t chunk_tokens(seq_id s, std::int32_t layer, std::int32_t limit) const override {
    return c_.cache().chunk_tokens(s, layer, limit);
  }
  void prefill_attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_queries,
                         const std::int32_t* q_positions, std::int32_t num_q_heads, float* out,
                         const decode_options& opt) const override {
    kvc::cpu::minicache_prefill_attention(c_, s, layer, q, num_queries, q_positions, num_q_heads, out, opt);
  }
  std::size_t bytes_in_use() const override { return c_.bytes_in_use(); }
  std::size_t bytes_in_use(std::int32_t layer) const override { return c_.bytes_in_use(layer); }
  memory_traffic traffic() const override { return c_.traffic(); }
  std::size_t metadata_bytes() const override { return c_.metadata_bytes(); }
  std::int64_t tokens_held() const override { return c_.tokens_held(); }
  bool merge_layers(seq_id s, merge::minicache_report* report) override {
    const merge::minicache_report r = c_.merge_pairs(s);
    if (report) *report = r;
    return true;
  }

 private:
  [[noreturn]] void refuse(const char* fn, const char* what) const {
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::minicache_adapter::", fn, ": storage '", name_,
                                          "' cannot ", what, "; expected a storage without cross-layer sharing"));
  }
  std::string name_;
  merge::minicache_cache<half> c_;
  mutable std::vector<std::int32_t> pos_;
};

KVC_END_ISA_NAMESPACE

/// Merges every layer pair of sequence s when `cache` is a MiniCache storage, of any ISA
/// configuration (once, after the prompt); returns false, changing nothing, for any other storage.
inline bool cross_layer_merge(any_cache& cache, seq_id s, merge::minicache_report* report = nullptr) {
  return cache.merge_layers(s, report);
}

KVC_BEGIN_ISA_NAMESPACE
/// Registers `minicache` in the storage registry of this TU's ISA configuration
/// (runtime/make_cache.hpp), so make_cache builds it by spec. Including this header registers
/// nothing (no static initialisation): call this before the first make_cache that names it, from a
/// TU built with the -m flags of those calls (docs/isa.md); calling it again sets the same
/// builders. A template only so that a TU that includes the header and does not call it
/// instantiates no cache.
template <class Deferred = void>
void register_minicache_storage() {
  using namespace detail;  // the builders
  registered_storages()["minicache"] = [](const spec_stage& st, const cache_config& c,
                                       const storage_options&) -> std::unique_ptr<any_cache> {
    spec_args a(st, "kvc::runtime::make_cache");
    merge::minicache_options o;
    o.start_layer = a.integer("start", -1);
    o.t = static_cast<float>(a.number("t", o.t));
    o.gamma = static_cast<float>(a.number("gamma", o.gamma));
    a.finish("start, t, gamma");
    KVC_EXPECTS_IN("kvc::runtime::make_cache", o.start_layer >= -1 && o.start_layer <= c.num_layers,
                   "'minicache': start = ", o.start_layer, ", expected -1 (num_layers / 2) or 0..", c.num_layers,
                   " (in \"", st.text, "\")");
    KVC_EXPECTS_IN("kvc::runtime::make_cache", o.t >= 0.0f && o.t <= 1.0f, "'minicache': t = ", o.t,
                   ", expected a SLERP weight in [0, 1] (in \"", st.text, "\")");
    KVC_EXPECTS_IN("kvc::runtime::make_cache", o.gamma >= 0.0f && o.gamma <= 1.0f, "'minicache': gamma = ", o.gamma,
                   ", expected a retention fraction in [0, 1] (in \"", st.text, "\")");
    return std::make_unique<minicache_adapter>(st.text, c, o);
  };
}
KVC_END_ISA_NAMESPACE

}  // namespace runtime
KVC_END_NAMESPACE
