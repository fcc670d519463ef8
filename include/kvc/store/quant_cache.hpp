// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `quant_cache<KQ, VQ>`: a paged KV store whose pages hold quantized K (codec KQ) and V (codec VQ),
/// with the interface of kvc::kv_cache<T> (add_sequence, append, keep, keep_layer, gather,
/// positions, memory accounting), so eviction policies and model harnesses can use either.
///
/// Each (sequence, layer, kv-head) stream is, in token order:
///   1. up to `sink_tokens` attention-sink tokens kept in full precision (sink pool, one page);
///   2. quantized tokens, in pages of page_size tokens: [K records][V records] (quant pool);
///   3. the full-precision residual window (residual pool, one page of R + U - 1 tokens), where R is
///      the codecs' residual window and U the tokens per encoding unit (KIVI keys: G).
/// Appended tokens enter the residual; whenever the tokens after the last whole unit (a trailing
/// partial unit, see below, plus the residual) number R + U or more, the oldest whole units are
/// encoded. So the newest min(length, R) tokens are always exact (stored as Fp, binary16 by
/// default), and an encoded per-channel key group spans at least one real token and at most U.
///
/// Compaction (keep): per-token records are moved as bytes (no extra error). Per-channel records
/// whose member tokens change are decoded, compacted and re-encoded through the codec's repack
/// (quant::reencode; KIVI keys: dyadic grids that hold values already on them exactly), so a token
/// carries a second rounding, bounded by half the new group's scale, only when its group needs a
/// coarser grid than before. When the number
/// of kept quantized tokens is not a multiple of U, the trailing partial unit stays quantized: its
/// m < U kept tokens are re-encoded as one record padded with copies of its last token (copies
/// leave a per-channel range unchanged), and the next append that encodes completes it (decoded,
/// joined with the oldest residual tokens, re-encoded). keep never moves tokens into the full-
/// precision window, so it never needs a page that the stream did not have: with no page shared,
/// pool bytes after keep <= before (decoding a KIVI-2 partial group into a fresh residual page
/// used to triple a 64-token stream, 6144 -> 18944 bytes, when 63 were kept).
///
/// Every mutating call gives the strong guarantee: if it throws (kvc::error, kvc::out_of_memory or
/// std::bad_alloc), the cache is exactly as before.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvc/attention/rope.hpp>
#include <kvc/error.hpp>
#include <kvc/quant/codec.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/store/page_pool.hpp>
#include <kvc/store/sequence_table.hpp>
#include <kvc/types.hpp>
#include <kvc/view/decoding_accessor.hpp>
#include <kvc/view/heads.hpp>

KVC_BEGIN_NAMESPACE

/// Shape and capacity of a quantized cache (cache_config plus the quantized-store options).
struct quant_cache_config : cache_config {
  /// The first sink_tokens tokens of each stream stay in full precision (KVQuant keeps 5).
  std::int32_t sink_tokens = 0;
  /// Capacity of the residual and sink pools, in pages (each stream uses at most one of each).
  std::int32_t max_fp_pages = 4096;
  /// Keys are appended *before* RoPE and stored so; attention rotates each key to its position
  /// on the fly (KVQuant's pre-RoPE key quantization). gather() returns rotated keys.
  bool pre_rope = false;
  rope_config rope{};
};

/// Read-only description of one stream, for the attention kernels.
template <class Fp>
struct quant_stream_view {
  const std::byte* quant_base = nullptr;  ///< quant pool arena
  std::size_t page_bytes = 0;             ///< quant pool page stride
  std::size_t v_offset = 0;               ///< offset of the V records inside a quant page
  const page_id* pages = nullptr;         ///< quant pages of the stream
  const Fp* sink_k = nullptr;             ///< [n_sink][D]
  const Fp* sink_v = nullptr;
  const Fp* res_k = nullptr;              ///< [n_res][D]
  const Fp* res_v = nullptr;
  const std::int32_t* positions = nullptr;
  std::int32_t n_sink = 0, n_quant = 0, n_res = 0;
  std::int32_t length() const noexcept { return n_sink + n_quant + n_res; }
};

/// \tparam KQ  key codec (kvc::quant::int8, kivi<2>, fp8<>, rotated<...>, ...)
/// \tparam VQ  value codec
/// \tparam Fp  element type of the sink and residual tokens (kvc::half by default, or float)
/// Threads: sequences are written and read concurrently, one thread per sequence; add/remove/fork are exclusive (docs/threading.md).
template <class KQ, class VQ = KQ, class Fp = half>
class quant_cache {
  static_assert(quant::is_codec_v<KQ>, "kvc::quant_cache<KQ, VQ>: KQ is not a kvc quantizer (see <kvc/quant/codec.hpp>)");
  static_assert(quant::is_codec_v<VQ>, "kvc::quant_cache<KQ, VQ>: VQ is not a kvc quantizer (see <kvc/quant/codec.hpp>)");
  static_assert(std::is_same<Fp, half>::value || std::is_same<Fp, float>::value || std::is_same<Fp, bfloat16>::value,
                "kvc::quant_cache<KQ, VQ, Fp>: Fp must be kvc::half, kvc::bfloat16 or float");

 public:
  using key_codec = KQ;
  using value_codec = VQ;
  using residual_type = Fp;
  using stream_view = quant_stream_view<Fp>;

  /// The source of a decoded view (kvc/view/decoding_accessor.hpp): row t of one stream's K or V,
  /// decoded as decode_token does (keys rotated to their positions when stored pre-RoPE).
  template <quant::role R>
  struct decoded_stream {
    const quant_cache* cache = nullptr;
    stream_view sv{};
    void decode_row(std::int64_t t, float* out) const {
      cache->template decode_token<R>(sv, static_cast<std::int32_t>(t), out);
    }
  };
  /// One stream's K (V) as a kv_view of decoded floats, [length][1][head_dim]: the encoding is the
  /// accessor, so the reference, the CPU kernel over views and any reader of views read it as
  /// they read a kv_cache's pages. Valid until the stream changes.
  using key_view_type = decoded_view<decoded_stream<quant::role::key>>;
  using value_view_type = decoded_view<decoded_stream<quant::role::value>>;
  /// A layer's decoded views, naming this cache, the sequence and the layer: cpu::decode_attention
  /// given them runs the quantized kernel, which reads the codes directly.
  using layer_view = store_layer<quant_cache, stream_heads<key_view_type, value_view_type>>;
  /// Where layer() puts its views.
  using layer_buffer = decoded_layer_buffer<decoded_stream<quant::role::key>, decoded_stream<quant::role::value>>;

  explicit quant_cache(const quant_cache_config& cfg, KQ kq = KQ{}, VQ vq = VQ{})
      : cfg_(validated(cfg, kq, vq)), kq_(kq), vq_(vq) {
    const std::int32_t D = cfg_.head_dim, P = cfg_.page_size;
    uk_ = KQ::tokens_per_record(quant::role::key);
    uv_ = VQ::tokens_per_record(quant::role::value);
    unit_ = std::lcm(uk_, uv_);
    KVC_EXPECTS_IN("kvc::quant_cache::quant_cache", P % unit_ == 0, "cache_config.page_size = ", P,
                   ", expected a multiple of the codecs' encoding unit (",
                   unit_, " tokens: a page must hold whole groups)");
    rbk_ = kq_.record_bytes(quant::role::key, D);
    rbv_ = vq_.record_bytes(quant::role::value, D);
    v_offset_ = rbk_ * static_cast<std::size_t>(P / uk_);
    residual_ = std::max(kq_.residual(), vq_.residual());
    res_cap_ = residual_ + unit_ - 1;
    quant_pool_ = std::make_unique<page_pool>(v_offset_ + rbv_ * static_cast<std::size_t>(P / uv_), cfg_.max_pages,
                                              cfg_.num_layers);
    if (res_cap_ > 0)
      res_pool_ = std::make_unique<page_pool>(2 * sizeof(Fp) * static_cast<std::size_t>(res_cap_) * D, cfg_.max_fp_pages,
                                              cfg_.num_layers);
    if (cfg_.sink_tokens > 0)
      sink_pool_ = std::make_unique<page_pool>(2 * sizeof(Fp) * static_cast<std::size_t>(cfg_.sink_tokens) * D,
                                               cfg_.max_fp_pages, cfg_.num_layers);
    if (cfg_.pre_rope) {
      rope_config rc = cfg_.rope;
      rc.head_dim = D;
      rope_.emplace(rc);
    }
  }

