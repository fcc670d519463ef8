// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// The run-time storage `quest(budget=, sinks=, recent=, dense=)`: fp16 pages whose streams keep
/// their pages' key bounds (cache_config::key_bounds), read by Quest's query-aware decode
/// (kvc/sparse/quest.hpp). Every token stays in the cache; each decode step of a layer reads the
/// `budget` tokens' worth of pages per kv head whose bounds score highest against its query.
///  - budget: tokens read per kv head and step (Quest's token budget; default 2048)
///  - sinks, recent: leading and trailing pages always read (default 1 and 1)
///  - dense: the first `dense` layers read every page (default 2: the paper leaves its first two
///    layers dense, where attention is spread too evenly for a page bound to pick)
/// `dense` counts the layers this cache holds: inside `layers(BASE, lA_B=quest(...))` a part sees
/// its own layers from 0, so there `dense` counts from the part's first layer (dense=0 makes
/// every layer of the part a Quest read).
/// Prefill attention and eviction are those of fp16 pages; it composes with every evictor
/// (`snapkv(ratio=0.5)+quest(budget=1024)`). Attention probabilities are refused (they would be
/// over a subset of the pages): decode-time scorers that need them (h2o, tova, ...) cannot read
/// through it.

#include <memory>
#include <string>

#include <kvc/error.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/spec.hpp>
#include <kvc/sparse/quest.hpp>
#include <kvc/store/kv_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {
KVC_BEGIN_ISA_NAMESPACE  // runs this ISA's kernels

/// Quest's read for layers at or past `dense_layers`, the whole read before them.
struct quest_attention {
  quest_options opt;
  std::int32_t dense_layers = 2;
  template <class Cache>
  void operator()(const Cache& c, seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                  const decode_options& o) const {
    if (layer < dense_layers)
      kvc::cpu::decode_attention(c, s, layer, q, num_q_heads, out, o);
    else
      kvc::cpu::quest_decode_attention(c, s, layer, q, num_q_heads, out, opt, o);
  }
};

KVC_END_ISA_NAMESPACE

namespace detail {
KVC_BEGIN_ISA_NAMESPACE  // builds this ISA's caches, registers in this ISA's registry

inline std::unique_ptr<any_cache> make_quest(const spec_stage& st, const cache_config& c, const storage_options&) {
  spec_args a(st, "kvc::runtime::make_cache");
  const int budget = a.integer("budget", 2048);
  const int sinks = a.integer("sinks", 1);
  const int recent = a.integer("recent", 1);
  const int dense = a.integer("dense", 2);
  a.finish("budget, sinks, recent, dense");
  auto bad = [&st](const std::string& what) {
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: '", st.text, "': ", what));
  };
  if (sinks < 0) bad("sinks = " + std::to_string(sinks) + ", expected >= 0 pages");
  if (recent < 1) bad("recent = " + std::to_string(recent) + ", expected >= 1 page (the newest token's page is always read)");
  if (dense < 0) bad("dense = " + std::to_string(dense) + ", expected >= 0 layers");
  const std::int64_t least = (std::int64_t{sinks} + recent) * c.page_size;  // no int overflow
  if (budget < least)
    bad(kvc::detail::concat("budget = ", budget, ", expected >= (sinks + recent) x page_size = ", least, " tokens"));
  cache_config cfg = c;
  cfg.key_bounds = true;
  using adapter = cache_adapter<kv_cache<half>, quest_attention>;
  auto cache = std::make_unique<adapter>(st.text, cfg);
  cache->attend().opt.token_budget = budget;
  cache->attend().opt.sink_pages = sinks;
  cache->attend().opt.recent_pages = recent;
  cache->attend().dense_layers = dense;
  return cache;
}

KVC_END_ISA_NAMESPACE
}  // namespace detail

KVC_BEGIN_ISA_NAMESPACE
/// Registers `quest` in the storage registry of this TU's ISA configuration
/// (runtime/make_cache.hpp), so make_cache builds it by spec. Including this header registers
/// nothing (no static initialisation): call this before the first make_cache that names it, from a
/// TU built with the -m flags of those calls (docs/isa.md); calling it again sets the same
/// builders. A template only so that a TU that includes the header and does not call it
/// instantiates no cache.
template <class Deferred = void>
void register_quest_storage() {
  using namespace detail;  // the builders
  registered_storages()["quest"] = make_quest;
}
KVC_END_ISA_NAMESPACE
}  // namespace runtime
KVC_END_NAMESPACE
