// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// The `mikv` storage: MiKV mixed precision (`kvc::mixed_precision_cache` + `kvc::mikv_policy`)
/// behind a spec, for harnesses and engines that only know `runtime::any_cache`:
///
///   mikv(hbits=8, lbits=2, high_ratio=0.2, recent_ratio=0.5, sinks=0, pre_rope=0)
///
///   hbits         high precision: 8 (int8, symmetric) or 4 (int4, asymmetric), per token and head
///   lbits         low precision, fewer bits than hbits: 4 or 2 (asymmetric, per token and head)
///   high_ratio    fraction of each stream's tokens kept in high precision (MiKV: 0.2); named so
///                 because `ratio` in evictor specs is the fraction *evicted*, and `ratio` is refused
///   recent_ratio  share of that budget given to the newest tokens, the rest to the tokens with the
///                 most accumulated attention (H2O's split: 0.5)
///   sinks, pre_rope  as for the other quantized storages (runtime/quant_storages.hpp)
///
/// register_mikv_storage() (end of this header) registers the storage. Importance is the cache's
/// own observed attention, as MiKV (after H2O) does: every `attention()` call also computes the step's group
/// probabilities (summed over the query heads of each kv head) and adds them to the tokens'
/// scores, so engines need not feed anything. Demotion happens inside `append()`: once a stream
/// holds more high-precision tokens than ceil(high_ratio x its length), `mikv_policy` demotes
/// the excess (the newest tokens and the heaviest hitters stay), so after prefill and after every
/// decode step the budget holds. Bytes come from the page pools of both precisions.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/attention/rope.hpp>
#include <kvc/cpu/mixed_precision_attention.hpp>
#include <kvc/error.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/mikv.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/spec.hpp>
#include <kvc/store/mixed_precision_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {

// ---- per ISA (docs/isa.md): mikv_cache::attention runs the CPU kernels ----
KVC_BEGIN_ISA_NAMESPACE

/// any_cache over a mixed_precision_cache<HQ, LQ> that scores its tokens by the attention it
/// computes and demotes by `mikv_policy` after every append.
///
/// `attention()` is const (any_cache's contract) but accumulates importance: the scores are
/// mutable, so two threads must not attend the same sequence at once (the engine attends its
/// layers in turn; different sequences are independent). See docs/threading.md.
template <class HQ, class LQ>
class mikv_cache final : public any_cache {
 public:
  using cache_type = mixed_precision_cache<HQ, LQ>;

  mikv_cache(std::string name, const quant_cache_config& cfg, const mikv_policy& policy)
      : name_(std::move(name)), c_(cfg), policy_(policy) {
    policy_.check("kvc::runtime::mikv_cache::mikv_cache");
    KVC_EXPECTS_IN("kvc::runtime::mikv_cache::mikv_cache", HQ{}.residual() == 0, "the high codec keeps a residual window of ",
                   HQ{}.residual(), " tokens, expected 0 (append plans its demotions from the region counts)");
  }

  const cache_type& get() const noexcept { return c_; }
  const mikv_policy& policy() const noexcept { return policy_; }
  /// Accumulated attention of every token of one stream, logical order (length() entries).
  std::vector<float> importance(seq_id s, std::int32_t layer, std::int32_t head) const {
    const std::int32_t L = c_.length(s, layer, head);
    const std::vector<float>& sc = stream(s, layer, head);
    std::vector<float> r(static_cast<std::size_t>(L), 0.0f);
    std::copy(sc.begin(), sc.begin() + std::min<std::ptrdiff_t>(L, static_cast<std::ptrdiff_t>(sc.size())), r.begin());
    return r;
  }

  const cache_config& config() const override { return c_.config(); }
  std::string name() const override { return name_; }
  const char* isa() const override { return KVC_ISA_STR(KVC_ISA_NAMESPACE); }