  const quant_cache_config& config() const noexcept { return cfg_; }
  const KQ& key_quantizer() const noexcept { return kq_; }
  const VQ& value_quantizer() const noexcept { return vq_; }
  /// Full-precision window R: the newest min(length, R) tokens of every stream are exact.
  std::int32_t residual_window() const noexcept { return residual_; }
  /// Tokens encoded together (lcm of the codecs' tokens per record).
  std::int32_t encoding_unit() const noexcept { return unit_; }
  const page_pool& quant_pool() const noexcept { return *quant_pool_; }
  const page_pool* residual_pool() const noexcept { return res_pool_.get(); }
  const page_pool* sink_pool() const noexcept { return sink_pool_.get(); }
  const rope* pre_rope() const noexcept { return rope_ ? &*rope_ : nullptr; }

  // ---- sequences -------------------------------------------------------------------------

  seq_id add_sequence() {
    sequence s;
    s.streams.resize(static_cast<std::size_t>(cfg_.num_layers) * cfg_.num_kv_heads);
    s.seen.assign(static_cast<std::size_t>(cfg_.num_layers), 0);
    return seqs_.add(std::move(s));
  }

  void remove_sequence(seq_id s) {
    for (auto& st : seqs_.find(s, "remove_sequence").streams) release_stream(st);
    seqs_.erase(s);
  }

  bool contains(seq_id s) const noexcept { return seqs_.contains(s); }
  std::size_t num_sequences() const noexcept { return seqs_.size(); }

  /// A new sequence sharing every page of s; the first write to a shared page copies it.
  seq_id fork(seq_id s) {
    const sequence& src = seqs_.find(s, "fork");
    const seq_id id = seqs_.add(src);  // may throw; nothing retained yet
    for (const auto& st : src.streams) retain_stream(st);
    return id;
  }

  /// Makes layer `layer` of sequence s hold what layer `from` holds, by reference, as
  /// kv_cache::share_layer does: each kv head's stream takes from's quantized pages, residual and
  /// sink pages, positions and region counts; every page gains a reference in its pool and the
  /// layer's own pages are released. Nothing is allocated, copied or re-encoded, so the shared
  /// pages count once in bytes_in_use(), and in bytes_in_use(l) of the layer l that allocated
  /// them (from, unless from took them from another layer). The first write to a shared page from
  /// either layer (an append into the sinks, the residual window or a partial unit, a keep that
  /// moves records or sinks) copies it, as after fork, so the layers stay independent. The
  /// layer's `seen` becomes from's.
  /// Throws kvc::error on a bad argument (a layer out of range, layer == from, unknown s) and
  /// std::bad_alloc while copying the tables, leaving the cache unchanged either way.
  void share_layer(seq_id s, std::int32_t layer, std::int32_t from) {
    sequence& sq = seqs_.find_share(s, layer, from, "share_layer");
    std::vector<qstream> tables = seqs_.copy_layer(sq.streams, from);  // may throw; nothing changed yet
    for (const qstream& st : tables) retain_stream(st);  // before release: a page both layers hold stays live
    for (std::int32_t h = 0; h < cfg_.num_kv_heads; ++h) {
      qstream& st = seqs_.at(sq, layer, h);
      release_stream(st);
      st = std::move(tables[static_cast<std::size_t>(h)]);
    }
    sq.seen[static_cast<std::size_t>(layer)] = sq.seen[static_cast<std::size_t>(from)];
  }

  // ---- writing ---------------------------------------------------------------------------

