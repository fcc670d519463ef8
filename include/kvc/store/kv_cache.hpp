// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `kv_cache`: the paged KV store. Every (sequence, layer, kv-head) is its own *stream* of pages
/// with its own length and the original position of every token it keeps, so head-wise budgets
/// free real pages: a head that keeps 10% of its tokens holds 10% of the pages.
///
/// Page format (one stream, one page): [K: page_size x head_dim][V: page_size x head_dim] of T.
/// With `cache_config::key_bounds`, each stream also keeps [pages][min K, max K: head_dim] of T
/// beside its page table (Quest's page summaries, kvc/sparse/quest.hpp).
/// Every mutating call gives the strong guarantee: if it throws, the cache is exactly as before.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/store/page_pool.hpp>
#include <kvc/store/sequence_table.hpp>
#include <kvc/types.hpp>
#include <kvc/view/engine.hpp>
#include <kvc/view/heads.hpp>
#include <kvc/view/kv_view.hpp>
#include <kvc/view/layout_paged.hpp>

KVC_BEGIN_NAMESPACE

namespace detail {

/// out[i] = float(x[i]) for i < n; eight halves per F16C instruction when the CPU has it (chosen
/// at run time: this body is the same in every TU, docs/isa.md).
template <class T>
inline void to_float_n(const T* x, std::size_t n, float* out) noexcept {
  if constexpr (std::is_same<T, half>::value) {
    half_to_float_n(x, n, out);
  } else {
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
  }
}

}  // namespace detail

/// Shape and capacity of a cache.
struct cache_config {
  std::int32_t num_layers = 1;
  std::int32_t num_kv_heads = 1;
  std::int32_t head_dim = 128;
  /// Tokens per page, a power of two. 16 is vLLM's default block size; smaller pages waste
  /// less after eviction, larger ones cost fewer table lookups.
  std::int32_t page_size = 16;
  /// Pool capacity in pages (each page holds page_size tokens of K and V for one head).
  std::int32_t max_pages = 1 << 16;
  /// Reject NaN/Inf in appended K/V (one extra read of the input).
  bool check_finite = true;
  /// Keep the channel-wise min and max of every page's keys (2 x head_dim elements of T per page,
  /// 1/page_size of the K and V bytes: 6.25% at 16-token pages), exact through append, keep and
  /// fork. Quest's query-aware reads (kvc/sparse/quest.hpp) bound q.k per page with them. They
  /// live in one array per stream, not in the pages: a step reads every page's bounds, and
  /// bounds a page apart cost 1.9 ms against 0.9 ms contiguous for 16k pages (bench_quest's
  /// 32x8x128 at 32k tokens, fp16, 2026-12-05). metadata_bytes() counts them.
  bool key_bounds = false;
};

/// The pages and positions of one (sequence, layer, kv-head).
struct stream {
  std::vector<page_id> pages;
  std::vector<std::int32_t> positions;  ///< original position of every kept token
  std::int32_t length() const noexcept { return static_cast<std::int32_t>(positions.size()); }
};

/// \tparam T  element type of the pages: float, kvc::half or kvc::bfloat16
/// Threads: sequences are written and read concurrently, one thread per sequence; add/remove/fork are exclusive (docs/threading.md).
template <class T>
class kv_cache {
  static_assert(is_storage_float_v<T>,
                "kvc::kv_cache<T>: T must be float, kvc::half or kvc::bfloat16; quantized pages use "
                "the quantized caches in <kvc/quant/>");

 public:
  using value_type = T;
  using view_type = paged_view<const T, page_order::nhd>;
  using layer_view = stream_heads<view_type>;

  explicit kv_cache(const cache_config& cfg)
      : cfg_(validated(cfg)),
        pool_(2 * sizeof(T) * static_cast<std::size_t>(cfg.page_size) * static_cast<std::size_t>(cfg.head_dim),
              cfg.max_pages, cfg.num_layers) {}

  const cache_config& config() const noexcept { return cfg_; }
  const page_pool& pool() const noexcept { return pool_; }

  // ---- sequences -------------------------------------------------------------------------

  seq_id add_sequence() {
    sequence s;
    s.streams.resize(static_cast<std::size_t>(cfg_.num_layers) * cfg_.num_kv_heads);
    s.seen.assign(static_cast<std::size_t>(cfg_.num_layers), 0);
    if (cfg_.key_bounds) s.bounds.resize(s.streams.size());
    return seqs_.add(std::move(s));
  }

  /// Frees every page the sequence holds (shared pages stay while other sequences use them).
  void remove_sequence(seq_id s) {
    for (auto& st : seqs_.find(s, "remove_sequence").streams)
      pool_.release(static_cast<std::int32_t>(st.pages.size()), st.pages.data());
    seqs_.erase(s);
  }

  bool contains(seq_id s) const noexcept { return seqs_.contains(s); }
  std::size_t num_sequences() const noexcept { return seqs_.size(); }

  /// A new sequence sharing all of s's pages; the first write to a shared page copies it.
  seq_id fork(seq_id s) {
    const sequence& src = seqs_.find(s, "fork");
    const seq_id id = seqs_.add(src);  // may throw; nothing retained yet
    for (const auto& st : src.streams) pool_.retain(static_cast<std::int32_t>(st.pages.size()), st.pages.data());
    return id;
  }