  seq_id add_sequence() override {
    const seq_id s = c_.add_sequence();
    try {
      scores_.emplace(s, std::vector<std::vector<float>>(nstreams()));
    } catch (...) {
      c_.remove_sequence(s);
      throw;
    }
    return s;
  }
  void remove_sequence(seq_id s) override {
    c_.remove_sequence(s);
    scores_.erase(s);
  }
  bool contains(seq_id s) const override { return c_.contains(s); }
  /// Refused: the importance scores and the two stores' copy-on-write would both have to be
  /// shared, and a demotion in a fork could then need high-precision pages mid-way.
  seq_id fork(seq_id) override {
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::any_cache::fork: storage '", name_,
                                          "' cannot share pages between sequences (mikv keeps per-sequence "
                                          "importance and demotes in place)"));
  }

  /// Appends, then demotes every stream of the layer back to its high-precision budget. Strong
  /// guarantee: how many tokens each stream will demote depends only on its region counts (not
  /// on the scores), so the low pages they need are reserved (page_pool::reserve) before
  /// anything changes; the append then checks the high pool, and the demotions take their pages
  /// from the reservation and can no longer run out of pages, whatever other threads allocate
  /// (no page is shared: fork is refused).
  void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions) override {
    auto& sc = seqs(s, "append");
    const std::int32_t H = c_.config().num_kv_heads;
    if (layer < 0 || layer >= c_.config().num_layers || n < 0) {
      c_.append(s, layer, k, v, n, positions);  // throws the cache's own message
      return;
    }
    // Input first, as every other storage does: a NaN must not be reported as out_of_memory by
    // the demotion planning below (found by tests/fuzz/fuzz_storage.cpp).
    if (c_.config().check_finite && n > 0 && k != nullptr && v != nullptr) {
      const std::size_t m = static_cast<std::size_t>(n) * static_cast<std::size_t>(H) *
                            static_cast<std::size_t>(c_.config().head_dim);
      for (std::size_t i = 0; i < m; ++i)
        if (!std::isfinite(k[i]) || !std::isfinite(v[i]))
          kvc::detail::fail(kvc::detail::concat("kvc::runtime::mikv_cache::append: ", std::isfinite(k[i]) ? "v[" : "k[", i,
                                                "] = ", std::isfinite(k[i]) ? v[i] : k[i],
                                                ", expected a finite value (the cache is unchanged)"));
    }
    const std::int32_t P = c_.low_cache().config().page_size, sink_tokens = c_.config().sink_tokens;
    std::vector<std::int32_t> planned(static_cast<std::size_t>(H), 0);
    std::int64_t pages_needed = 0;
    for (std::int32_t h = 0; h < H; ++h) {
      const auto r = c_.regions(s, layer, h);
      const auto hr = c_.high_cache().regions(s, layer, h);
      // quant_cache's rule: a stream fills its sinks while it has no other high token.
      const std::int32_t to_sink =
          (hr.quantized == 0 && hr.residual == 0 && hr.sink < sink_tokens) ? std::min(sink_tokens - hr.sink, n) : 0;
      const std::int32_t sink = r.sink + to_sink, cand = r.high + n - to_sink;
      const std::int32_t L = r.sink + r.high + r.low + r.residual + n;
      const std::int32_t room = std::max(0, mikv_policy::share(policy_.high_ratio, L) - sink);
      const std::int32_t d = std::max(0, cand - room);
      planned[static_cast<std::size_t>(h)] = d;
      pages_needed += (r.low + d + P - 1) / P - (r.low + P - 1) / P;
      sc[index(layer, h)].reserve(static_cast<std::size_t>(L));
    }
    // Set the low pages aside before anything changes: another thread appending to another
    // sequence of this cache demotes into the same low pool, and must not take them between this
    // check and the demotions below (docs/threading.md).
    page_pool::reservation low_pages;
    try {
      // (more than 2^31 - 1 pages is more than any pool holds: reserving that many throws)
      low_pages = c_.reserve_low_pages(
          static_cast<std::int32_t>(std::min<std::int64_t>(pages_needed, std::numeric_limits<std::int32_t>::max())));
    } catch (const out_of_memory& e) {
      kvc::detail::fail<out_of_memory>(kvc::detail::concat(
          "kvc::runtime::mikv_cache::append: layer ", layer, ": demoting to the high-precision budget (high_ratio = ",
          policy_.high_ratio, ") needs ", pages_needed, " low-precision pages and the pool cannot set them aside "
          "(the cache is unchanged): ", e.what()));
    }
    c_.append(s, layer, k, v, n, positions);
    for (std::int32_t h = 0; h < H; ++h) {
      if (planned[static_cast<std::size_t>(h)] == 0) continue;
      std::vector<float>& sv = sc[index(layer, h)];
      pad(sv, c_.length(s, layer, h));
      const auto mask = policy_.high_mask(c_, s, layer, h, sv.data());
      const std::int32_t d = c_.apply_precision(s, layer, h, mask.data(), low_pages);
      KVC_ASSERT(d == planned[static_cast<std::size_t>(h)]);
      (void)d;
    }
  }

  void keep(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n) override {
    auto& sc = seqs(s, "keep");
    c_.keep(s, layer, head, kept, n);  // validates; strong
    compact(sc[index(layer, head)], kept, n);
  }
  void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) override {
    auto& sc = seqs(s, "keep_layer");
    c_.keep_layer(s, layer, kept);  // validates; strong
    for (std::size_t h = 0; h < kept.size(); ++h)
      compact(sc[index(layer, static_cast<std::int32_t>(h))], kept[h].data(), static_cast<std::int32_t>(kept[h].size()));
  }

  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const override { return c_.length(s, layer, head); }
  const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const override {
    return c_.positions(s, layer, head);
  }
  std::int32_t seen(seq_id s, std::int32_t layer) const override { return c_.seen(s, layer); }
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out) const override {
    c_.gather(s, layer, head, k_out, v_out);
  }

  /// The fused attention over both precisions; the step's group probabilities (the caller's
  /// buffer, or one of ours) are added to the tokens' importance.
  void attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                 const decode_options& opt) const override {
    auto& sc = seqs(s, "attention");
    const std::int32_t H = c_.config().num_kv_heads;
    std::int32_t longest = 0;
    for (std::int32_t h = 0; h < H; ++h) longest = std::max(longest, c_.length(s, layer, h));
    decode_options o = opt;
    const bool want = opt.probs || opt.group_probs;
    // Per-thread scratch, not a member: attention() on different sequences may run on different
    // threads at once (docs/threading.md), and a shared buffer would be written by both.
    thread_local std::vector<float> gp_;
    if (!opt.group_probs) {
      const std::int32_t stride = want ? opt.probs_stride : longest;
      gp_.assign(static_cast<std::size_t>(H) * static_cast<std::size_t>(std::max(stride, 0)), 0.0f);
      o.group_probs = gp_.data();
      o.probs_stride = stride;
    }
    kvc::cpu::decode_attention(c_, s, layer, q, num_q_heads, out, o);
    const std::size_t stride = static_cast<std::size_t>(o.probs_stride);
    for (std::int32_t h = 0; h < H; ++h) {
      std::vector<float>& v = sc[index(layer, h)];
      const std::int32_t L = c_.length(s, layer, h);
      if (static_cast<std::int32_t>(v.size()) < L) v.resize(static_cast<std::size_t>(L), 0.0f);
      const float* p = o.group_probs + static_cast<std::size_t>(h) * stride;
      for (std::int32_t t = 0; t < L; ++t) v[static_cast<std::size_t>(t)] += p[t];
    }
  }

  std::size_t bytes_in_use() const override { return c_.bytes_in_use(); }
  memory_traffic traffic() const override { return c_.traffic(); }
  std::size_t bytes_in_use(std::int32_t layer) const override { return c_.bytes_in_use(layer); }
  /// Both stores' bookkeeping, the precision map (8 bytes a token) and the scores (4 a token).
  std::size_t metadata_bytes() const override {
    std::size_t b = c_.high_cache().metadata_bytes() + c_.low_cache().metadata_bytes();
    for (const auto& kv : scores_)
      for (const auto& v : kv.second) b += 4 * v.size();
    return b + 8 * static_cast<std::size_t>(c_.tokens_held());
  }
  std::int64_t tokens_held() const override { return c_.tokens_held(); }
  bool pre_rope_keys() const override { return c_.config().pre_rope; }

 private:
  std::size_t nstreams() const noexcept {
    return static_cast<std::size_t>(c_.config().num_layers) * static_cast<std::size_t>(c_.config().num_kv_heads);
  }
  std::size_t index(std::int32_t layer, std::int32_t head) const noexcept {
    return static_cast<std::size_t>(layer) * static_cast<std::size_t>(c_.config().num_kv_heads) +
           static_cast<std::size_t>(head);
  }
  std::vector<std::vector<float>>& seqs(seq_id s, const char* fn) const {
    auto it = scores_.find(s);
    if (it == scores_.end())
      kvc::detail::fail(kvc::detail::concat("kvc::runtime::mikv_cache::", fn, ": unknown sequence id ", s,
                                            " (argument seq), expected a live sequence id: ",
                                            kvc::detail::key_list(scores_)));
    return it->second;
  }
  const std::vector<float>& stream(seq_id s, std::int32_t layer, std::int32_t head) const {
    c_.length(s, layer, head);  // validates s, layer and head with the cache's messages
    return scores_.at(s)[index(layer, head)];
  }

  /// Scores aligned to `L` tokens: tokens not yet attended to score 0.
  static void pad(std::vector<float>& v, std::int32_t L) {
    if (static_cast<std::int32_t>(v.size()) < L) v.resize(static_cast<std::size_t>(L), 0.0f);
  }

  /// Keeps scores kept[0..n) (strictly increasing, validated by the cache) in place.
  static void compact(std::vector<float>& v, const std::int32_t* kept, std::int32_t n) noexcept {
    for (std::int32_t i = 0; i < n; ++i) {
      const std::size_t from = static_cast<std::size_t>(kept[i]);
      v[static_cast<std::size_t>(i)] = from < v.size() ? v[from] : 0.0f;  // kept[i] >= i: forward is safe
    }
    if (static_cast<std::size_t>(n) < v.size()) v.resize(static_cast<std::size_t>(n));
  }

  std::string name_;
  cache_type c_;
  mikv_policy policy_;
  /// [seq][layer * H + head][token]; mutable because attention() (const) accumulates into it
  mutable std::map<seq_id, std::vector<std::vector<float>>> scores_;
};