  /// Appends n tokens to every kv-head of one layer.
  /// \param k,v        [n][num_kv_heads][head_dim] (pre-RoPE keys when config().pre_rope)
  /// \param positions  [n] original positions, or null for the layer's next positions
  void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions = nullptr) {
    append_impl(s, layer, k, v, n, positions, nullptr);
  }
  /// As append, taking the pages of the quantized pool it needs from `quant_pages` (a reservation
  /// of quant_pool(), reserve_quant_pages) instead of the pool's free pages: with enough reserved,
  /// no other thread's allocations can make it run out there. The residual and sink pools are
  /// allocated from as usual. Too few reserved pages throw kvc::out_of_memory, cache unchanged.
  void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions, page_pool::reservation& quant_pages) {
    check_reservation(quant_pages, "append");
    append_impl(s, layer, k, v, n, positions, &quant_pages);
  }

  /// Sets n free pages of the quantized-token pool aside (page_pool::reserve) for the append /
  /// keep / keep_layer overloads that take a reservation; unused pages go back when it is destroyed.
  /// n > quant_pool().free_pages() throws kvc::out_of_memory.
  page_pool::reservation reserve_quant_pages(std::int32_t n) { return quant_pool_->reserve(n); }

 private:
  /// How appending n tokens to a stream holding (n_sink, n_quant, n_res) tokens splits them: the
  /// one encoding plan that append_impl commits and chunk_tokens replays token by token.
  struct split {
    std::int32_t m_sink;  // new tokens that go to the sink page (only while nothing follows it)
    std::int32_t n2, T;   // the other new tokens; the residual window plus them (the concat)
    std::int32_t m;       // tokens of the trailing partial unit (quantized; re-encoded when E > 0)
    std::int32_t E;       // tokens encoded, from the partial unit's start, in whole units
    std::int32_t shift;   // concat rows (old residual, then new tokens) that E encodes
    std::int32_t newres;  // the window's length afterwards
  };
  split split_append(std::int32_t n_sink, std::int32_t n_quant, std::int32_t n_res, std::int32_t n) const noexcept {
    split p;
    p.m_sink = (n_quant == 0 && n_res == 0 && n_sink < cfg_.sink_tokens) ? std::min(cfg_.sink_tokens - n_sink, n) : 0;
    p.n2 = n - p.m_sink;
    p.T = n_res + p.n2;
    p.m = n_quant % unit_;
    // E counts from the partial unit's start: its m tokens are encoded again with the first
    // U - m rows of the concat, so every encoded unit starts on a unit boundary.
    const std::int32_t avail = p.m + p.T;
    p.E = avail >= residual_ + unit_ ? (avail - residual_) / unit_ * unit_ : 0;
    p.shift = p.E > 0 ? p.E - p.m : 0;
    p.newres = p.T - p.shift;
    return p;
  }

  void append_impl(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
                   const std::int32_t* positions, page_pool::reservation* qres) {
    sequence& sq = seqs_.find(s, "append");
    seqs_.check_layer(layer, "append");
    KVC_EXPECTS_IN("kvc::quant_cache::append", n >= 0, "n = ", n, ", expected >= 0 tokens");
    if (n == 0) return;
    KVC_EXPECTS_IN("kvc::quant_cache::append", k != nullptr && v != nullptr, "k or v is null with n = ", n);
    const std::int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim, P = cfg_.page_size;
    if (cfg_.check_finite) {
      check_finite(k, static_cast<std::size_t>(n) * H * D, "k");
      check_finite(v, static_cast<std::size_t>(n) * H * D, "v");
    }
    struct plan : split {
      bool sink_fresh, res_fresh, last_copy;
      std::int32_t quant_new;
    };
    std::vector<plan> pl(static_cast<std::size_t>(H));
    std::int32_t need_q = 0, need_r = 0, need_s = 0;
    for (std::int32_t h = 0; h < H; ++h) {
      const qstream& st = seqs_.at(sq, layer, h);
      plan& p = pl[static_cast<std::size_t>(h)];
      static_cast<split&>(p) = split_append(st.n_sink, st.n_quant, st.n_res, n);
      p.sink_fresh = p.m_sink > 0 && (st.sink < 0 || sink_pool_->ref_count(st.sink) > 1);
      p.res_fresh = p.n2 > 0 && p.newres > 0 && (st.res < 0 || res_pool_->ref_count(st.res) > 1);
      p.last_copy = p.E > 0 && st.n_quant % P != 0 && quant_pool_->ref_count(st.pages.back()) > 1;
      p.quant_new = pages_for(st.n_quant - p.m + p.E) - static_cast<std::int32_t>(st.pages.size());
      if (p.E == 0) p.quant_new = 0;
      need_q += p.quant_new + (p.last_copy ? 1 : 0);
      need_r += p.res_fresh ? 1 : 0;
      need_s += p.sink_fresh ? 1 : 0;
    }
    for (std::int32_t h = 0; h < H; ++h) {  // capacity first: a bad_alloc here changes nothing
      qstream& st = seqs_.at(sq, layer, h);
      const plan& p = pl[static_cast<std::size_t>(h)];
      st.pages.reserve(static_cast<std::size_t>(std::max(pages_for(st.n_quant - p.m + p.E), pages_for(st.n_quant))));
      st.positions.reserve(static_cast<std::size_t>(st.length() + n));
    }
    std::vector<float> unit_buf(2 * static_cast<std::size_t>(unit_) * D);
    const fresh_pages fresh = allocate_all(need_q, need_r, need_s, layer, qres, "append");
    // Commit: nothing below throws.
    std::size_t nq = 0, nr = 0, ns = 0;
    const std::int32_t first_pos = sq.seen[static_cast<std::size_t>(layer)];
    for (std::int32_t h = 0; h < H; ++h) {
      qstream& st = seqs_.at(sq, layer, h);
      const plan& p = pl[static_cast<std::size_t>(h)];
      auto in_k = [&](std::int32_t i) { return k + (static_cast<std::size_t>(i) * H + h) * D; };
      auto in_v = [&](std::int32_t i) { return v + (static_cast<std::size_t>(i) * H + h) * D; };
      // 1. sinks
      if (p.m_sink > 0) {
        if (p.sink_fresh) replace_fp_page(*sink_pool_, st.sink, fresh.s[ns++]);
        Fp* sk = fp_rows(*sink_pool_, st.sink, cfg_.sink_tokens, false);
        Fp* sv = fp_rows(*sink_pool_, st.sink, cfg_.sink_tokens, true);
        for (std::int32_t i = 0; i < p.m_sink; ++i) {
          store_row(sk + static_cast<std::size_t>(st.n_sink + i) * D, in_k(i));
          store_row(sv + static_cast<std::size_t>(st.n_sink + i) * D, in_v(i));
        }
        st.n_sink += p.m_sink;
      }
      // 2. residual + encoding
      if (p.n2 > 0) {
        if (p.res_fresh) replace_fp_page(*res_pool_, st.res, fresh.r[nr++]);
        Fp* rk = st.res >= 0 ? fp_rows(*res_pool_, st.res, res_cap_, false) : nullptr;
        Fp* rv = st.res >= 0 ? fp_rows(*res_pool_, st.res, res_cap_, true) : nullptr;
        const std::int32_t r = st.n_res;
        // concat row c: residual slot c (c < r) or new token m_sink + (c - r)
        auto load_concat = [&](std::int32_t c, float* ko, float* vo) {
          if (c < r) {
            load_row(rk + static_cast<std::size_t>(c) * D, ko);
            load_row(rv + static_cast<std::size_t>(c) * D, vo);
          } else {
            round_row(in_k(p.m_sink + c - r), ko);
            round_row(in_v(p.m_sink + c - r), vo);
          }
        };
        if (p.E > 0) {
          if (p.last_copy) {
            const page_id cp = fresh.q[nq++];
            std::memcpy(quant_pool_->data(cp), quant_pool_->data(st.pages.back()), quant_pool_->page_bytes());
            quant_pool_->release(st.pages.back());
            st.pages.back() = cp;
          }
          for (std::int32_t i = 0; i < p.quant_new; ++i) st.pages.push_back(fresh.q[nq++]);
          float* kb = unit_buf.data();
          float* vb = kb + static_cast<std::size_t>(unit_) * D;
          const std::int32_t base = st.n_quant - p.m;
          const stream_view sv = make_view(st);  // after the page changes above
          for (std::int32_t u0 = 0; u0 < p.E; u0 += unit_) {
            for (std::int32_t j = 0; j < unit_; ++j) {
              const std::int32_t x = u0 + j;
              float* kr = kb + static_cast<std::size_t>(j) * D;
              float* vr = vb + static_cast<std::size_t>(j) * D;
              if (x < p.m) {  // a token of the partial unit, read before its record is rewritten
                decode_unroped<quant::role::key>(sv, st.n_sink + base + x, kr);
                decode_unroped<quant::role::value>(sv, st.n_sink + base + x, vr);
              } else {
                load_concat(x - p.m, kr, vr);
              }
            }
            encode_unit(st, base + u0, kb, vb, u0 == 0 ? p.m : 0);
          }
          st.n_quant = base + p.E;
        }
        for (std::int32_t j = 0; j < p.newres; ++j) {
          const std::int32_t c = p.shift + j;
          if (c < r) {
            std::memmove(rk + static_cast<std::size_t>(j) * D, rk + static_cast<std::size_t>(c) * D, sizeof(Fp) * D);
            std::memmove(rv + static_cast<std::size_t>(j) * D, rv + static_cast<std::size_t>(c) * D, sizeof(Fp) * D);
          } else {
            store_row(rk + static_cast<std::size_t>(j) * D, in_k(p.m_sink + c - r));
            store_row(rv + static_cast<std::size_t>(j) * D, in_v(p.m_sink + c - r));
          }
        }
        st.n_res = p.newres;
      }
      for (std::int32_t i = 0; i < n; ++i) st.positions.push_back(positions ? positions[i] : first_pos + i);
    }
    sq.seen[static_cast<std::size_t>(layer)] += n;
  }

 public:
  /// Keeps tokens kept[0..n) of one stream (strictly increasing indices into its current order).
  void keep(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n) {
    keep_one(s, layer, head, kept, n, nullptr);
  }
  /// As keep, taking the quantized pages its copy-on-write needs from `quant_pages` (see the
  /// append overload): at most one per shared quantized page of the stream.
  void keep(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n,
            page_pool::reservation& quant_pages) {
    check_reservation(quant_pages, "keep");
    keep_one(s, layer, head, kept, n, &quant_pages);
  }

  /// Keeps, for every head h of one layer, the tokens kept[h]. All heads change or none does.
  void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) {
    keep_all(s, layer, kept, nullptr);
  }
  /// As keep_layer, taking the quantized pages its copy-on-write needs from `quant_pages` (see the
  /// append overload): at most one per shared quantized page of the layer's streams.
  void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept,
                  page_pool::reservation& quant_pages) {
    check_reservation(quant_pages, "keep_layer");
    keep_all(s, layer, kept, &quant_pages);
  }

  /// keep_layer, then the rows rows[h] of the kept tokens rewritten, as one all-or-nothing step:
  /// the merge primitive on encoded pages (kvc/store/merged_cache.hpp over a quant_cache).
  /// `fn(std::int32_t head, std::int32_t i, float* k, float* v)` gets kept token i's key and value
  /// as stored before the call, decoded to the model domain (keys before RoPE in a pre-RoPE cache:
  /// decode_unroped), and edits them in place; every fn call sees the original rows. The edited
  /// rows are stored where the token is: written as they are into the sink and residual windows,
  /// encoded again (with the other tokens of their encoding unit, e.g. a KIVI key group, which are
  /// re-encoded from their decoded rows) in the quantized region. fn runs before anything changes,
  /// so a throwing fn, a row it leaves non-finite or a failed allocation leaves the cache as it
  /// was; shared (forked) pages are copied, never written through, and no page is taken that the
  /// stream did not have unless it is shared.
  /// \param rows  rows[h]: kept indices i of head h (strictly increasing, 0..kept[h].size()-1)
  ///   fn is called for; null: none (a plain keep_layer)
  template <class Fn>
  void keep_layer_rewrite(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept, Fn&& fn,
                          const std::vector<std::vector<std::int32_t>>* rows) {
    seqs_.check_layer(layer, "keep_layer_rewrite");
    const auto all = seqs_.rewrite_heads("kvc::quant_cache::keep_layer_rewrite", kept, rows);
    keep_heads(s, layer, all, nullptr, "keep_layer_rewrite", &fn, rows);
  }

  /// Forgets the newest tokens of one layer, as kv_cache::rewind: every head drops the tokens
  /// whose position is >= n and `seen` becomes n. The kept tokens keep the form they are stored
  /// in (encoded ones stay encoded, the window keeps its prefix; a trailing partial unit keeps its
  /// codes until the next encoding completes it), so nothing is re-encoded and no page is
  /// allocated, even for pages shared with a fork. Throws kvc::error on a bad argument, leaving
  /// the cache unchanged.
  void rewind(seq_id s, std::int32_t layer, std::int32_t n) {
    seqs_.check_layer(layer, "rewind");
    sequence& sq = seqs_.find(s, "rewind");
    const std::int32_t seen = sq.seen[static_cast<std::size_t>(layer)];
    KVC_EXPECTS_IN("kvc::quant_cache::rewind", n >= 0 && n <= seen, "n = ", n, ", expected 0..", seen,
                   " (the tokens layer ", layer, " has seen)");
    keep_heads(s, layer, seqs_.tokens_before(sq, layer, n), nullptr, "rewind");
    sq.seen[static_cast<std::size_t>(layer)] = n;
  }

 private:
  void keep_one(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n,
                page_pool::reservation* qres) {
    seqs_.check_layer(layer, "keep");
    seqs_.check_head(head, "keep");
    KVC_EXPECTS_IN("kvc::quant_cache::keep", n >= 0, "n = ", n, ", expected >= 0 kept tokens");
    KVC_EXPECTS_IN("kvc::quant_cache::keep", n == 0 || kept != nullptr, "kept is null with n = ", n);
    std::vector<std::pair<std::int32_t, std::vector<std::int32_t>>> one;
    one.emplace_back(head, std::vector<std::int32_t>(kept, kept + n));
    keep_heads(s, layer, one, qres, "keep");
  }
  void keep_all(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept,
                page_pool::reservation* qres) {
    seqs_.check_layer(layer, "keep_layer");
    KVC_EXPECTS_IN("kvc::quant_cache::keep_layer", static_cast<std::int32_t>(kept.size()) == cfg_.num_kv_heads,
                   "kept.size() = ", kept.size(),
                   ", expected num_kv_heads = ", cfg_.num_kv_heads);
    std::vector<std::pair<std::int32_t, std::vector<std::int32_t>>> all;
    all.reserve(kept.size());
    for (std::int32_t h = 0; h < cfg_.num_kv_heads; ++h) all.emplace_back(h, kept[static_cast<std::size_t>(h)]);
    keep_heads(s, layer, all, qres, "keep_layer");
  }

 public:

  // ---- reading ---------------------------------------------------------------------------

  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const {
    return seqs_.get(s, layer, head, "length").length();
  }
  const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const {
    return seqs_.get(s, layer, head, "positions").positions.data();
  }
  std::int32_t seen(seq_id s, std::int32_t layer) const {
    seqs_.check_layer(layer, "seen");
    return seqs_.find(s, "seen").seen[static_cast<std::size_t>(layer)];
  }
  const std::vector<page_id>& pages(seq_id s, std::int32_t layer, std::int32_t head) const {
    return seqs_.get(s, layer, head, "pages").pages;
  }

  /// How many of the next `limit` tokens of layer `layer` may be appended in one call and then
  /// attended together (kvc::cpu::prefill_attention) with exactly the stored forms that appending
  /// and attending them one at a time would show each of them: the longest run in which no append
  /// re-encodes a token that was already there, except at the run's first token. Why: an encoding
  /// with a residual window (KIVI, GEAR) quantizes the oldest residual unit when the window
  /// overflows, so a token attended token by token saw its recent neighbours in full precision; a
  /// whole 256-token chunk appended at once would show them quantized (kivi(bits=2) in the demo:
  /// +4.4 ppl instead of the token-by-token figure). Per-token codecs with no residual window never
  /// re-encode an earlier token: `limit`. At least 1 when limit >= 1.
  std::int32_t chunk_tokens(seq_id s, std::int32_t layer, std::int32_t limit) const {
    const sequence& sq = seqs_.find(s, "chunk_tokens");
    seqs_.check_layer(layer, "chunk_tokens");
    KVC_EXPECTS_IN("kvc::quant_cache::chunk_tokens", limit >= 0, "limit = ", limit, ", expected >= 0 tokens");
    std::int32_t run = limit;
    for (std::int32_t h = 0; h < cfg_.num_kv_heads && run > 1; ++h) {
      // Replays append_impl's plan (split_append) one token at a time.
      const qstream& st = seqs_.at(sq, layer, h);
      std::int32_t n_sink = st.n_sink, n_quant = st.n_quant, n_res = st.n_res;
      for (std::int32_t j = 1; j <= run; ++j) {
        const split p = split_append(n_sink, n_quant, n_res, 1);
        const bool reencodes = p.E > 0 && (p.m > 0 || n_res > 0);
        if (reencodes && j > 1) {
          run = j - 1;
          break;
        }
        n_sink += p.m_sink;
        n_quant += p.shift;
        n_res = p.newres;
      }
    }
    return run;
  }

  /// Tokens of one stream in each storage region.
  struct region_counts {
    std::int32_t sink, quantized, residual;
  };
  region_counts regions(seq_id s, std::int32_t layer, std::int32_t head) const {
    const qstream& st = seqs_.get(s, layer, head, "regions");
    return {st.n_sink, st.n_quant, st.n_res};
  }

  /// Read-only view of one stream for the attention kernels.
  stream_view view(seq_id s, std::int32_t layer, std::int32_t head) const {
    return make_view(seqs_.get(s, layer, head, "view"));
  }

  /// K (V) of one stream through its encoding's accessor (key_view_type).
  key_view_type keys(seq_id s, std::int32_t layer, std::int32_t head) const {
    return decoded<quant::role::key>(make_view(seqs_.get(s, layer, head, "keys")));
  }
  value_view_type values(seq_id s, std::int32_t layer, std::int32_t head) const {
    return decoded<quant::role::value>(make_view(seqs_.get(s, layer, head, "values")));
  }
  /// All heads of one layer as decoded views, in the shape kv_cache::layer gives (reference and
  /// generic kernels take either). The result points into `buf`, which must outlive it.
  layer_view layer(seq_id s, std::int32_t layer, layer_buffer& buf) const {
    const sequence& sq = seqs_.find(s, "layer");
    seqs_.check_layer(layer, "layer");
    const std::int32_t H = cfg_.num_kv_heads;
    buf.reset(H);
    for (std::int32_t h = 0; h < H; ++h) {
      const stream_view sv = make_view(seqs_.at(sq, layer, h));
      buf.k.push_back(decoded<quant::role::key>(sv));
      buf.v.push_back(decoded<quant::role::value>(sv));
    }
    return {buf.heads(cfg_.head_dim), this, s, layer};
  }

  /// Copies one stream's keys and values (either may be null), dequantized to float,
  /// [length][head_dim]. Keys are returned rotated to their positions when stored pre-RoPE.
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out = nullptr) const {
    const qstream& st = seqs_.get(s, layer, head, "gather");
    const std::int32_t D = cfg_.head_dim;
    const stream_view sv = make_view(st);
    for (std::int32_t t = 0; t < st.length(); ++t) {
      if (k_out) decode_token<quant::role::key>(sv, t, k_out + static_cast<std::size_t>(t) * D);
      if (v_out) decode_token<quant::role::value>(sv, t, v_out + static_cast<std::size_t>(t) * D);
    }
  }

  /// Token t of a stream, model domain (keys rotated to their position when stored pre-RoPE).
  template <quant::role R>
  void decode_token(const stream_view& sv, std::int32_t t, float* out) const {
    decode_unroped<R>(sv, t, out);
    if (R == quant::role::key && rope_) rope_->apply(out, sv.positions[t]);
  }

  /// Token t's key and value (either may be null) as decode_unroped reads them: what
  /// keep_layer_rewrite hands its fn, and what a merge of encoded rows averages.
  void decode_unroped_rows(const stream_view& sv, std::int32_t t, float* k, float* v) const {
    if (k) decode_unroped<quant::role::key>(sv, t, k);
    if (v) decode_unroped<quant::role::value>(sv, t, v);
  }

  /// Token t of a stream in the model domain, before RoPE for pre-RoPE keys (what re-encoding reads).
  template <quant::role R>
  void decode_unroped(const stream_view& sv, std::int32_t t, float* out) const {
    const std::int32_t D = cfg_.head_dim, P = cfg_.page_size;
    if (t < sv.n_sink) {
      load_row((R == quant::role::key ? sv.sink_k : sv.sink_v) + static_cast<std::size_t>(t) * D, out);
    } else if (t < sv.n_sink + sv.n_quant) {
      const std::int32_t i = t - sv.n_sink;
      const std::byte* page = sv.quant_base + static_cast<std::size_t>(sv.pages[i / P]) * sv.page_bytes;
      const std::int32_t slot = i % P;
      if constexpr (R == quant::role::key) {
        kq_.template decode_token<R>(page + rbk_ * static_cast<std::size_t>(slot / uk_), D, slot % uk_, out);
        kq_.to_model(out, D);
      } else {
        vq_.template decode_token<R>(page + v_offset_ + rbv_ * static_cast<std::size_t>(slot / uv_), D, slot % uv_, out);
        vq_.to_model(out, D);
      }
    } else {
      load_row((R == quant::role::key ? sv.res_k : sv.res_v) + static_cast<std::size_t>(t - sv.n_sink - sv.n_quant) * D,
               out);
    }
  }

  // ---- memory accounting (from the pools) -------------------------------------------------

  /// Bytes of live pages in all pools (codes, scales, zeros, outliers, residual and sink tokens).
  std::size_t bytes_in_use() const noexcept {
    return quant_pool_->bytes_in_use() + (res_pool_ ? res_pool_->bytes_in_use() : 0) +
           (sink_pool_ ? sink_pool_->bytes_in_use() : 0);
  }
  std::size_t bytes_in_use(std::int32_t layer) const {
    seqs_.check_layer(layer, "bytes_in_use");
    return quant_pool_->bytes_in_use(layer) + (res_pool_ ? res_pool_->bytes_in_use(layer) : 0) +
           (sink_pool_ ? sink_pool_->bytes_in_use(layer) : 0);
  }
  /// Bytes allocated and released in all pools since construction (see memory_traffic).
  memory_traffic traffic() const noexcept {
    memory_traffic t = quant_pool_->traffic();
    if (res_pool_) t += res_pool_->traffic();
    if (sink_pool_) t += sink_pool_->traffic();
    return t;
  }
  /// Bytes of the pages one stream references (shared pages counted in each sharer).
  std::size_t stream_bytes(seq_id s, std::int32_t layer, std::int32_t head) const {
    const qstream& st = seqs_.get(s, layer, head, "stream_bytes");
    return st.pages.size() * quant_pool_->page_bytes() + (st.res >= 0 ? res_pool_->page_bytes() : 0) +
           (st.sink >= 0 ? sink_pool_->page_bytes() : 0);
  }
  /// Host bytes of bookkeeping: 4 per kept token position, 4 per page-table entry, 20 per stream.
  std::size_t metadata_bytes() const noexcept {
    return seqs_.template sum_streams<std::size_t>(
        [](const qstream& st) { return 4 * (st.positions.size() + st.pages.size()) + 20; });
  }
  std::int64_t tokens_held() const noexcept {
    return seqs_.template sum_streams<std::int64_t>([](const qstream& st) { return st.length(); });
  }

 private:
  struct qstream {
    std::vector<page_id> pages;
    std::vector<std::int32_t> positions;
    page_id res = -1, sink = -1;
    std::int32_t n_sink = 0, n_quant = 0, n_res = 0;
    std::int32_t length() const noexcept { return n_sink + n_quant + n_res; }
  };
  struct sequence {
    std::vector<qstream> streams;
    std::vector<std::int32_t> seen;
  };
  struct fresh_pages {
    std::vector<page_id> q, r, s;
  };

  static quant_cache_config validated(const quant_cache_config& c, const KQ& kq, const VQ& vq) {
    KVC_EXPECTS_IN("kvc::quant_cache::quant_cache", c.num_layers > 0, "cache_config.num_layers = ", c.num_layers,
                   ", expected > 0");
    KVC_EXPECTS_IN("kvc::quant_cache::quant_cache", c.num_kv_heads > 0, "cache_config.num_kv_heads = ", c.num_kv_heads,
                   ", expected > 0");
    KVC_EXPECTS_IN("kvc::quant_cache::quant_cache", c.head_dim > 0, "cache_config.head_dim = ", c.head_dim,
                   ", expected > 0");
    KVC_EXPECTS_IN("kvc::quant_cache::quant_cache", c.page_size > 0 && (c.page_size & (c.page_size - 1)) == 0,
                   "cache_config.page_size = ", c.page_size,
                   ", expected a power of two");
    KVC_EXPECTS_IN("kvc::quant_cache::quant_cache", c.max_pages > 0, "cache_config.max_pages = ", c.max_pages,
                   ", expected > 0");
    KVC_EXPECTS_IN("kvc::quant_cache::quant_cache", c.sink_tokens >= 0, "quant_cache_config.sink_tokens = ",
                   c.sink_tokens, ", expected >= 0");
    KVC_EXPECTS_IN("kvc::quant_cache::quant_cache", c.max_fp_pages > 0, "quant_cache_config.max_fp_pages = ",
                   c.max_fp_pages, ", expected > 0");
    kq.check(c.head_dim);
    vq.check(c.head_dim);
    return c;
  }

  std::int32_t pages_for(std::int32_t tokens) const noexcept { return (tokens + cfg_.page_size - 1) / cfg_.page_size; }

  template <quant::role R>
  decoded_view<decoded_stream<R>> decoded(const stream_view& sv) const {
    return make_decoded_view(decoded_stream<R>{this, sv}, sv.length(), cfg_.head_dim);
  }

  stream_view make_view(const qstream& st) const noexcept {
    stream_view v;
    v.quant_base = quant_pool_->base();
    v.page_bytes = quant_pool_->page_bytes();
    v.v_offset = v_offset_;
    v.pages = st.pages.data();
    if (st.sink >= 0) {
      v.sink_k = fp_rows(*sink_pool_, st.sink, cfg_.sink_tokens, false);
      v.sink_v = fp_rows(*sink_pool_, st.sink, cfg_.sink_tokens, true);
    }
    if (st.res >= 0) {
      v.res_k = fp_rows(*res_pool_, st.res, res_cap_, false);
      v.res_v = fp_rows(*res_pool_, st.res, res_cap_, true);
    }
    v.positions = st.positions.data();
    v.n_sink = st.n_sink;
    v.n_quant = st.n_quant;
    v.n_res = st.n_res;
    return v;
  }

  Fp* fp_rows(page_pool& pool, page_id p, std::int32_t cap, bool values) const noexcept {
    return reinterpret_cast<Fp*>(pool.data(p)) + (values ? static_cast<std::size_t>(cap) * cfg_.head_dim : 0);
  }
  const Fp* fp_rows(const page_pool& pool, page_id p, std::int32_t cap, bool values) const noexcept {
    return reinterpret_cast<const Fp*>(pool.data(p)) + (values ? static_cast<std::size_t>(cap) * cfg_.head_dim : 0);
  }

  /// Makes `fresh` the stream's page, copying the old contents (if any) and dropping the old reference.
  static void replace_fp_page(page_pool& pool, page_id& cur, page_id fresh) noexcept {
    if (cur >= 0) {
      std::memcpy(pool.data(fresh), pool.data(cur), pool.page_bytes());
      pool.release(cur);
    }
    cur = fresh;
  }

  // The row conversions use F16C 8 at a time for binary16 (the same round-to-nearest-even as
  // half(float), bit for bit): one scalar conversion per element was 60% of append's time
  // (perf, BM_quant_append int2 32x8x128).
  // (The F16C choice is made at run time, so these bodies are the same in every TU: docs/isa.md.)
  void store_row(Fp* dst, const float* src) const noexcept {
    const std::size_t D = static_cast<std::size_t>(cfg_.head_dim);
    if constexpr (std::is_same<Fp, half>::value) {
      kvc::detail::float_to_half_n(src, D, dst);
    } else {
      for (std::size_t d = 0; d < D; ++d) dst[d] = Fp(src[d]);
    }
  }
  void load_row(const Fp* src, float* dst) const noexcept {
    const std::size_t D = static_cast<std::size_t>(cfg_.head_dim);
    if constexpr (std::is_same<Fp, half>::value) {
      kvc::detail::half_to_float_n(src, D, dst);
    } else {
      for (std::size_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
    }
  }
  /// Rounds through Fp, so that a token is encoded from the same values whichever way it arrived.
  void round_row(const float* src, float* dst) const noexcept {
    const std::size_t D = static_cast<std::size_t>(cfg_.head_dim);
    if constexpr (std::is_same<Fp, half>::value) {
      kvc::detail::round_through_half_n(src, D, dst);
    } else {
      for (std::size_t d = 0; d < D; ++d) dst[d] = static_cast<float>(Fp(src[d]));
    }
  }

  /// Encodes one unit (unit_ tokens of K and V, model domain) at quantized index i0 (a multiple of
  /// unit_). Its first `decoded` tokens were decoded from the records in place (a partial unit
  /// being completed): one-token records of them are left as they are, and a record that mixes
  /// them with new tokens is re-encoded through the codec's repack (quant::reencode), so
  /// completing a unit never rounds a stored token onto a fresh grid.
  void encode_unit(qstream& st, std::int32_t i0, const float* kb, const float* vb, std::int32_t decoded) noexcept {
    const std::int32_t D = cfg_.head_dim, P = cfg_.page_size;
    std::byte* page = quant_pool_->data(st.pages[static_cast<std::size_t>(i0 / P)]);
    const std::int32_t slot = i0 % P;
    for (std::int32_t j = 0; j < unit_; j += uk_) {
      std::byte* rec = page + rbk_ * static_cast<std::size_t>((slot + j) / uk_);
      if (j >= decoded) kq_.template encode<quant::role::key>(kb + static_cast<std::size_t>(j) * D, D, rec);
      else if (uk_ > 1) quant::reencode<quant::role::key>(kq_, kb + static_cast<std::size_t>(j) * D, D, rec);
    }
    for (std::int32_t j = 0; j < unit_; j += uv_) {
      std::byte* rec = page + v_offset_ + rbv_ * static_cast<std::size_t>((slot + j) / uv_);
      if (j >= decoded) vq_.template encode<quant::role::value>(vb + static_cast<std::size_t>(j) * D, D, rec);
      else if (uv_ > 1) quant::reencode<quant::role::value>(vq_, vb + static_cast<std::size_t>(j) * D, D, rec);
    }
  }

  /// Allocates from the three pools, all or nothing; the quantized pages from `qres` when given.
  fresh_pages allocate_all(std::int32_t nq, std::int32_t nr, std::int32_t ns, std::int32_t layer,
                           page_pool::reservation* qres, const char* fn) {
    fresh_pages f;
    f.q.resize(static_cast<std::size_t>(nq));
    f.r.resize(static_cast<std::size_t>(nr));
    f.s.resize(static_cast<std::size_t>(ns));
    if (qres && nq > qres->size())
      detail::fail<out_of_memory>(detail::concat("kvc::quant_cache::", fn, ": needs ", nq,
                                                 " quantized pages and quant_pages has ", qres->size(),
                                                 " reserved, expected enough (the cache is unchanged)"));
    if (qres) qres->allocate(nq, f.q.data(), layer);
    else quant_pool_->allocate(nq, f.q.data(), layer);
    try {
      if (nr > 0) res_pool_->allocate(nr, f.r.data(), layer);
      try {
        if (ns > 0) sink_pool_->allocate(ns, f.s.data(), layer);
      } catch (...) {
        if (nr > 0) res_pool_->release(nr, f.r.data());
        throw;
      }
    } catch (...) {
      quant_pool_->release(nq, f.q.data());  // a reservation's pages go back to the pool: it is spent
      throw;
    }
    return f;
  }

  void check_reservation(const page_pool::reservation& r, const char* fn) const {
    if (r.pool() != quant_pool_.get())
      detail::fail(detail::concat("kvc::quant_cache::", fn, ": quant_pages = a reservation of ",
                                  r.pool() ? "another pool" : "no pool (empty or moved from)",
                                  ", expected one of this cache's quant_pool() (reserve_quant_pages)"));
  }

  void retain_stream(const qstream& st) noexcept {
    quant_pool_->retain(static_cast<std::int32_t>(st.pages.size()), st.pages.data());
    if (st.res >= 0) res_pool_->retain(1, &st.res);
    if (st.sink >= 0) sink_pool_->retain(1, &st.sink);
  }
  void release_stream(qstream& st) noexcept {
    quant_pool_->release(static_cast<std::int32_t>(st.pages.size()), st.pages.data());
    if (st.res >= 0) res_pool_->release(st.res);
    if (st.sink >= 0) sink_pool_->release(st.sink);
  }

  static void check_finite(const float* p, std::size_t n, const char* name) {
    for (std::size_t i = 0; i < n; ++i)
      if (!std::isfinite(p[i]))
        detail::fail(detail::concat("kvc::quant_cache::append: ", name, "[", i, "] = ", p[i],
                                    ", expected a finite value (the cache is unchanged)"));
  }
  /// keep (and keep_layer_rewrite when rewrite is not null: rows[h] of head h's kept tokens
  /// rewritten by (*rewrite)(h, i, k, v), see there).
  template <class Rewrite = std::nullptr_t>
  void keep_heads(seq_id s, std::int32_t layer,
                  const std::vector<std::pair<std::int32_t, std::vector<std::int32_t>>>& heads,
                  page_pool::reservation* qres, const char* fn, Rewrite* rewrite = nullptr,
                  const std::vector<std::vector<std::int32_t>>* rows = nullptr) {
    sequence& sq = seqs_.find(s, fn);
    const std::int32_t D = cfg_.head_dim, P = cfg_.page_size;
    struct plan {
      std::vector<std::int32_t> ks, kq, kr;  // kept indices, local to each region
      // Rewritten rows (model domain, [n][D] each): in the sink window (new sink index) and in
      // the quantized region (new quantized index, ascending); the residual window's go into res_k/res_v.
      std::vector<std::int32_t> ts, tq;
      std::vector<float> tsk, tsv, tqk, tqv;
      std::int32_t qmain = 0, res_total = 0, new_pages = 0;
      std::vector<Fp> res_k, res_v;          // the new residual window
      std::vector<std::int32_t> new_pos;
      std::vector<char> page_changed;
      bool sink_changed = false, sink_fresh = false, res_changed = false, res_fresh = false;
      std::int32_t quant_fresh = 0;
    };
    std::vector<plan> pl(heads.size());
    std::int32_t need_q = 0, need_r = 0, need_s = 0;
    std::vector<float> row(static_cast<std::size_t>(D));
    for (std::size_t j = 0; j < heads.size(); ++j) {
      const std::int32_t h = heads[j].first;
      const auto& kept = heads[j].second;
      const qstream& st = seqs_.at(sq, layer, h);
      const std::int32_t L = st.length();
      for (std::size_t i = 0; i < kept.size(); ++i) {
        if (kept[i] < 0 || kept[i] >= L)
          detail::fail(detail::concat("kvc::quant_cache::", fn, ": head ", h, ": kept[", i, "] = ", kept[i], ", expected 0..",
                                      L - 1, " (the stream's length is ", L, ")"));
        if (i > 0 && kept[i] <= kept[i - 1])
          detail::fail(detail::concat("kvc::quant_cache::", fn, ": head ", h, ": kept[", i, "] = ", kept[i], " after ",
                                      kept[i - 1], ", expected strictly increasing indices"));
      }
      plan& p = pl[j];
      for (std::int32_t t : kept) {
        if (t < st.n_sink) p.ks.push_back(t);
        else if (t < st.n_sink + st.n_quant) p.kq.push_back(t - st.n_sink);
        else p.kr.push_back(t - st.n_sink - st.n_quant);
      }
      // Every kept quantized token stays quantized (a trailing partial unit included), and the
      // window keeps only its own kept tokens, which fit it: no page is needed that the stream
      // did not have, unless it is shared and must be copied before it is written.
      p.qmain = static_cast<std::int32_t>(p.kq.size());
      p.res_total = static_cast<std::int32_t>(p.kr.size());
      p.new_pages = pages_for(p.qmain);
      KVC_ASSERT(p.new_pages <= static_cast<std::int32_t>(st.pages.size()));
      KVC_ASSERT(p.res_total <= st.n_res);
      // New residual window contents (Fp): the kept residual tokens.
      const stream_view sv = make_view(st);
      p.res_k.resize(static_cast<std::size_t>(p.res_total) * D);
      p.res_v.resize(static_cast<std::size_t>(p.res_total) * D);
      for (std::int32_t i = 0; i < p.res_total; ++i) {
        const std::int32_t t = st.n_sink + st.n_quant + p.kr[static_cast<std::size_t>(i)];
        decode_unroped<quant::role::key>(sv, t, row.data());
        store_row(p.res_k.data() + static_cast<std::size_t>(i) * D, row.data());
        decode_unroped<quant::role::value>(sv, t, row.data());
        store_row(p.res_v.data() + static_cast<std::size_t>(i) * D, row.data());
      }
      p.new_pos.resize(kept.size());
      for (std::size_t i = 0; i < kept.size(); ++i) p.new_pos[i] = st.positions[static_cast<std::size_t>(kept[i])];
      // Which quantized pages change, and which of those are shared.
      p.page_changed.assign(static_cast<std::size_t>(p.new_pages), 0);
      for (std::int32_t i = 0; i < p.qmain; ++i)
        if (p.kq[static_cast<std::size_t>(i)] != i) p.page_changed[static_cast<std::size_t>(i / P)] = 1;
      if constexpr (!std::is_same<Rewrite, std::nullptr_t>::value) {
        if (rewrite && rows) plan_rewrite(sv, h, kept, (*rows)[static_cast<std::size_t>(h)], *rewrite, p);
      }
      for (std::int32_t pg = 0; pg < p.new_pages; ++pg)
        if (p.page_changed[static_cast<std::size_t>(pg)] && quant_pool_->ref_count(st.pages[static_cast<std::size_t>(pg)]) > 1)
          p.page_changed[static_cast<std::size_t>(pg)] = 2, ++p.quant_fresh;  // 2: shared, copy (decided once; docs/threading.md)
      for (std::size_t i = 0; i < p.ks.size(); ++i)
        if (p.ks[i] != static_cast<std::int32_t>(i)) p.sink_changed = true;
      p.sink_fresh = p.sink_changed && sink_pool_->ref_count(st.sink) > 1;
      // A window that keeps a prefix of its tokens (rewind) is not rewritten, so not copied.
      for (std::int32_t i = 0; i < p.res_total; ++i)
        if (p.kr[static_cast<std::size_t>(i)] != i) p.res_changed = true;
      p.res_fresh = p.res_changed && res_pool_->ref_count(st.res) > 1;
      need_q += p.quant_fresh;
      need_r += p.res_fresh ? 1 : 0;
      need_s += p.sink_fresh ? 1 : 0;
    }
    std::vector<float> kb(static_cast<std::size_t>(unit_) * D), vb(kb.size());
    const fresh_pages fresh = allocate_all(need_q, need_r, need_s, layer, qres, fn);
    // Commit: nothing below throws.
    std::size_t nq = 0, nr = 0, ns = 0;
    for (std::size_t j = 0; j < heads.size(); ++j) {
      plan& p = pl[j];
      qstream& st = seqs_.at(sq, layer, heads[j].first);
      // sinks: forward compaction in place
      if (p.sink_changed) {
        if (p.sink_fresh) replace_fp_page(*sink_pool_, st.sink, fresh.s[ns++]);
        Fp* sk = fp_rows(*sink_pool_, st.sink, cfg_.sink_tokens, false);
        Fp* sv = fp_rows(*sink_pool_, st.sink, cfg_.sink_tokens, true);
        for (std::size_t i = 0; i < p.ks.size(); ++i) {
          std::memmove(sk + i * D, sk + static_cast<std::size_t>(p.ks[i]) * D, sizeof(Fp) * D);
          std::memmove(sv + i * D, sv + static_cast<std::size_t>(p.ks[i]) * D, sizeof(Fp) * D);
        }
        for (std::size_t x = 0; x < p.ts.size(); ++x) {
          store_row(sk + static_cast<std::size_t>(p.ts[x]) * D, p.tsk.data() + x * D);
          store_row(sv + static_cast<std::size_t>(p.ts[x]) * D, p.tsv.data() + x * D);
        }
      }
      st.n_sink = static_cast<std::int32_t>(p.ks.size());
      // quantized pages: copy the shared ones that change, then compact forward in place
      for (std::int32_t pg = 0; pg < p.new_pages; ++pg) {
        page_id& id = st.pages[static_cast<std::size_t>(pg)];
        if (p.page_changed[static_cast<std::size_t>(pg)] == 2) {
          const page_id cp = fresh.q[nq++];
          std::memcpy(quant_pool_->data(cp), quant_pool_->data(id), quant_pool_->page_bytes());
          quant_pool_->release(id);
          id = cp;
        }
      }
      compact_part<quant::role::key>(st, p.kq, p.qmain, kb.data(), p.tq, p.tqk.data());
      compact_part<quant::role::value>(st, p.kq, p.qmain, vb.data(), p.tq, p.tqv.data());
      const std::size_t keep_pages = static_cast<std::size_t>(p.new_pages);
      quant_pool_->release(static_cast<std::int32_t>(st.pages.size() - keep_pages), st.pages.data() + keep_pages);
      st.pages.resize(keep_pages);
      st.n_quant = p.qmain;
      // residual window
      const std::int32_t final_res = p.res_total;
      if (p.res_fresh) {
        res_pool_->release(st.res);
        st.res = fresh.r[nr++];
      }
      if (final_res > 0 && p.res_changed) {
        Fp* rk = fp_rows(*res_pool_, st.res, res_cap_, false);
        Fp* rv = fp_rows(*res_pool_, st.res, res_cap_, true);
        std::memcpy(rk, p.res_k.data(), sizeof(Fp) * final_res * D);
        std::memcpy(rv, p.res_v.data(), sizeof(Fp) * final_res * D);
      }
      st.n_res = final_res;
      st.positions.swap(p.new_pos);
    }
  }

  /// The rewrite part of keep_heads' plan for one head: fn's rows for the kept indices `list`,
  /// checked finite, filed by the region the kept token lands in (p's regions are planned).
  template <class Fn, class Plan>
  void plan_rewrite(const stream_view& sv, std::int32_t h, const std::vector<std::int32_t>& kept,
                    const std::vector<std::int32_t>& list, Fn& fn, Plan& p) const {
    const std::int32_t D = cfg_.head_dim, P = cfg_.page_size;
    const std::int32_t ns = static_cast<std::int32_t>(p.ks.size());
    std::vector<float> kr(static_cast<std::size_t>(D)), vr(kr.size());
    for (std::int32_t i : list) {
      const std::int32_t t = kept[static_cast<std::size_t>(i)];
      decode_unroped_rows(sv, t, kr.data(), vr.data());
      fn(h, i, kr.data(), vr.data());
      for (std::int32_t d = 0; d < 2 * D; ++d) {
        const float x = d < D ? kr[static_cast<std::size_t>(d)] : vr[static_cast<std::size_t>(d - D)];
        KVC_EXPECTS_IN("kvc::quant_cache::keep_layer_rewrite", std::isfinite(x), "head ", h, ", kept index ", i,
                       ": the rewritten ", d < D ? "key" : "value", " channel ", d % D, " = ", x,
                       ", expected a finite value (the cache is unchanged)");
      }
      if (i < ns) {
        p.ts.push_back(i);
        p.tsk.insert(p.tsk.end(), kr.begin(), kr.end());
        p.tsv.insert(p.tsv.end(), vr.begin(), vr.end());
        p.sink_changed = true;
      } else if (i < ns + p.qmain) {
        const std::int32_t qi = i - ns;
        p.tq.push_back(qi);
        p.tqk.insert(p.tqk.end(), kr.begin(), kr.end());
        p.tqv.insert(p.tqv.end(), vr.begin(), vr.end());
        p.page_changed[static_cast<std::size_t>(qi / P)] = 1;
      } else {
        const std::size_t ri = static_cast<std::size_t>(i - ns - p.qmain);
        store_row(p.res_k.data() + ri * D, kr.data());
        store_row(p.res_v.data() + ri * D, vr.data());
        p.res_changed = true;
      }
    }
  }

  /// Compacts the K or V records of the quantized region: new token i comes from old token kq[i].
  /// A trailing partial record (qmain % u tokens) is re-encoded padded with its last token.
  /// New tokens tq[x] (ascending) get the rows trows[x] (model domain) instead: their records are
  /// encoded again from the others' decoded rows and these.
  template <quant::role R>
  void compact_part(qstream& st, const std::vector<std::int32_t>& kq, std::int32_t qmain, float* buf,
                    const std::vector<std::int32_t>& tq, const float* trows) noexcept {
    const std::int32_t D = cfg_.head_dim, P = cfg_.page_size;
    const std::int32_t u = R == quant::role::key ? uk_ : uv_;
    const std::size_t rb = R == quant::role::key ? rbk_ : rbv_;
    const std::size_t off = R == quant::role::key ? 0 : v_offset_;
    auto rec = [&](std::int32_t i) {  // record holding quantized token i
      return quant_pool_->data(st.pages[static_cast<std::size_t>(i / P)]) + off + rb * static_cast<std::size_t>((i % P) / u);
    };
    std::size_t x0 = 0;  // the first of tq at or after r0
    for (std::int32_t r0 = 0; r0 < qmain; r0 += u) {
      const std::int32_t rn = std::min(u, qmain - r0);  // real tokens of this record
      std::size_t x1 = x0;
      while (x1 < tq.size() && tq[x1] < r0 + rn) ++x1;
      bool same = x1 == x0;
      for (std::int32_t i = r0; same && i < r0 + rn; ++i) same = kq[static_cast<std::size_t>(i)] == i;
      if (same) continue;  // a partial record keeps its dropped tail's codes: never read
      if (u == 1 && x1 == x0) {
        std::memmove(rec(r0), rec(kq[static_cast<std::size_t>(r0)]), rb);
        continue;
      }
      if (u == 1) {  // a new row alone in its record: encoded as appended tokens are
        std::memcpy(buf, trows + x0 * D, sizeof(float) * D);
        if constexpr (R == quant::role::key) kq_.template encode<R>(buf, D, rec(r0));
        else vq_.template encode<R>(buf, D, rec(r0));
        x0 = x1;
        continue;
      }
      for (std::int32_t i = r0; i < r0 + rn; ++i) {
        const std::int32_t src = kq[static_cast<std::size_t>(i)];
        float* o = buf + static_cast<std::size_t>(i - r0) * D;
        if constexpr (R == quant::role::key) {
          kq_.template decode_token<R>(rec(src), D, src % u, o);
          kq_.to_model(o, D);  // decoded rows are in the stored domain; encode expects the model domain
        } else {
          vq_.template decode_token<R>(rec(src), D, src % u, o);
          vq_.to_model(o, D);
        }
      }
      for (; x0 < x1; ++x0)
        std::memcpy(buf + static_cast<std::size_t>(tq[x0] - r0) * D, trows + x0 * D, sizeof(float) * D);
      for (std::int32_t i = rn; i < u; ++i)
        std::memcpy(buf + static_cast<std::size_t>(i) * D, buf + static_cast<std::size_t>(rn - 1) * D, sizeof(float) * D);
      if constexpr (R == quant::role::key) quant::reencode<R>(kq_, buf, D, rec(r0));
      else quant::reencode<R>(vq_, buf, D, rec(r0));
    }
  }

  quant_cache_config cfg_;
  KQ kq_;
  VQ vq_;
  std::int32_t uk_ = 1, uv_ = 1, unit_ = 1, residual_ = 0, res_cap_ = 0;
  std::size_t rbk_ = 0, rbv_ = 0, v_offset_ = 0;
  std::unique_ptr<page_pool> quant_pool_, res_pool_, sink_pool_;
  std::optional<rope> rope_;
  detail::sequence_table<sequence> seqs_{"kvc::quant_cache", cfg_.num_layers, cfg_.num_kv_heads};
};

KVC_END_NAMESPACE