  // ---- writing ---------------------------------------------------------------------------

  /// Appends n tokens to every kv-head of one layer (a decode step when n == 1, a prefill chunk
  /// otherwise).
  /// \param k,v        [n][num_kv_heads][head_dim], float or T
  /// \param positions  [n] original positions, or null for the layer's next positions
  template <class In>
  void append(seq_id s, std::int32_t layer, const In* k, const In* v, std::int32_t n,
              const std::int32_t* positions = nullptr) {
    static_assert(std::is_same<In, float>::value || std::is_same<In, T>::value,
                  "kvc::kv_cache::append: K/V input must be float or the cache's element type");
    sequence& sq = seqs_.find(s, "append");
    seqs_.check_layer(layer, "append");
    KVC_EXPECTS_IN("kvc::kv_cache::append", n >= 0, "n = ", n, ", expected >= 0 tokens");
    if (n == 0) return;
    KVC_EXPECTS_IN("kvc::kv_cache::append", k != nullptr && v != nullptr, "k or v is null with n = ", n);
    const std::int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim, P = cfg_.page_size;
    if (cfg_.check_finite) {
      check_finite(k, static_cast<std::size_t>(n) * H * D, "k");
      check_finite(v, static_cast<std::size_t>(n) * H * D, "v");
    }
    // Plan: how many pages each head needs, including copies of shared pages we would write.
    // The copy decisions are made here once and replayed below: a forked sibling on another
    // thread may drop its share in between, and re-asking ref_count would then leave a fresh
    // page unused and leaked (docs/threading.md).
    std::int32_t need = 0;
    std::vector<unsigned char> copy_last(static_cast<std::size_t>(H), 0);
    for (std::int32_t h = 0; h < H; ++h) {
      const stream& st = seqs_.at(sq, layer, h);
      const std::int32_t L = st.length();
      need += pages_for(L + n) - static_cast<std::int32_t>(st.pages.size());
      if (L % P != 0 && pool_.ref_count(st.pages.back()) > 1) copy_last[static_cast<std::size_t>(h)] = 1, ++need;
    }
    for (std::int32_t h = 0; h < H; ++h) {  // capacity first: a bad_alloc here changes nothing
      stream& st = seqs_.at(sq, layer, h);
      st.pages.reserve(static_cast<std::size_t>(pages_for(st.length() + n)));
      st.positions.reserve(static_cast<std::size_t>(st.length() + n));
      if (cfg_.key_bounds)
        bounds_of(sq, layer, h).reserve(static_cast<std::size_t>(pages_for(st.length() + n)) * 2 * D);
    }
    std::vector<page_id> fresh(static_cast<std::size_t>(need));
    pool_.allocate(need, fresh.data(), layer);  // all or nothing
    // Commit: nothing below throws.
    std::size_t next = 0;
    const std::int32_t first_pos = sq.seen[layer];
    for (std::int32_t h = 0; h < H; ++h) {
      stream& st = seqs_.at(sq, layer, h);
      std::int32_t L = st.length();
      if (copy_last[static_cast<std::size_t>(h)]) {
        const page_id copy = fresh[next++];
        std::memcpy(pool_.data(copy), pool_.data(st.pages.back()), pool_.page_bytes());
        pool_.release(st.pages.back());
        st.pages.back() = copy;
      }
      for (std::int32_t i = 0; i < n; ++i, ++L) {
        if (L % P == 0) st.pages.push_back(fresh[next++]);
        T* page = page_data(st.pages.back());
        const std::int32_t slot = L % P;
        store_row(page + static_cast<std::size_t>(slot) * D, k + (static_cast<std::size_t>(i) * H + h) * D);
        store_row(page + static_cast<std::size_t>(P + slot) * D, v + (static_cast<std::size_t>(i) * H + h) * D);
        if (cfg_.key_bounds) {
          auto& b = bounds_of(sq, layer, h);
          b.resize(st.pages.size() * 2 * D);  // within the capacity reserved above: no allocation
          fold_key_bounds(b.data() + (st.pages.size() - 1) * 2 * D, page, slot, slot + 1);
        }
        st.positions.push_back(positions ? positions[i] : first_pos + i);
      }
    }
    sq.seen[layer] += n;
  }

  /// Keeps tokens kept[0..n) of one stream (indices into its current order, strictly increasing)
  /// and frees the pages this empties.
  void keep(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n) {
    seqs_.check_layer(layer, "keep");
    seqs_.check_head(head, "keep");
    KVC_EXPECTS_IN("kvc::kv_cache::keep", n >= 0, "n = ", n, ", expected >= 0 kept tokens");
    KVC_EXPECTS_IN("kvc::kv_cache::keep", n == 0 || kept != nullptr, "kept is null with n = ", n);
    std::vector<std::pair<std::int32_t, std::vector<std::int32_t>>> one;
    one.emplace_back(head, std::vector<std::int32_t>(kept, kept + n));
    keep_heads(s, layer, one);
  }

