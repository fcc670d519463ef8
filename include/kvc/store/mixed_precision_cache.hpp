// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `mixed_precision_cache<HQ, LQ>`: a quantized KV store with two precisions per stream. Tokens
/// arrive in high precision (codec HQ, e.g. int8, with the quant_cache's full-precision sinks);
/// `demote` / `apply_precision` move chosen tokens to low precision (codec LQ, e.g. int2) instead
/// of evicting them. Both precisions live in page pools of their own, so demotion really frees
/// high-precision pages and takes (fewer bytes of) low-precision ones; bytes_in_use() reads both
/// pools. `mikv_policy` (<kvc/quant/mikv.hpp>) picks the tokens that stay high from per-token
/// importance scores (accumulated attention as in H2O, or any scores the caller has), the sinks
/// and a recent window.
///
/// Layout: a quant_cache<HQ> holds the high tokens (its sinks, quantized region and residual
/// window, in token order); a quant_cache<LQ> with one kv head per (layer, head) holds the demoted
/// tokens in the order they were demoted. A per-stream table maps each logical token to its store.
/// Demoted tokens are re-encoded from their *decoded* high-precision values (the originals are
/// gone): |x - x^| <= err_HQ(x) + err_LQ, where err_LQ is LQ's bound on the decoded row. Tokens
/// cannot be promoted back. Only tokens of the high store's quantized region can be demoted:
/// sinks and the full-precision residual window always stay.
///
/// Every mutating call gives the strong guarantee: if it throws, the cache is as before. (The
/// rollback of a failed demotion truncates the low store, which allocates no pages; it allocates
/// small host vectors, so only a std::bad_alloc *during the rollback* could break this.)
///
/// Decode attention over it is a kernel: kvc::cpu::decode_attention in
/// <kvc/cpu/mixed_precision_attention.hpp> (codecs and stores sit below the kernels; docs/design.md).
///
/// \par Reference
/// Yang et al., "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed
/// Precision Quantization" (MiKV), arXiv:2402.18096.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/store/quant_cache.hpp>
#include <kvc/store/sequence_table.hpp>
#include <kvc/view/decoding_accessor.hpp>
#include <kvc/view/heads.hpp>

KVC_BEGIN_NAMESPACE

/// \tparam HQ  high-precision codec (per-token: kvc::quant::int8, fp8<>, int4, outliers<int8>, ...)
/// \tparam LQ  low-precision codec (per-token, no residual window: int2, int4, ...)
/// \tparam Fp  element type of the full-precision sinks and residual window
/// Threads: as kv_cache (docs/threading.md). keep/keep_layer reserve the low-precision pages their
/// copy-on-write may need before committing anything, so concurrent appends to other sequences
/// cannot make them fail half way.
template <class HQ = quant::int8, class LQ = quant::int2, class Fp = half>
class mixed_precision_cache {
  static_assert(HQ::tokens_per_record(quant::role::key) == 1 && HQ::tokens_per_record(quant::role::value) == 1,
                "kvc::mixed_precision_cache<HQ, LQ>: HQ must be a per-token codec (compaction moves records without "
                "re-encoding)");
  static_assert(LQ::tokens_per_record(quant::role::key) == 1 && LQ::tokens_per_record(quant::role::value) == 1,
                "kvc::mixed_precision_cache<HQ, LQ>: LQ must be a per-token codec");

 public:
  using high_cache_type = quant_cache<HQ, HQ, Fp>;
  using low_cache_type = quant_cache<LQ, LQ, Fp>;
  using high_codec = HQ;
  using low_codec = LQ;

