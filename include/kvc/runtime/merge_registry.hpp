// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Merging policies by name, for harnesses that choose them from a spec string (runtime/spec.hpp
/// grammar), and the run-time cache that holds merged tokens. A merging stage follows the
/// eviction stage whose selection it extends: the evictor chooses the kept tokens at its budget
/// and scores every token; the merging stage decides what happens to the evicted ones instead of
/// dropping them.
///
///   cam(span=32)                 CaM (kvc/merge/cam.hpp): evicted values spread over the `span`
///                                kept tokens after them, in proportion to their scores
///   d2o(beta=0.5, mass=1)        D2O's token level (kvc/merge/d2o.hpp): an evicted token merged
///                                into its most similar kept key when it passes the layer's EMA
///                                threshold
///   kvmerger(eps=0.75, sigma=5, mass=1)
///                                KVMerger at the eviction's budget (kvc/merge/kvmerger.hpp,
///                                kvmerger_evict_plan): evicted tokens in a merging set with a
///                                kept token merge into its best-scored kept member
///
/// mass=1 (kvc's default): a merged token carries its members' attention mass as a log-weight;
/// mass=0: it weighs as one token, as in the papers (same key and value).
/// e.g. `snapkv(ratio=0.5)+d2o`, `snapkv(ratio=0.75)+kvmerger(eps=0.8)+fp32`. Every merged
/// token carries its members' attention mass as a log-weight, so the storage is a
/// merge::basic_merged_cache: fp16 or fp32 pages, or int8, int4 and kivi(bits=2|4) codes, e.g.
/// `snapkv(ratio=0.5)+d2o+int8` (runtime/merged_storage.hpp: make_merged_cache, or
/// make_merged_cache_for_cpu for the best ISA configuration). The defaults are the papers'
/// (each option's comment in its header says where it was read).

#include <cmath>
#include <cstdint>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <optional>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/budget/budget.hpp>
#include <kvc/error.hpp>
#include <kvc/evict/compressor.hpp>
#include <kvc/isa.hpp>
#include <kvc/merge/cam.hpp>
#include <kvc/merge/d2o.hpp>
#include <kvc/merge/kvmerger.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/merge_policy.hpp>
#include <kvc/runtime/merged_storage.hpp>
#include <kvc/runtime/spec.hpp>
#include <kvc/store/merged_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {

/// The merging stages a spec may name.
inline const std::vector<std::string>& merge_names() {
  static const std::vector<std::string> n{"cam", "d2o", "kvmerger"};
  return n;
}
inline bool is_merger(const std::string& name) {
  for (const auto& n : merge_names())
    if (n == name) return true;
  return false;
}
inline std::string known_mergers() {
  std::string s;
  for (const auto& n : merge_names()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

namespace detail {
/// mass=1 (default): a merged token carries its members' attention mass; mass=0: the papers' form.
inline bool mass_flag(spec_args& a, const spec_stage& st) {
  const int m = a.integer("mass", 1);
  KVC_EXPECTS_IN("kvc::runtime::make_merge_policy", m == 0 || m == 1, "'", st.name, "': mass = ", m,
                 ", expected 1 (a merged token carries its members' attention mass) or 0 (it weighs as one token; in \"",
                 st.text, "\")");
  return m == 1;
}
}  // namespace detail

/// The merging policy a stage describes; every argument is checked here, naming the value and
/// what was expected, so a bad spec fails before any cache exists.
inline merge_policy make_merge_policy(const spec_stage& st) {
  constexpr const char* who = "kvc::runtime::make_merge_policy";
  merge_policy p;
  p.text = st.text;
  spec_args a(st, who);
  if (st.name == "cam") {
    p.which = merge_policy::method::cam;
    const int span = a.integer("span", p.cam.merge_span);
    KVC_EXPECTS_IN(who, span >= 1, "'cam': span = ", span, ", expected >= 1 kept tokens per evicted value (in \"",
                   st.text, "\")");
    p.cam.merge_span = span;
    a.finish("span");
  } else if (st.name == "d2o") {
    p.which = merge_policy::method::d2o;
    const double beta = a.number("beta", p.d2o.beta);
    KVC_EXPECTS_IN(who, beta >= 0.0 && beta < 1.0, "'d2o': beta = ", beta,
                   ", expected 0 <= beta < 1 (the weight of the previous threshold; in \"", st.text, "\")");
    p.d2o.beta = static_cast<float>(beta);
    p.d2o.carry_mass = detail::mass_flag(a, st);
    a.finish("beta, mass");
  } else if (st.name == "kvmerger") {
    p.which = merge_policy::method::kvmerger;
    const double eps = a.number("eps", p.kvmerger.threshold);
    const double sigma = a.number("sigma", p.kvmerger.sigma);
    KVC_EXPECTS_IN(who, eps >= -1.0 && eps <= 1.0, "'kvmerger': eps = ", eps,
                   ", expected a cosine-similarity threshold in [-1, 1] (in \"", st.text, "\")");
    KVC_EXPECTS_IN(who, sigma > 0.0 && sigma <= 1e30, "'kvmerger': sigma = ", sigma,
                   ", expected a kernel width > 0 (in \"", st.text, "\")");
    p.kvmerger.threshold = static_cast<float>(eps);
    p.kvmerger.sigma = static_cast<float>(sigma);
    p.kvmerger.carry_mass = detail::mass_flag(a, st);
    a.finish("eps, sigma, mass");
  } else {
    const std::string hint = detail::closest(st.name, merge_names());
    kvc::detail::fail(kvc::detail::concat(who, ": unknown merging policy '", st.name, "' in \"", st.text, "\"",
                                          hint.empty() ? "" : "; did you mean '", hint, hint.empty() ? "" : "'?",
                                          "; expected one of: ", known_mergers()));
  }
  return p;
}

// ---- per ISA (docs/isa.md) ----
KVC_BEGIN_ISA_NAMESPACE

/// Applies a merging policy to the selection an eviction made, one layer at a time, and carries
/// what the policy keeps between steps (D2O's threshold per sequence and layer).
/// Threads: one instance per thread, like evict::compressor (docs/threading.md).
class merger {
 public:
  explicit merger(merge_policy p) : p_(std::move(p)) {}
  const merge_policy& policy() const noexcept { return p_; }

  /// Keeps kept[h] in every kv head of `layer` and merges the evicted tokens by the policy.
  /// \param cache   a cache from make_merged_cache or make_merged_cache_for_cpu, of any ISA
  ///                configuration (any other throws kvc::error, cache unchanged)
  /// \param scores  [num_kv_heads][length of the head] the evictor's scores (compressor::plan)
  /// \param kept    [num_kv_heads] strictly increasing kept indices (compressor::plan)
  /// All heads change or none does (the merge methods' commit); D2O's threshold moves only after it.
  void apply(any_cache& cache, seq_id s, std::int32_t layer, const std::vector<std::vector<float>>& scores,
             const std::vector<std::vector<std::int32_t>>& kept) {
    if (!cache.holds_log_weights())
      kvc::detail::fail(kvc::detail::concat("kvc::runtime::merger::apply: cache '", cache.name(), "' for '", p_.text,
                                            "' holds no log-weights; expected a cache from make_merged_cache"));
    cache.apply_merge(p_, p_.which == merge_policy::method::d2o ? &tau_[{s, layer}] : nullptr, s, layer, scores, kept);
  }

  template <class Store>
  void apply(merge::basic_merged_cache<Store>& c, seq_id s, std::int32_t layer,
             const std::vector<std::vector<float>>& scores, const std::vector<std::vector<std::int32_t>>& kept) {
    apply_merge_policy(c, p_, p_.which == merge_policy::method::d2o ? &tau_[{s, layer}] : nullptr, s, layer, scores,
                       kept);
  }

  /// One compression of `layer` by an eviction stage and this merging stage: the compressor's
  /// selection and scores at budget b (compressor::plan), the merge of what it drops (apply), then
  /// the attention observer of obs, when there is one, compacted to the kept tokens as the
  /// compressor's own eviction does. A kept token keeps its own statistics: a target does not
  /// inherit its members' past attention, but from now on its probabilities carry their mass
  /// (merged_decode_attention). Nothing changes when the selection keeps every token.
  /// b: compressor::options().target after prefill, seen_budget after a chunk, and
  /// decode_step_budget at a decode step (which also says whether the step compresses).
  template <class Scorer>
  evict::compress_report compress(const evict::compressor<Scorer>& comp, any_cache& cache, seq_id s,
                                  std::int32_t layer, const evict::observations& obs, const budget& b) {
    any_cache_view view{&cache};
    evict::compress_report r;
    evict::layer_scores sc;
    const evict::layer_selection sel = comp.plan(view, s, layer, obs, b, &sc);
    for (std::int32_t h = 0; h < cache.config().num_kv_heads; ++h) {
      r.tokens_before += cache.length(s, layer, h);
      r.tokens_after += static_cast<std::int64_t>(sel[static_cast<std::size_t>(h)].size());
    }
    if (r.tokens_after == r.tokens_before) return r;
    const memory_traffic before = cache.traffic();
    apply(cache, s, layer, sc, sel);
    if (obs.attention) obs.attention->keep_layer(s, layer, sel);
    const memory_traffic after = cache.traffic();
    r.bytes_allocated = static_cast<std::size_t>(after.bytes_allocated - before.bytes_allocated);
    r.bytes_released = static_cast<std::size_t>(after.bytes_released - before.bytes_released);
    r.compressed = true;
    return r;
  }

  /// The compressor's phases with this stage's merge in place of its eviction, at the budgets and
  /// on the steps comp's own after_prefill / after_chunk / after_decode_step would compress.
  template <class Scorer>
  evict::compress_report after_prefill(const evict::compressor<Scorer>& comp, any_cache& cache, seq_id s,
                                       std::int32_t layer, const evict::observations& obs) {
    return compress(comp, cache, s, layer, obs, comp.options().target);
  }
  template <class Scorer>
  evict::compress_report after_chunk(const evict::compressor<Scorer>& comp, any_cache& cache, seq_id s,
                                     std::int32_t layer, const evict::observations& obs) {
    return compress(comp, cache, s, layer, obs, comp.seen_budget(any_cache_view{&cache}, s, layer));
  }
  /// Counts the decode step in comp (decode_step_budget) and merges when it is due.
  template <class Scorer>
  evict::compress_report after_decode_step(evict::compressor<Scorer>& comp, any_cache& cache, seq_id s,
                                           std::int32_t layer, const evict::observations& obs) {
    const std::optional<budget> b = comp.decode_step_budget(any_cache_view{&cache}, s, layer);
    return b ? compress(comp, cache, s, layer, obs, *b) : evict::compress_report{};
  }

  /// Whether merged tokens carry a log-weight (D2O and KVMerger with mass=1): attention over
  /// the cache's rows without kvc's merged kernels (a caller's own softmax) must add it.
  bool log_weighted() const noexcept {
    return (p_.which == merge_policy::method::d2o && p_.d2o.carry_mass) ||
           (p_.which == merge_policy::method::kvmerger && p_.kvmerger.carry_mass);
  }

  /// Forgets what the policy carried for a sequence.
  void remove_sequence(seq_id s) { evict::detail::erase_entries(tau_, s); }

  /// Gives sequence `to` a copy of what the policy carried for `from` (D2O's thresholds), as the
  /// cache's fork gives it `from`'s tokens: a forked beam then merges as its source would. `to`
  /// must carry nothing yet.
  void fork(seq_id from, seq_id to) {
    evict::detail::fork_entries(tau_, from, to, "kvc::runtime::merger::fork", "merging state");
  }

  /// Layer `layer` of s takes what the policy carried for layer `from` (D2O's threshold), as the
  /// cache's share_layer gives it from's tokens. Plan half: makes room for the entry, default
  /// (unprimed), which is what an absent entry means (may throw, changing nothing visible).
  /// Commit half: cannot throw.
  void plan_share_layer(seq_id s, std::int32_t layer, std::int32_t from) {
    if (tau_.count({s, from})) tau_.try_emplace({s, layer});
  }
  void commit_share_layer(seq_id s, std::int32_t layer, std::int32_t from) noexcept {
    const auto src = tau_.find({s, from});
    if (src == tau_.end()) tau_.erase({s, layer});
    else tau_[{s, layer}] = src->second;  // present since the plan: no allocation
  }

 private:
  merge_policy p_;
  std::map<std::pair<seq_id, std::int32_t>, merge::d2o_threshold> tau_;
};

KVC_END_ISA_NAMESPACE
}  // namespace runtime
KVC_END_NAMESPACE