KVC_END_ISA_NAMESPACE

namespace detail {

[[noreturn]] inline void mikv_bad(const spec_stage& st, const std::string& what) {
  kvc::detail::fail(kvc::detail::concat("kvc::runtime: '", st.text, "': ", what));
}

KVC_BEGIN_ISA_NAMESPACE  // builds this ISA's mikv_cache, registers in this ISA's registry

inline std::unique_ptr<any_cache> make_mikv(const spec_stage& st, const cache_config& c, const storage_options& o) {
  spec_args a(st);
  if (a.has("ratio"))
    mikv_bad(st, "ratio is not a mikv argument, expected high_ratio = the fraction of tokens kept in high precision "
                 "(in evictor specs ratio is the fraction evicted)");
  const int hb = a.integer("hbits", 8);
  const int lb = a.integer("lbits", 2);
  const double hr = a.number("high_ratio", 0.2);
  const double rr = a.number("recent_ratio", 0.5);
  const int sinks = a.integer("sinks", 0);
  const int pr = a.integer("pre_rope", 0);
  a.finish("hbits, lbits, high_ratio, recent_ratio, sinks, pre_rope");
  if (hb != 8 && hb != 4) mikv_bad(st, "hbits = " + std::to_string(hb) + ", expected 8 or 4");
  if ((lb != 4 && lb != 2) || lb >= hb)
    mikv_bad(st, "lbits = " + std::to_string(lb) + ", expected 4 or 2 and fewer than hbits = " + std::to_string(hb));
  if (!(hr >= 0.0 && hr <= 1.0))
    mikv_bad(st, kvc::detail::concat("high_ratio = ", hr, ", expected 0..1 (the fraction kept in high precision; MiKV: 0.2)"));
  if (!(rr >= 0.0 && rr <= 1.0))
    mikv_bad(st, kvc::detail::concat("recent_ratio = ", rr, ", expected 0..1 (the newest tokens' share of the high budget; H2O: 0.5)"));
  if (sinks < 0) mikv_bad(st, "sinks = " + std::to_string(sinks) + ", expected >= 0");
  if (pr != 0 && pr != 1) mikv_bad(st, "pre_rope = " + std::to_string(pr) + ", expected 0 or 1");
  if (pr == 1 && !o.rope) mikv_bad(st, "pre_rope = 1, expected the model's RoPE in storage_options::rope");
  quant_cache_config q;
  static_cast<cache_config&>(q) = c;
  q.sink_tokens = sinks;
  q.pre_rope = pr == 1;
  if (q.pre_rope) q.rope = *o.rope;
  q.max_fp_pages = c.max_pages;  // at most one sink page per stream (per-token codecs keep no residual window)
  mikv_policy pol;
  pol.high_ratio = static_cast<float>(hr);
  pol.recent_ratio = static_cast<float>(rr);
  if (hb == 8 && lb == 2) return std::make_unique<mikv_cache<quant::int8, quant::int2>>(st.text, q, pol);
  if (hb == 8 && lb == 4) return std::make_unique<mikv_cache<quant::int8, quant::int4>>(st.text, q, pol);
  return std::make_unique<mikv_cache<quant::int4, quant::int2>>(st.text, q, pol);
}

KVC_END_ISA_NAMESPACE
}  // namespace detail

KVC_BEGIN_ISA_NAMESPACE
/// Registers `mikv` in the storage registry of this TU's ISA configuration
/// (runtime/make_cache.hpp), so make_cache builds it by spec. Including this header registers
/// nothing (no static initialisation): call this before the first make_cache that names it, from a
/// TU built with the -m flags of those calls (docs/isa.md); calling it again sets the same
/// builders. A template only so that a TU that includes the header and does not call it
/// instantiates no cache.
template <class Deferred = void>
void register_mikv_storage() {
  using namespace detail;  // the builders
  registered_storages()["mikv"] = make_mikv;
}
KVC_END_ISA_NAMESPACE

}  // namespace runtime
KVC_END_NAMESPACE