  /// The source of a decoded view (kvc/view/decoding_accessor.hpp): token t of one stream, decoded
  /// from the store that holds it. rows[t] is its index in the high store, or -1 - its index in
  /// the low store (a table layer() builds in its buffer: a prefix count per token otherwise).
  template <quant::role R>
  struct decoded_stream {
    const high_cache_type* high = nullptr;
    const low_cache_type* low = nullptr;
    typename high_cache_type::stream_view hv{};
    typename low_cache_type::stream_view lv{};
    const std::int32_t* rows = nullptr;
    void decode_row(std::int64_t t, float* out) const {
      const std::int32_t r = rows[t];
      if (r >= 0) high->template decode_token<R>(hv, r, out);
      else low->template decode_token<R>(lv, -1 - r, out);
    }
  };
  /// One stream's K (V) as a kv_view of decoded floats in logical order, [length][1][head_dim].
  using key_view_type = decoded_view<decoded_stream<quant::role::key>>;
  using value_view_type = decoded_view<decoded_stream<quant::role::value>>;
  /// A layer's decoded views, naming this cache, the sequence and the layer (cpu::decode_attention
  /// given them runs the mixed kernel, which reads both stores' codes).
  using layer_view = store_layer<mixed_precision_cache, stream_heads<key_view_type, value_view_type>>;
  /// Where layer() puts its views and their row tables.
  struct layer_buffer : decoded_layer_buffer<decoded_stream<quant::role::key>, decoded_stream<quant::role::value>> {
    std::vector<std::vector<std::int32_t>> rows;
  };

  /// \param cfg            shape, page size, high pool capacity (max_pages), sinks, pre-RoPE
  /// \param low_max_pages  capacity of the low pool in pages (0: cfg.max_pages)
  /// Bad arguments throw kvc::error naming kvc::mixed_precision_cache::mixed_precision_cache (the
  /// two stores' own checks included).
  explicit mixed_precision_cache(const quant_cache_config& cfg, std::int32_t low_max_pages = 0, HQ hq = HQ{},
                                 LQ lq = LQ{}) try
      : high_(cfg, hq, hq), low_(low_config(cfg, low_max_pages, lq), lq, lq) {
  } catch (const out_of_memory&) {
    throw;
  } catch (const error& e) {
    const std::string m = e.what(), inner = "kvc::quant_cache::quant_cache: ";
    if (m.rfind(kCtor, 0) == 0) throw;  // already ours
    detail::fail(detail::concat(kCtor, ": ", m.rfind(inner, 0) == 0 ? m.substr(inner.size()) : m));
  }

  const quant_cache_config& config() const noexcept { return high_.config(); }
  const high_cache_type& high_cache() const noexcept { return high_; }
  const low_cache_type& low_cache() const noexcept { return low_; }

  // ---- sequences -------------------------------------------------------------------------

  seq_id add_sequence() {
    const seq_id hs = high_.add_sequence();
    seq_id ls;
    try {
      ls = low_.add_sequence();
      try {
        seqs_.add_as(hs, sequence{ls, std::vector<mstream>(nstreams())});
      } catch (...) {
        low_.remove_sequence(ls);
        throw;
      }
    } catch (...) {
      high_.remove_sequence(hs);
      throw;
    }
    return hs;
  }

  void remove_sequence(seq_id s) {
    const seq_id low = seqs_.find(s, "remove_sequence").low;
    high_.remove_sequence(s);
    low_.remove_sequence(low);
    seqs_.erase(s);
  }

  bool contains(seq_id s) const noexcept { return seqs_.contains(s); }
  std::size_t num_sequences() const noexcept { return seqs_.size(); }

  /// A new sequence sharing every page of s (copy on write in both stores).
  seq_id fork(seq_id s) {
    const sequence& src = seqs_.find(s, "fork");
    sequence copy = src;
    const seq_id hs = high_.fork(s);
    try {
      copy.low = low_.fork(src.low);
      try {
        seqs_.add_as(hs, std::move(copy));
      } catch (...) {
        low_.remove_sequence(copy.low);
        throw;
      }
    } catch (...) {
      high_.remove_sequence(hs);
      throw;
    }
    return hs;
  }

  // ---- writing ---------------------------------------------------------------------------