  /// Keeps, for every head h of one layer, the tokens kept[h] (strictly increasing indices).
  /// All heads change or none does.
  void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) {
    seqs_.check_layer(layer, "keep_layer");
    KVC_EXPECTS_IN("kvc::kv_cache::keep_layer", static_cast<std::int32_t>(kept.size()) == cfg_.num_kv_heads,
                   "kept.size() = ", kept.size(),
                   ", expected num_kv_heads = ", cfg_.num_kv_heads);
    std::vector<std::pair<std::int32_t, std::vector<std::int32_t>>> all;
    all.reserve(kept.size());
    for (std::int32_t h = 0; h < cfg_.num_kv_heads; ++h) all.emplace_back(h, kept[static_cast<std::size_t>(h)]);
    keep_heads(s, layer, all);
  }

  /// Forgets the newest tokens of one layer: every head drops the tokens whose position is >= n,
  /// and the layer's `seen` becomes n, so the next append (positions not given) continues at n.
  /// What speculative and assisted decoding need after a rejected draft (`crop` in transformers).
  /// Tokens already evicted stay evicted. With positions given to append in order (or none),
  /// the dropped tokens are a suffix, so no row moves and no page is allocated: it cannot fail
  /// once its arguments are checked (0 <= n <= seen), and a page shared with a fork is only
  /// released. Throws kvc::error on a bad argument, leaving the cache unchanged.
  void rewind(seq_id s, std::int32_t layer, std::int32_t n) {
    seqs_.check_layer(layer, "rewind");
    sequence& sq = seqs_.find(s, "rewind");
    const std::int32_t seen = sq.seen[static_cast<std::size_t>(layer)];
    KVC_EXPECTS_IN("kvc::kv_cache::rewind", n >= 0 && n <= seen, "n = ", n, ", expected 0..", seen,
                   " (the tokens layer ", layer, " has seen)");
    keep_heads(s, layer, seqs_.tokens_before(sq, layer, n));
    sq.seen[static_cast<std::size_t>(layer)] = n;
  }

  /// Makes layer `layer` of sequence s hold what layer `from` holds, by reference: each kv head's
  /// stream takes from's page table, positions and key bounds, every page gains a reference, and
  /// the layer's own pages are released. No page is allocated or copied, so the shared pages are
  /// counted once in bytes_in_use(), and in bytes_in_use(l) of the layer l that allocated them
  /// (from, unless from took them from another layer). The first write to a shared page from
  /// either layer (an append into a partial last page, a keep that moves rows, rewrite_keys)
  /// copies it, as after fork, so the layers stay independent; decode attention reads the pages
  /// in place. For cross-layer methods, where a layer attends
  /// with another layer's keys and values. The layer's `seen` becomes from's.
  /// Throws kvc::error on a bad argument (unknown s, a layer out of range, layer == from) and
  /// std::bad_alloc while copying the tables, leaving the cache unchanged either way.
  void share_layer(seq_id s, std::int32_t layer, std::int32_t from) {
    sequence& sq = seqs_.find_share(s, layer, from, "share_layer");
    const std::int32_t H = cfg_.num_kv_heads;
    // Copies first: a bad_alloc here changes nothing. The commit below cannot throw.
    std::vector<stream> tables = seqs_.copy_layer(sq.streams, from);
    std::vector<std::vector<T>> bounds(cfg_.key_bounds ? static_cast<std::size_t>(H) : 0);
    for (std::int32_t h = 0; cfg_.key_bounds && h < H; ++h) bounds[static_cast<std::size_t>(h)] = bounds_of(sq, from, h);
    for (const stream& st : tables)  // retain before release: a page both layers hold stays live
      pool_.retain(static_cast<std::int32_t>(st.pages.size()), st.pages.data());
    for (std::int32_t h = 0; h < H; ++h) {
      stream& st = seqs_.at(sq, layer, h);
      pool_.release(static_cast<std::int32_t>(st.pages.size()), st.pages.data());
      st = std::move(tables[static_cast<std::size_t>(h)]);
      if (cfg_.key_bounds) bounds_of(sq, layer, h).swap(bounds[static_cast<std::size_t>(h)]);
    }
    sq.seen[static_cast<std::size_t>(layer)] = sq.seen[static_cast<std::size_t>(from)];
  }

  /// Overwrites the stored keys of one stream (used to re-rotate kept keys to new RoPE
  /// positions). `fn(std::int32_t token, T* row)` edits a copy of one row; positions are replaced
  /// by new_positions when it is not null. All or nothing: shared pages are allocated first, fn
  /// runs on copies, and the pages change only once every row is done, so a throwing fn or a
  /// failed allocation leaves the stream as it was.
  template <class Fn>
  void rewrite_keys(seq_id s, std::int32_t layer, std::int32_t head, Fn&& fn,
                    const std::int32_t* new_positions = nullptr) {
    const stream& st = seqs_.get(s, layer, head, "rewrite_keys");
    std::vector<std::pair<std::int32_t, std::vector<std::int32_t>>> one;
    one.emplace_back(head, std::vector<std::int32_t>(static_cast<std::size_t>(st.length())));
    std::iota(one[0].second.begin(), one[0].second.end(), 0);
    std::vector<std::vector<std::int32_t>> pos;
    if (new_positions) pos.emplace_back(new_positions, new_positions + st.length());
    auto per_head = [&fn](std::int32_t, std::int32_t t, T* row) { fn(t, row); };
    keep_heads(s, layer, one, &per_head, new_positions ? &pos : nullptr);
  }

  /// keep_layer, then every kept key rewritten, as one all-or-nothing step (StreamingLLM's
  /// re-rotation after eviction): `fn(std::int32_t head, std::int32_t i, T* row)` edits a copy of
  /// kept token i of head h (its row as stored before the call); new_positions[h], when given,
  /// replaces the positions of head h (kept[h].size() entries each).
  template <class Fn>
  void keep_layer_rewrite_keys(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept,
                               Fn&& fn, const std::vector<std::vector<std::int32_t>>* new_positions = nullptr) {
    seqs_.check_layer(layer, "keep_layer_rewrite_keys");
    KVC_EXPECTS(static_cast<std::int32_t>(kept.size()) == cfg_.num_kv_heads, "kept.size() = ", kept.size(),
                ", expected num_kv_heads = ", cfg_.num_kv_heads);
    KVC_EXPECTS(!new_positions || new_positions->size() == kept.size(), "new_positions->size() = ",
                new_positions ? new_positions->size() : 0, ", expected num_kv_heads = ", cfg_.num_kv_heads);
    for (std::size_t h = 0; new_positions && h < kept.size(); ++h)
      KVC_EXPECTS((*new_positions)[h].size() == kept[h].size(), "new_positions[", h, "].size() = ",
                  (*new_positions)[h].size(), ", expected kept[", h, "].size() = ", kept[h].size());
    std::vector<std::pair<std::int32_t, std::vector<std::int32_t>>> all;
    all.reserve(kept.size());
    for (std::int32_t h = 0; h < cfg_.num_kv_heads; ++h) all.emplace_back(h, kept[static_cast<std::size_t>(h)]);
    keep_heads(s, layer, all, &fn, new_positions);
  }

  /// keep_layer, then every kept token's key AND value rewritten, as one all-or-nothing step
  /// (the commit of token merging, kvc/store/merged_cache.hpp): `fn(std::int32_t head,
  /// std::int32_t i, T* k_row, T* v_row)` edits copies of kept token i of head h (its rows as
  /// stored before the call; every fn call sees the original rows, never an edited one). Positions
  /// follow the kept tokens. A throwing fn or a failed allocation leaves the cache as it was;
  /// shared (forked) pages are copied, never written through.
  /// \param rows  when not null, rows[h] lists the kept indices i (strictly increasing, 0..
  ///   kept[h].size()-1) fn is called for; the other kept rows are only compacted. A merge that
  ///   changes a few rows then copies and writes those rows alone, and a shared page is copied
  ///   only if a row of it moves or is rewritten (CaM evicting one token per step: bench_merge).
  template <class Fn>
  void keep_layer_rewrite(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept, Fn&& fn,
                          const std::vector<std::vector<std::int32_t>>* rows = nullptr) {
    seqs_.check_layer(layer, "keep_layer_rewrite");
    const auto all = seqs_.rewrite_heads("kvc::kv_cache::keep_layer_rewrite", kept, rows);
    keep_heads<true>(s, layer, all, &fn, nullptr, rows);
  }

  // ---- reading ---------------------------------------------------------------------------

  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const {
    return seqs_.get(s, layer, head, "length").length();
  }
  const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const {
    return seqs_.get(s, layer, head, "positions").positions.data();
  }
  /// Tokens ever appended to this layer of the sequence (kept or not).
  std::int32_t seen(seq_id s, std::int32_t layer) const {
    seqs_.check_layer(layer, "seen");
    return seqs_.find(s, "seen").seen[static_cast<std::size_t>(layer)];
  }
  /// How many of the next `limit` tokens may be appended in one call and attended together
  /// (kvc::cpu::prefill_attention) as appending and attending them one at a time would: all of
  /// them, since a stored token never changes form (quant_cache's residual windows do).
  std::int32_t chunk_tokens(seq_id s, std::int32_t layer, std::int32_t limit) const {
    seqs_.check_layer(layer, "chunk_tokens");
    (void)seqs_.find(s, "chunk_tokens");
    KVC_EXPECTS_IN("kvc::kv_cache::chunk_tokens", limit >= 0, "limit = ", limit, ", expected >= 0 tokens");
    return limit;
  }
  const std::vector<page_id>& pages(seq_id s, std::int32_t layer, std::int32_t head) const {
    return seqs_.get(s, layer, head, "pages").pages;
  }

  /// K of one stream as a paged view (heads = 1).
  view_type keys(seq_id s, std::int32_t layer, std::int32_t head) const {
    return stream_view(seqs_.get(s, layer, head, "keys"), 0);
  }
  /// V of one stream as a paged view (heads = 1).
  view_type values(seq_id s, std::int32_t layer, std::int32_t head) const {
    return stream_view(seqs_.get(s, layer, head, "values"), cfg_.page_size * cfg_.head_dim);
  }

  /// Whether every stream keeps the min and max of each page's keys (cache_config::key_bounds).
  bool has_key_bounds() const noexcept { return cfg_.key_bounds; }
  /// The key bounds of one stream, [pages][2][head_dim]: for page i of pages(s, layer, head), the
  /// channel-wise min, then max, over the keys it holds. Only with key_bounds.
  const T* key_bounds(seq_id s, std::int32_t layer, std::int32_t head) const {
    KVC_EXPECTS_IN("kvc::kv_cache::key_bounds", cfg_.key_bounds,
                   "the cache was built with cache_config.key_bounds = false, expected true (pages carry no bounds)");
    (void)seqs_.get(s, layer, head, "key_bounds");
    const sequence& sq = seqs_.find(s, "key_bounds");
    return sq.bounds[static_cast<std::size_t>(layer) * cfg_.num_kv_heads + head].data();
  }
  /// K (V) of the tokens that the pages of `table` hold, in that order, heads = 1: token t reads
  /// page table[t / page_size]. A read over a subset of a stream's pages (Quest): every page but
  /// the last must be full. The view points into `table`, which must outlive it.
  view_type page_keys(const page_id* table, std::int32_t length) const {
    check_table(table, length, "page_keys");
    return table_view(table, length, 0);
  }
  view_type page_values(const page_id* table, std::int32_t length) const {
    check_table(table, length, "page_values");
    return table_view(table, length, cfg_.page_size * cfg_.head_dim);
  }

  /// Copies one stream's keys (and values, when v_out is not null) as float, [length][head_dim]:
  /// what scorers and the re-encoding of other caches read.
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out = nullptr) const {
    const stream& st = seqs_.get(s, layer, head, "gather");
    const std::int32_t P = cfg_.page_size, D = cfg_.head_dim;
    // A page's K rows are contiguous (then its V rows), so each is one run of P * D elements.
    // Converting whole runs instead of testing k_out/v_out per element made R-KV's key gather
    // 2-3x faster (bench_evict rkv_h2o, fp16, 2026-11).
    for (std::int32_t t0 = 0; t0 < st.length(); t0 += P) {
      const T* page = reinterpret_cast<const T*>(pool_.data(st.pages[static_cast<std::size_t>(t0 / P)]));
      const std::size_t len = static_cast<std::size_t>(std::min(P, st.length() - t0)) * D;
      const std::size_t at = static_cast<std::size_t>(t0) * D;
      if (k_out) detail::to_float_n(page, len, k_out + at);
      if (v_out) detail::to_float_n(page + static_cast<std::size_t>(P) * D, len, v_out + at);
    }
  }

  /// All heads of one layer, for the attention kernels. The returned object points into `buf`,
  /// which must hold 2 * num_kv_heads views and outlive it.
  layer_view layer(seq_id s, std::int32_t layer, std::vector<view_type>& buf) const {
    const sequence& sq = seqs_.find(s, "layer");
    seqs_.check_layer(layer, "layer");
    const std::int32_t H = cfg_.num_kv_heads;
    buf.clear();
    buf.reserve(static_cast<std::size_t>(2 * H));
    for (std::int32_t h = 0; h < H; ++h) buf.push_back(stream_view(seqs_.at(sq, layer, h), 0));
    for (std::int32_t h = 0; h < H; ++h) buf.push_back(stream_view(seqs_.at(sq, layer, h), cfg_.page_size * cfg_.head_dim));
    return {buf.data(), buf.data() + H, H, cfg_.head_dim};
  }

  // ---- memory accounting (from the pool) -------------------------------------------------

  /// Bytes of live pages in the whole cache (each shared page counted once).
  std::size_t bytes_in_use() const noexcept { return pool_.bytes_in_use(); }
  /// Bytes of live pages allocated for one layer. A page share_layer gave another layer stays
  /// counted here, in the layer that allocated it, while any layer holds it.
  std::size_t bytes_in_use(std::int32_t layer) const {
    seqs_.check_layer(layer, "bytes_in_use");
    return pool_.bytes_in_use(layer);
  }
  /// Bytes of the pages one stream references (shared pages counted in each sharer).
  std::size_t stream_bytes(seq_id s, std::int32_t layer, std::int32_t head) const {
    return seqs_.get(s, layer, head, "stream_bytes").pages.size() * pool_.page_bytes();
  }
  /// Pool bytes allocated and released since construction (see memory_traffic).
  memory_traffic traffic() const noexcept { return pool_.traffic(); }
  /// Host bytes of bookkeeping: 4 bytes of position per kept token plus 4 per page-table entry,
  /// plus the key bounds (2 x head_dim elements per page) with cache_config::key_bounds.
  std::size_t metadata_bytes() const noexcept {
    std::size_t b = seqs_.template sum_streams<std::size_t>(
        [](const stream& st) { return 4 * (st.positions.size() + st.pages.size()); });
    for (const auto& kv : seqs_)
      for (const auto& kb : kv.second.bounds) b += sizeof(T) * kb.size();
    return b;
  }
  /// Tokens held in all streams of all sequences (sum of the streams' own lengths).
  std::int64_t tokens_held() const noexcept {
    return seqs_.template sum_streams<std::int64_t>([](const stream& st) { return st.length(); });
  }

 private:
  struct sequence {
    std::vector<stream> streams;     // [layer * num_kv_heads + head]
    std::vector<std::int32_t> seen;  // [layer]
    std::vector<std::vector<T>> bounds;  // [layer * num_kv_heads + head][page][2][head_dim]; key_bounds only
  };

  static cache_config validated(const cache_config& c) {
    KVC_EXPECTS_IN("kvc::kv_cache::kv_cache", c.num_layers > 0, "cache_config.num_layers = ", c.num_layers,
                   ", expected > 0");
    KVC_EXPECTS_IN("kvc::kv_cache::kv_cache", c.num_kv_heads > 0, "cache_config.num_kv_heads = ", c.num_kv_heads,
                   ", expected > 0");
    KVC_EXPECTS_IN("kvc::kv_cache::kv_cache", c.head_dim > 0, "cache_config.head_dim = ", c.head_dim, ", expected > 0");
    KVC_EXPECTS_IN("kvc::kv_cache::kv_cache", detail::is_pow2(c.page_size), "cache_config.page_size = ", c.page_size,
                   ", expected a power of two");
    KVC_EXPECTS_IN("kvc::kv_cache::kv_cache", c.max_pages > 0, "cache_config.max_pages = ", c.max_pages,
                   ", expected > 0");
    return c;
  }

  std::int32_t pages_for(std::int32_t tokens) const noexcept {
    return (tokens + cfg_.page_size - 1) / cfg_.page_size;
  }
  T* page_data(page_id p) noexcept { return reinterpret_cast<T*>(pool_.data(p)); }

  view_type stream_view(const stream& st, std::int32_t offset) const {
    return table_view(st.pages.data(), st.length(), offset);
  }
  view_type table_view(const page_id* table, std::int32_t length, std::int32_t offset) const {
    using M = typename view_type::mapping_type;
    const std::int32_t P = cfg_.page_size, D = cfg_.head_dim;
    const T* base = reinterpret_cast<const T*>(pool_.base());
    static_assert(page_pool::alignment % sizeof(T) == 0, "page alignment must hold whole elements");
    return {base, M(kv_dextents<>(length, 1, D), table, P, static_cast<std::int32_t>(pool_.page_bytes() / sizeof(T)),
                    offset)};
  }

  std::vector<T>& bounds_of(sequence& sq, std::int32_t layer, std::int32_t h) noexcept {
    return sq.bounds[static_cast<std::size_t>(layer) * cfg_.num_kv_heads + h];
  }

  /// Folds key rows [from, to) of a page into its bounds lo = [min: D][max: D]
  /// (cache_config::key_bounds); from == 0 starts them afresh from row 0. A bound is a stored
  /// element, so it is exact in T.
  void fold_key_bounds(T* lo, const T* page, std::int32_t from, std::int32_t to) noexcept {
    const std::size_t D = static_cast<std::size_t>(cfg_.head_dim);
    T* hi = lo + D;
    if (from == 0) {
      std::memcpy(lo, page, sizeof(T) * D);
      std::memcpy(hi, page, sizeof(T) * D);
      from = 1;
    }
    for (std::int32_t r = from; r < to; ++r) {
      const T* row = page + static_cast<std::size_t>(r) * D;
      for (std::size_t d = 0; d < D; ++d) {
        const float x = static_cast<float>(row[d]);
        if (x < static_cast<float>(lo[d])) lo[d] = row[d];
        if (x > static_cast<float>(hi[d])) hi[d] = row[d];
      }
    }
  }

  template <class In>
  void store_row(T* dst, const In* src) const noexcept {
    if constexpr (std::is_same<In, T>::value) {
      std::memcpy(dst, src, sizeof(T) * static_cast<std::size_t>(cfg_.head_dim));
    } else if constexpr (std::is_same<T, half>::value) {
      detail::float_to_half_n(src, static_cast<std::size_t>(cfg_.head_dim), dst);  // F16C when the CPU has it
    } else {
      for (std::int32_t d = 0; d < cfg_.head_dim; ++d) dst[d] = T(src[d]);
    }
  }

  template <class In>
  static void check_finite(const In* p, std::size_t n, const char* name) {
    for (std::size_t i = 0; i < n; ++i) {
      const float x = static_cast<float>(p[i]);
      if (!std::isfinite(x))
        detail::fail(detail::concat("kvc::kv_cache::append: ", name, "[", i, "] = ", x,
                                    ", expected a finite value (the cache is unchanged)"));
    }
  }

  void check_table(const page_id* table, std::int32_t length, const char* fn) const {
    KVC_EXPECTS_IN(detail::concat("kvc::kv_cache::", fn).c_str(), length >= 0, "length = ", length,
                   ", expected >= 0 tokens");
    KVC_EXPECTS_IN(detail::concat("kvc::kv_cache::", fn).c_str(), length == 0 || table != nullptr,
                   "table is null with length = ", length);
    for (std::int32_t i = 0; i < pages_for(length); ++i)
      KVC_EXPECTS_IN(detail::concat("kvc::kv_cache::", fn).c_str(), table[i] >= 0 && table[i] < pool_.capacity(),
                     "table[", i, "] = ", table[i], ", expected a page id 0..", pool_.capacity() - 1);
  }

  /// No key rewrite: keep only.
  struct no_rewrite {
    void operator()(std::int32_t, std::int32_t, T*) const noexcept {}
  };

  /// The one compaction routine (keep, keep_layer, rewrite_keys, keep_layer_rewrite_keys,
  /// keep_layer_rewrite); rewrite_pos, when given, has one position vector per element of `heads`:
  /// plan (validate, count the pages to copy, take every buffer) -> allocate (all pages at once)
  /// -> rewrite keys (and values when Values) into copies (the caller's fn may throw: the fresh
  /// pages go back and nothing else has changed) -> commit (nothing throws).
  /// Values = false: fn(head, i, k_row); Values = true: fn(head, i, k_row, v_row).
  /// rows, when given (one list per element of `heads`, checked by the caller), limits the rewrite
  /// to those kept indices; null: every kept row. One flag, not
  /// a second routine, so the key-only callers keep their exact code path and the plan/commit
  /// logic (copy-on-write, release order) exists once.
  template <bool Values = false, class Fn = const no_rewrite>
  void keep_heads(seq_id s, std::int32_t layer,
                  const std::vector<std::pair<std::int32_t, std::vector<std::int32_t>>>& heads, Fn* rewrite = nullptr,
                  const std::vector<std::vector<std::int32_t>>* rewrite_pos = nullptr,
                  const std::vector<std::vector<std::int32_t>>* rows = nullptr) {
    sequence& sq = seqs_.find(s, "keep");
    const std::int32_t P = cfg_.page_size, D = cfg_.head_dim;
    // Validate everything and plan the fresh pages before touching anything.
    std::int32_t need = 0;
    std::vector<std::vector<std::int32_t>> new_pos(heads.size());
    std::vector<std::vector<page_id>> old(heads.size());  // reads must see the original pages
    std::vector<std::vector<T>> keys(rewrite ? heads.size() : 0);  // rewritten kept keys [n][D]
    std::vector<std::vector<T>> vals(rewrite && Values ? heads.size() : 0);  // rewritten kept values [n][D]
    std::vector<std::vector<unsigned char>> copy(heads.size());  // [head][page]: copy before writing
    std::vector<std::vector<std::int32_t>> sel(rewrite ? heads.size() : 0);  // kept indices to rewrite
    std::vector<std::vector<unsigned char>> touched(heads.size());  // [head][page]: a row is rewritten
    for (std::size_t j = 0; j < heads.size(); ++j) {
      const std::int32_t h = heads[j].first;
      const auto& kept = heads[j].second;
      const stream& st = seqs_.at(sq, layer, h);
      const std::int32_t L = st.length();
      for (std::size_t i = 0; i < kept.size(); ++i) {
        if (kept[i] < 0 || kept[i] >= L)
          detail::fail(detail::concat("kvc::kv_cache::keep: head ", h, ": kept[", i, "] = ", kept[i],
                                      ", expected 0..", L - 1, " (the stream's length is ", L, ")"));
        if (i > 0 && kept[i] <= kept[i - 1])
          detail::fail(detail::concat("kvc::kv_cache::keep: head ", h, ": kept[", i, "] = ", kept[i],
                                      " after ", kept[i - 1], ", expected strictly increasing indices"));
      }
      const std::int32_t n = static_cast<std::int32_t>(kept.size());
      touched[j].assign(static_cast<std::size_t>(pages_for(n)), 0);
      if (rewrite) {
        if (rows) {
          sel[j] = (*rows)[j];
        } else {
          sel[j].resize(kept.size());
          std::iota(sel[j].begin(), sel[j].end(), 0);
        }
        for (std::int32_t i : sel[j]) touched[j][static_cast<std::size_t>(i / P)] = 1;
      }
      copy[j].assign(static_cast<std::size_t>(pages_for(n)), 0);
      for (std::int32_t pg = 0; pg < pages_for(n); ++pg)
        if ((touched[j][static_cast<std::size_t>(pg)] || page_changes(kept, pg)) &&
            pool_.ref_count(st.pages[static_cast<std::size_t>(pg)]) > 1)
          copy[j][static_cast<std::size_t>(pg)] = 1, ++need;
      old[j] = st.pages;
      if (rewrite_pos) {
        const auto& np = (*rewrite_pos)[j];  // one entry per element of `heads`
        KVC_ASSERT(np.size() == kept.size());  // checked by the public calls
        new_pos[j] = np;
      } else {
        new_pos[j].resize(kept.size());
        for (std::size_t i = 0; i < kept.size(); ++i) new_pos[j][i] = st.positions[static_cast<std::size_t>(kept[i])];
      }
      if (rewrite) keys[j].resize(sel[j].size() * static_cast<std::size_t>(D));
      if (rewrite && Values) vals[j].resize(sel[j].size() * static_cast<std::size_t>(D));
    }
    std::vector<page_id> unshared;  // before allocate: a bad_alloc must leave nothing taken
    unshared.reserve(static_cast<std::size_t>(need));
    std::size_t most_pages = 0;
    for (const auto& c : copy) most_pages = std::max(most_pages, c.size());
    std::vector<unsigned char> bounds_stale(cfg_.key_bounds ? most_pages : 0, 0);  // [page] of one head
    std::vector<page_id> fresh(static_cast<std::size_t>(need));
    pool_.allocate(need, fresh.data(), layer);
    if (rewrite) {
      try {
        for (std::size_t j = 0; j < heads.size(); ++j) {
          const auto& kept = heads[j].second;
          for (std::size_t x = 0; x < sel[j].size(); ++x) {
            const std::size_t i = static_cast<std::size_t>(sel[j][x]);
            T* row = keys[j].data() + x * static_cast<std::size_t>(D);
            const std::int32_t t = kept[i];
            const T* src = page_data(old[j][static_cast<std::size_t>(t / P)]);
            std::memcpy(row, src + static_cast<std::size_t>(t % P) * D, sizeof(T) * D);
            if constexpr (Values) {
              T* vrow = vals[j].data() + x * static_cast<std::size_t>(D);
              std::memcpy(vrow, src + static_cast<std::size_t>(P + t % P) * D, sizeof(T) * D);
              (*rewrite)(heads[j].first, static_cast<std::int32_t>(i), row, vrow);
            } else {
              (*rewrite)(heads[j].first, static_cast<std::int32_t>(i), row);
            }
          }
        }
      } catch (...) {
        pool_.release(need, fresh.data());
        throw;
      }
    }
    // Commit: forward compaction is safe in place because kept[i] >= i, so a source row is never
    // read after its slot has been overwritten.
    // Shared pages replaced by copies are released only after every row has been read from
    // them: a forked sibling on another thread may drop its share meanwhile, and a page released
    // early could be reallocated and overwritten while still read here.
    std::size_t next = 0;
    for (std::size_t j = 0; j < heads.size(); ++j) {
      const auto& kept = heads[j].second;
      stream& st = seqs_.at(sq, layer, heads[j].first);
      const std::int32_t n = static_cast<std::int32_t>(kept.size());
      const std::int32_t L = st.length();
      for (std::int32_t pg = 0; pg < pages_for(n); ++pg) {
        // A page that keeps its rows but loses the ones after them still needs new bounds.
        if (cfg_.key_bounds && std::min(P, L - pg * P) != std::min(P, n - pg * P))
          bounds_stale[static_cast<std::size_t>(pg)] = 1;
        if (!touched[j][static_cast<std::size_t>(pg)] && !page_changes(kept, pg)) continue;
        if (cfg_.key_bounds) bounds_stale[static_cast<std::size_t>(pg)] = 1;
        page_id dst = st.pages[static_cast<std::size_t>(pg)];
        if (copy[j][static_cast<std::size_t>(pg)]) {
          const page_id fresh_page = fresh[next++];
          unshared.push_back(dst);  // released below; contents stay readable via `old`
          st.pages[static_cast<std::size_t>(pg)] = fresh_page;
          dst = fresh_page;
        }
        T* out = page_data(dst);
        const std::int32_t end = std::min(n, (pg + 1) * P);
        for (std::int32_t i = pg * P; i < end; ++i) {
          const std::int32_t src_t = kept[static_cast<std::size_t>(i)];
          const T* src = page_data(old[j][static_cast<std::size_t>(src_t / P)]);
          const std::int32_t ss = src_t % P, ds = i % P;
          if (src == out && ss == ds) continue;
          std::memmove(out + static_cast<std::size_t>(ds) * D, src + static_cast<std::size_t>(ss) * D, sizeof(T) * D);
          std::memmove(out + static_cast<std::size_t>(P + ds) * D, src + static_cast<std::size_t>(P + ss) * D,
                       sizeof(T) * D);
        }
      }
      if (rewrite)
        for (std::size_t x = 0; x < sel[j].size(); ++x) {
          const std::int32_t i = sel[j][x];
          T* page = page_data(st.pages[static_cast<std::size_t>(i / P)]);
          std::memcpy(page + static_cast<std::size_t>(i % P) * D, keys[j].data() + x * D, sizeof(T) * D);
          if constexpr (Values)
            std::memcpy(page + static_cast<std::size_t>(P + i % P) * D, vals[j].data() + x * D, sizeof(T) * D);
        }
      if (cfg_.key_bounds) {
        auto& b = bounds_of(sq, layer, heads[j].first);
        b.resize(static_cast<std::size_t>(pages_for(n)) * 2 * D);  // never grows: no allocation
        for (std::int32_t pg = 0; pg < pages_for(n); ++pg)
          if (bounds_stale[static_cast<std::size_t>(pg)]) {
            fold_key_bounds(b.data() + static_cast<std::size_t>(pg) * 2 * D,
                            page_data(st.pages[static_cast<std::size_t>(pg)]), 0, std::min(P, n - pg * P));
            bounds_stale[static_cast<std::size_t>(pg)] = 0;
          }
      }
      const std::size_t keep_pages = static_cast<std::size_t>(pages_for(n));
      pool_.release(static_cast<std::int32_t>(st.pages.size() - keep_pages), st.pages.data() + keep_pages);
      st.pages.resize(keep_pages);
      st.positions.swap(new_pos[j]);
    }
    pool_.release(static_cast<std::int32_t>(unshared.size()), unshared.data());
  }

  /// Whether destination page pg differs from the source page with the same index.
  bool page_changes(const std::vector<std::int32_t>& kept, std::int32_t pg) const noexcept {
    const std::int32_t n = static_cast<std::int32_t>(kept.size());
    const std::int32_t end = std::min(n, (pg + 1) * cfg_.page_size);
    for (std::int32_t i = pg * cfg_.page_size; i < end; ++i)
      if (kept[static_cast<std::size_t>(i)] != i) return true;
    return false;
  }

  cache_config cfg_;
  page_pool pool_;
  detail::sequence_table<sequence> seqs_{"kvc::kv_cache", cfg_.num_layers, cfg_.num_kv_heads};
};

KVC_END_NAMESPACE