  /// Appends n tokens (high precision) to every kv-head of one layer; see quant_cache::append.
  void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions = nullptr) {
    sequence& sq = seqs_.find(s, "append");
    seqs_.check_layer(layer, "append");
    KVC_EXPECTS_IN("kvc::mixed_precision_cache::append", n >= 0, "n = ", n, ", expected >= 0 tokens");
    KVC_EXPECTS_IN("kvc::mixed_precision_cache::append", n == 0 || (k != nullptr && v != nullptr),
                   "k or v is null with n = ", n, ", expected [n][num_kv_heads][head_dim] rows");
    if (config().check_finite && n > 0) {  // here, so that the message names this call (not the high store's)
      const std::size_t m = static_cast<std::size_t>(n) * static_cast<std::size_t>(config().num_kv_heads) *
                            static_cast<std::size_t>(config().head_dim);
      for (std::size_t i = 0; i < m; ++i)
        if (!std::isfinite(k[i]) || !std::isfinite(v[i]))
          detail::fail(detail::concat("kvc::mixed_precision_cache::append: ", std::isfinite(k[i]) ? "v[" : "k[", i,
                                      "] = ", std::isfinite(k[i]) ? v[i] : k[i],
                                      ", expected a finite value (the cache is unchanged)"));
    }
    const std::int32_t H = config().num_kv_heads;
    for (std::int32_t h = 0; h < H; ++h) {
      mstream& ms = seqs_.at(sq, layer, h);
      ms.low_idx.reserve(ms.low_idx.size() + static_cast<std::size_t>(n));
      ms.pos.reserve(ms.pos.size() + static_cast<std::size_t>(n));
    }
    high_.append(s, layer, k, v, n, positions);
    // Commit: nothing below throws (capacity reserved above).
    for (std::int32_t h = 0; h < H; ++h) {
      mstream& ms = seqs_.at(sq, layer, h);
      const std::int32_t L = high_.length(s, layer, h);
      const std::int32_t* hp = high_.positions(s, layer, h);
      for (std::int32_t i = L - n; i < L; ++i) {
        ms.low_idx.push_back(-1);
        ms.pos.push_back(hp[i]);
      }
    }
  }

  /// Moves tokens token_indices[0..n) (strictly increasing logical indices, each a high-precision
  /// quantized token: not a sink, not in the full-precision window, not already low) to low
  /// precision. Strong guarantee.
  void demote(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* token_indices, std::int32_t n) {
    demote_impl(s, layer, head, token_indices, n, nullptr, "demote");
  }
  /// As demote, taking the low-precision pages it needs from `low_pages` (a reservation of the low
  /// pool, reserve_low_pages) instead of the pool's free pages: a caller that reserved them before
  /// committing something else (runtime::mikv_cache::append) cannot then run out of low pages.
  void demote(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* token_indices, std::int32_t n,
              page_pool::reservation& low_pages) {
    check_low_reservation(low_pages, "demote");
    demote_impl(s, layer, head, token_indices, n, &low_pages, "demote");
  }

  /// Sets n free pages of the low-precision pool aside (page_pool::reserve) for the demote /
  /// apply_precision overloads that take a reservation; unused ones go back when it is destroyed.
  /// n > the low pool's free pages throws kvc::out_of_memory.
  page_pool::reservation reserve_low_pages(std::int32_t n) { return low_.reserve_quant_pages(n); }

 private:
  void demote_impl(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* token_indices, std::int32_t n,
                   page_pool::reservation* low_pages, const char* fn) {
    sequence& sq = seqs_.find(s, fn);
    seqs_.check_layer(layer, fn);
    seqs_.check_head(head, fn);
    KVC_EXPECTS_IN(detail::concat("kvc::mixed_precision_cache::", fn), n >= 0, "n = ", n, ", expected >= 0 tokens");
    KVC_EXPECTS_IN(detail::concat("kvc::mixed_precision_cache::", fn), n == 0 || token_indices != nullptr,
                   "token_indices is null with n = ", n);
    if (n == 0) return;
    mstream& ms = seqs_.at(sq, layer, head);
    const std::int32_t L = static_cast<std::int32_t>(ms.low_idx.size());
    const auto rc = high_.regions(s, layer, head);
    // logical index -> high index
    std::vector<std::int32_t> hi(static_cast<std::size_t>(L), -1);
    std::int32_t nh = 0, nl = 0;
    for (std::int32_t t = 0; t < L; ++t) {
      if (ms.low_idx[static_cast<std::size_t>(t)] < 0) hi[static_cast<std::size_t>(t)] = nh++;
      else ++nl;
    }
    std::vector<char> gone(static_cast<std::size_t>(nh), 0);
    for (std::int32_t i = 0; i < n; ++i) {
      const std::int32_t t = token_indices[i];
      if (t < 0 || t >= L)
        fail(fn, head, "token_indices[", i, "] = ", t, ", expected 0..", L - 1, " (the stream's length is ", L,
             ")");
      if (i > 0 && t <= token_indices[i - 1])
        fail(fn, head, "token_indices[", i, "] = ", t, " after ", token_indices[i - 1],
             ", expected strictly increasing indices");
      const std::int32_t h = hi[static_cast<std::size_t>(t)];
      if (h < 0) fail(fn, head, "token ", t, " is already low precision");
      if (h < rc.sink)
        fail(fn, head, "token ", t, " is an attention sink (kept in full precision; sink_tokens = ",
             config().sink_tokens, ")");
      if (h >= rc.sink + rc.quantized)
        fail(fn, head, "token ", t,
             " is in the full-precision residual window (the newest tokens stay exact); only quantized tokens can be "
             "demoted");
      gone[static_cast<std::size_t>(h)] = 1;
    }
    // Rows to demote (model domain, pre-RoPE keys when the cache is pre-RoPE) and their positions.
    const std::int32_t D = config().head_dim;
    std::vector<float> kb(static_cast<std::size_t>(n) * D), vb(kb.size());
    std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
    const auto sv = high_.view(s, layer, head);
    for (std::int32_t i = 0; i < n; ++i) {
      const std::int32_t t = token_indices[i];
      const std::int32_t h = hi[static_cast<std::size_t>(t)];
      high_.template decode_unroped<quant::role::key>(sv, h, kb.data() + static_cast<std::size_t>(i) * D);
      high_.template decode_unroped<quant::role::value>(sv, h, vb.data() + static_cast<std::size_t>(i) * D);
      pos[static_cast<std::size_t>(i)] = ms.pos[static_cast<std::size_t>(t)];
    }
    std::vector<std::int32_t> keep_high;
    keep_high.reserve(static_cast<std::size_t>(nh - n));
    for (std::int32_t h = 0; h < nh; ++h)
      if (!gone[static_cast<std::size_t>(h)]) keep_high.push_back(h);
    std::vector<std::int32_t> new_low = ms.low_idx;
    for (std::int32_t i = 0; i < n; ++i) new_low[static_cast<std::size_t>(token_indices[i])] = nl + i;
    std::vector<std::int32_t> truncate(static_cast<std::size_t>(nl));
    std::iota(truncate.begin(), truncate.end(), 0);
    const std::int32_t ll = low_layer(layer, head);
    if (low_pages) low_.append(sq.low, ll, kb.data(), vb.data(), n, pos.data(), *low_pages);
    else low_.append(sq.low, ll, kb.data(), vb.data(), n, pos.data());
    try {
      high_.keep(s, layer, head, keep_high.data(), static_cast<std::int32_t>(keep_high.size()));
    } catch (...) {
      low_.keep(sq.low, ll, 0, truncate.data(), nl);  // allocates no pages: a pure truncation
      throw;
    }
    ms.low_idx.swap(new_low);
  }

 public:
  /// Demotes every high-precision quantized token t with high_mask[t] == 0 (high_mask has one
  /// entry per token of the stream). Tokens already low stay low whatever their mask (there is no
  /// promotion). A 0 on a sink or on a full-precision window token is an error. Returns the number
  /// of tokens demoted. Strong guarantee.
  std::int32_t apply_precision(seq_id s, std::int32_t layer, std::int32_t head, const std::uint8_t* high_mask) {
    return apply_precision_impl(s, layer, head, high_mask, nullptr);
  }
  /// As apply_precision, taking the low-precision pages from `low_pages` (see the demote overload).
  std::int32_t apply_precision(seq_id s, std::int32_t layer, std::int32_t head, const std::uint8_t* high_mask,
                               page_pool::reservation& low_pages) {
    check_low_reservation(low_pages, "apply_precision");
    return apply_precision_impl(s, layer, head, high_mask, &low_pages);
  }

 private:
  std::int32_t apply_precision_impl(seq_id s, std::int32_t layer, std::int32_t head, const std::uint8_t* high_mask,
                                    page_pool::reservation* low_pages) {
    const sequence& sq = seqs_.find(s, "apply_precision");
    seqs_.check_layer(layer, "apply_precision");
    seqs_.check_head(head, "apply_precision");
    const mstream& ms = seqs_.at(sq, layer, head);
    const std::int32_t L = static_cast<std::int32_t>(ms.low_idx.size());
    KVC_EXPECTS_IN("kvc::mixed_precision_cache::apply_precision", L == 0 || high_mask != nullptr,
                   "high_mask is null for a stream of ", L, " tokens, expected one entry per token");
    std::vector<std::int32_t> idx;
    for (std::int32_t t = 0; t < L; ++t)
      if (!high_mask[t] && ms.low_idx[static_cast<std::size_t>(t)] < 0) idx.push_back(t);
    demote_impl(s, layer, head, idx.data(), static_cast<std::int32_t>(idx.size()), low_pages, "apply_precision");
    return static_cast<std::int32_t>(idx.size());
  }

 public:

  /// Keeps tokens kept[0..n) of one stream (strictly increasing logical indices), evicting the
  /// rest from both precisions. Strong guarantee.
  void keep(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n) {
    seqs_.check_layer(layer, "keep");
    seqs_.check_head(head, "keep");
    KVC_EXPECTS_IN("kvc::mixed_precision_cache::keep", n >= 0, "n = ", n, ", expected >= 0 kept tokens");
    KVC_EXPECTS_IN("kvc::mixed_precision_cache::keep", n == 0 || kept != nullptr, "kept is null with n = ", n);
    std::vector<std::vector<std::int32_t>> one(static_cast<std::size_t>(config().num_kv_heads));
    std::vector<char> touched(one.size(), 0);
    one[static_cast<std::size_t>(head)].assign(kept, kept + n);
    touched[static_cast<std::size_t>(head)] = 1;
    keep_impl(s, layer, one, touched, "keep");
  }

  /// Keeps, for every head h of one layer, the tokens kept[h]. All heads change or none does.
  void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) {
    seqs_.check_layer(layer, "keep_layer");
    KVC_EXPECTS_IN("kvc::mixed_precision_cache::keep_layer", static_cast<std::int32_t>(kept.size()) == config().num_kv_heads,
                   "kept.size() = ", kept.size(),
                ", expected num_kv_heads = ", config().num_kv_heads);
    std::vector<char> touched(kept.size(), 1);
    keep_impl(s, layer, kept, touched, "keep_layer");
  }

  // ---- reading ---------------------------------------------------------------------------

  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const {
    return static_cast<std::int32_t>(seqs_.get(s, layer, head, "length").low_idx.size());
  }
  /// Original positions of the stream's tokens, in logical order.
  const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const {
    return seqs_.get(s, layer, head, "positions").pos.data();
  }
  std::int32_t seen(seq_id s, std::int32_t layer) const { return high_.seen(s, layer); }
  /// Whether token t of the stream is stored in low precision.
  bool is_low(seq_id s, std::int32_t layer, std::int32_t head, std::int32_t t) const {
    const mstream& ms = seqs_.get(s, layer, head, "is_low");
    KVC_EXPECTS_IN("kvc::mixed_precision_cache::is_low", t >= 0 && t < static_cast<std::int32_t>(ms.low_idx.size()),
                   "t = ", t, ", expected 0..",
                static_cast<std::int32_t>(ms.low_idx.size()) - 1);
    return ms.low_idx[static_cast<std::size_t>(t)] >= 0;
  }
  /// The low store's index of every token (-1: high precision), logical order.
  const std::vector<std::int32_t>& low_indices(seq_id s, std::int32_t layer, std::int32_t head) const {
    return seqs_.get(s, layer, head, "low_indices").low_idx;
  }
  /// The low store's (sequence, layer) of a stream, for kernels reading it directly.
  std::pair<seq_id, std::int32_t> low_stream(seq_id s, std::int32_t layer, std::int32_t head) const {
    seqs_.get(s, layer, head, "low_stream");
    return {seqs_.find(s, "low_stream").low, low_layer(layer, head)};
  }

  struct region_counts {
    std::int32_t sink, high, low, residual;  ///< full-precision sinks, high codes, low codes, full-precision window
  };
  region_counts regions(seq_id s, std::int32_t layer, std::int32_t head) const {
    const mstream& ms = seqs_.get(s, layer, head, "regions");
    const auto r = high_.regions(s, layer, head);
    const std::int32_t nl = static_cast<std::int32_t>(ms.low_idx.size()) - (r.sink + r.quantized + r.residual);
    return {r.sink, r.quantized, nl, r.residual};
  }

  /// All heads of one layer as decoded views (the encodings as accessors: the reference and any
  /// reader of views read both precisions through them). The result points into `buf`, which must
  /// outlive it and the stream's next change.
  layer_view layer(seq_id s, std::int32_t layer, layer_buffer& buf) const {
    const sequence& sq = seqs_.find(s, "layer");
    seqs_.check_layer(layer, "layer");
    const std::int32_t H = config().num_kv_heads, D = config().head_dim;
    buf.reset(H);
    buf.rows.resize(static_cast<std::size_t>(H));  // sized first: the views point into these
    for (std::int32_t h = 0; h < H; ++h) {
      const mstream& ms = seqs_.at(sq, layer, h);
      auto& rows = buf.rows[static_cast<std::size_t>(h)];
      rows.resize(ms.low_idx.size());
      std::int32_t hi = 0;
      for (std::size_t t = 0; t < rows.size(); ++t) rows[t] = ms.low_idx[t] >= 0 ? -1 - ms.low_idx[t] : hi++;
      const auto hv = high_.view(s, layer, h);
      const auto lv = low_.view(sq.low, low_layer(layer, h), 0);
      const std::int32_t n = static_cast<std::int32_t>(rows.size());
      buf.k.push_back(make_decoded_view(decoded_stream<quant::role::key>{&high_, &low_, hv, lv, rows.data()}, n, D));
      buf.v.push_back(make_decoded_view(decoded_stream<quant::role::value>{&high_, &low_, hv, lv, rows.data()}, n, D));
    }
    return {buf.heads(D), this, s, layer};
  }

  /// Dequantized keys and values of one stream, logical order, [length][head_dim] (either may be null).
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out = nullptr) const {
    const mstream& ms = seqs_.get(s, layer, head, "gather");
    const std::int32_t D = config().head_dim;
    const auto hv = high_.view(s, layer, head);
    const auto lv = low_.view(seqs_.find(s, "gather").low, low_layer(layer, head), 0);
    std::int32_t h = 0;
    for (std::size_t t = 0; t < ms.low_idx.size(); ++t) {
      const std::int32_t li = ms.low_idx[t];
      float* ko = k_out ? k_out + t * D : nullptr;
      float* vo = v_out ? v_out + t * D : nullptr;
      if (li >= 0) {
        if (ko) low_.template decode_token<quant::role::key>(lv, li, ko);
        if (vo) low_.template decode_token<quant::role::value>(lv, li, vo);
      } else {
        if (ko) high_.template decode_token<quant::role::key>(hv, h, ko);
        if (vo) high_.template decode_token<quant::role::value>(hv, h, vo);
        ++h;
      }
    }
  }

  // ---- memory accounting (from the pools) -------------------------------------------------

  /// Bytes of live pages in all pools of both precisions.
  std::size_t bytes_in_use() const noexcept { return high_.bytes_in_use() + low_.bytes_in_use(); }
  /// Bytes allocated and released by both stores since construction (see memory_traffic).
  memory_traffic traffic() const noexcept {
    memory_traffic t = high_.traffic();
    t += low_.traffic();
    return t;
  }
  std::size_t bytes_in_use(std::int32_t layer) const {
    seqs_.check_layer(layer, "bytes_in_use");
    std::size_t b = high_.bytes_in_use(layer);
    for (std::int32_t h = 0; h < config().num_kv_heads; ++h) b += low_.bytes_in_use(low_layer(layer, h));
    return b;
  }
  /// Bytes of the pages one stream references (shared pages counted in each sharer).
  std::size_t stream_bytes(seq_id s, std::int32_t layer, std::int32_t head) const {
    seqs_.get(s, layer, head, "stream_bytes");
    return high_.stream_bytes(s, layer, head) + low_.stream_bytes(seqs_.find(s, "stream_bytes").low,
                                                                  low_layer(layer, head), 0);
  }
  std::int64_t tokens_held() const noexcept { return high_.tokens_held() + low_.tokens_held(); }

 private:
  struct mstream {
    std::vector<std::int32_t> low_idx;  ///< per logical token: index in the low store, or -1 (high)
    std::vector<std::int32_t> pos;      ///< per logical token: original position
  };
  struct sequence {
    seq_id low;
    std::vector<mstream> streams;
  };

  static constexpr const char* kCtor = "kvc::mixed_precision_cache::mixed_precision_cache";

  static quant_cache_config low_config(const quant_cache_config& c, std::int32_t low_max_pages, const LQ& lq) {
    KVC_EXPECTS_IN(kCtor, low_max_pages >= 0, "low_max_pages = ", low_max_pages,
                   ", expected >= 0 (0: cache_config.max_pages)");
    KVC_EXPECTS_IN(kCtor, lq.residual() == 0, "the low codec has a residual window of ", lq.residual(),
                   " tokens, expected 0 (demoted tokens must be stored in low precision)");
    KVC_EXPECTS_IN(kCtor, c.num_layers > 0 && c.num_kv_heads > 0 &&
                    static_cast<std::int64_t>(c.num_layers) * c.num_kv_heads <= std::numeric_limits<std::int32_t>::max(),
                "cache_config.num_layers = ", c.num_layers, ", num_kv_heads = ", c.num_kv_heads, ", expected > 0");
    quant_cache_config l = c;
    l.num_layers = c.num_layers * c.num_kv_heads;  // one low "layer" per (layer, head)
    l.num_kv_heads = 1;
    l.max_pages = low_max_pages > 0 ? low_max_pages : c.max_pages;
    l.sink_tokens = 0;
    l.max_fp_pages = 1;
    return l;
  }

  std::size_t nstreams() const noexcept {
    return static_cast<std::size_t>(config().num_layers) * static_cast<std::size_t>(config().num_kv_heads);
  }
  std::int32_t low_layer(std::int32_t layer, std::int32_t head) const noexcept {
    return layer * config().num_kv_heads + head;
  }

  void check_low_reservation(const page_pool::reservation& r, const char* fn) const {
    if (r.pool() != &low_.quant_pool())
      detail::fail(detail::concat("kvc::mixed_precision_cache::", fn, ": low_pages = a reservation of ",
                                  r.pool() ? "another pool" : "no pool (empty or moved from)",
                                  ", expected one of the low-precision pool (reserve_low_pages)"));
  }

  template <class... Args>
  [[noreturn]] static void fail(const char* fn, std::int32_t head, const Args&... args) {
    detail::fail(detail::concat("kvc::mixed_precision_cache::", fn, ": head ", head, ": ", args...,
                                " (the cache is unchanged)"));
  }
  void keep_impl(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept,
                 const std::vector<char>& touched, const char* fn) {
    sequence& sq = seqs_.find(s, fn);
    const std::int32_t H = config().num_kv_heads;
    std::vector<std::vector<std::int32_t>> keep_high(static_cast<std::size_t>(H)), keep_low(keep_high.size());
    std::vector<mstream> next(static_cast<std::size_t>(H));
    std::int32_t shared_low_pages = 0;
    for (std::int32_t h = 0; h < H; ++h) {
      const mstream& ms = seqs_.at(sq, layer, h);
      const std::int32_t L = static_cast<std::int32_t>(ms.low_idx.size());
      auto& kh = keep_high[static_cast<std::size_t>(h)];
      auto& kl = keep_low[static_cast<std::size_t>(h)];
      if (!touched[static_cast<std::size_t>(h)]) {  // untouched head: keep everything of the high store
        kh.resize(static_cast<std::size_t>(high_.length(s, layer, h)));
        std::iota(kh.begin(), kh.end(), 0);
        continue;
      }
      const auto& k = kept[static_cast<std::size_t>(h)];
      std::vector<std::int32_t> hi(static_cast<std::size_t>(L));
      std::int32_t nh = 0;
      for (std::int32_t t = 0; t < L; ++t) hi[static_cast<std::size_t>(t)] = ms.low_idx[static_cast<std::size_t>(t)] < 0 ? nh++ : -1;
      mstream& nx = next[static_cast<std::size_t>(h)];
      for (std::size_t i = 0; i < k.size(); ++i) {
        if (k[i] < 0 || k[i] >= L)
          fail(fn, h, "kept[", i, "] = ", k[i], ", expected 0..", L - 1, " (the stream's length is ", L, ")");
        if (i > 0 && k[i] <= k[i - 1])
          fail(fn, h, "kept[", i, "] = ", k[i], " after ", k[i - 1], ", expected strictly increasing indices");
        const std::int32_t t = k[i];
        if (hi[static_cast<std::size_t>(t)] >= 0) kh.push_back(hi[static_cast<std::size_t>(t)]);
        else kl.push_back(ms.low_idx[static_cast<std::size_t>(t)]);
        nx.pos.push_back(ms.pos[static_cast<std::size_t>(t)]);
      }
      // new low index of a kept low token: its rank among the kept low indices
      std::vector<std::int32_t> sorted = kl;
      std::sort(sorted.begin(), sorted.end());
      nx.low_idx.reserve(k.size());
      for (std::int32_t t : k) {
        const std::int32_t li = ms.low_idx[static_cast<std::size_t>(t)];
        nx.low_idx.push_back(li < 0 ? -1
                                    : static_cast<std::int32_t>(std::lower_bound(sorted.begin(), sorted.end(), li) -
                                                                sorted.begin()));
      }
      kl.swap(sorted);
      for (page_id p : low_.pages(sq.low, low_layer(layer, h), 0))
        if (low_.quant_pool().ref_count(p) > 1) ++shared_low_pages;
    }
    // The low store's compaction can only need pages for shared (forked) pages it rewrites: set
    // that many aside before anything changes, so that no allocation of another thread (an
    // append to another sequence) can take them between this check and the commit below.
    page_pool::reservation low_pages;
    try {
      low_pages = low_.reserve_quant_pages(shared_low_pages);
    } catch (const out_of_memory& e) {
      detail::fail<out_of_memory>(detail::concat("kvc::mixed_precision_cache::", fn, ": the low-precision pool may need ",
                                                 shared_low_pages, " pages for copy-on-write and cannot set them "
                                                 "aside (the cache is unchanged): ", e.what()));
    }
    high_.keep_layer(s, layer, keep_high);
    // Commit: the low keeps take their copy-on-write pages from the reservation (at most one per
    // shared page counted above), so they cannot run out of pages.
    for (std::int32_t h = 0; h < H; ++h) {
      if (!touched[static_cast<std::size_t>(h)]) continue;
      const auto& kl = keep_low[static_cast<std::size_t>(h)];
      low_.keep(sq.low, low_layer(layer, h), 0, kl.data(), static_cast<std::int32_t>(kl.size()), low_pages);
      mstream& ms = seqs_.at(sq, layer, h);
      ms.low_idx.swap(next[static_cast<std::size_t>(h)].low_idx);
      ms.pos.swap(next[static_cast<std::size_t>(h)].pos);
    }
  }

  high_cache_type high_;
  low_cache_type low_;
  detail::sequence_table<sequence> seqs_{"kvc::mixed_precision_cache", high_.config().num_layers,
                                         high_.config().num_kv_heads};
};

KVC_END_NAMESPACE
