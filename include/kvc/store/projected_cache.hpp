// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `lowrank::projected_cache<T>`: a KV cache that stores, per (sequence, layer, kv head), the r_k
/// coefficients c_k = U_kᵀ(k − μ_k) of every key and the r_v coefficients c_v = U_vᵀ(v − μ_v) of
/// every value instead of their D channels (kvc/lowrank/pca.hpp fits U and μ). The coefficients
/// live in a `kv_cache<T>`, so every byte is a page-pool byte, a head's coefficients are
/// contiguous rows the decode kernel streams, and keep/fork/eviction work on them unchanged.
/// Decode attention over it: kvc/cpu/projected_attention.hpp.
///
/// Row layout. A token's coefficients are one row z = [c_k (r_k) | c_v (r_v) | 0 if r_k + r_v is
/// odd] of w = ceil((r_k + r_v) / 2) · 2 values, stored as the inner cache's K row (z[0, w/2)) and
/// V row (z[w/2, w)) with inner head_dim w/2. With r_k = r_v = r that is K row = c_k and V row =
/// c_v (head_dim r), the layout the r-space kernel streams; with different ranks the boundary
/// falls inside a row, which the general kernel and gather() unpack (split_row). Different ranks
/// matter because keys and values differ: on SmolLM2-135M 95% of the energy of pre-RoPE keys is
/// in 16 of 64 directions but values need 51 (docs/lowrank-spectrum.png).
///
/// Bytes per token and kv head: w · sizeof(T), against 2 · D · 2 for fp16 pages: r_k = r_v = D/4
/// in fp16 is 4x fewer bytes (128 against 512 at D = 128), in fp32 2x.
///
/// One pair of ranks for the whole cache (pages are one size per pool). A basis fitted with an
/// energy threshold has its own count per head: fit with rank_spec::of_count(max over heads).
/// Bases belong to the cache, not to a sequence: fitted once (e.g. from the first prompt) and
/// used for every sequence, as Loki's and Eigen Attention's calibration bases are.
///
/// RoPE. Keys are projected as given. With `pre_rope`, the caller appends keys before RoPE (whose
/// directions are stable along position, so far fewer of them carry the energy) and every reader
/// rotates after reconstruction: k̂_t = R(p_t)(U_k c_k + μ_k) at the token's stored position p_t,
/// as ShadowKV and KVQuant do. Without it keys are post-RoPE and attention runs in r-space.
/// Threads: as kv_cache (docs/threading.md); set_basis is exclusive like add_sequence.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <optional>

#include <kvc/attention/rope.hpp>
#include <kvc/error.hpp>
#include <kvc/lowrank/pca.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/view/decoding_accessor.hpp>
#include <kvc/view/heads.hpp>

KVC_BEGIN_NAMESPACE
namespace lowrank {

/// Shape of a projected cache.
struct projected_config {
  std::int32_t num_layers = 1;
  std::int32_t num_kv_heads = 1;
  std::int32_t head_dim = 128;  ///< D of the keys and values before projection
  std::int32_t rank = 32;       ///< r_k: coefficients stored per key (and per value when value_rank is 0)
  std::int32_t page_size = 16;  ///< tokens per page, a power of two
  std::int32_t max_pages = 1 << 16;
  std::int32_t value_rank = 0;  ///< r_v: coefficients stored per value; 0 means rank
  bool pre_rope = false;        ///< keys are appended before RoPE and rotated after reconstruction
  rope_config rope{};           ///< with pre_rope: the model's RoPE (its head_dim must be head_dim)
};

/// The projected cache of a caller's shape c (layers, kv heads, head_dim, pages) with r_k key
/// and r_v value coefficients; keys pre-RoPE with `rope` when it is not null.
inline projected_config projected_shape(const cache_config& c, std::int32_t rk, std::int32_t rv,
                                        const rope_config* rope = nullptr) {
  projected_config p;
  p.num_layers = c.num_layers;
  p.num_kv_heads = c.num_kv_heads;
  p.head_dim = c.head_dim;
  p.rank = rk;
  p.value_rank = rv;
  p.pre_rope = rope != nullptr;
  if (rope) p.rope = *rope;
  p.page_size = c.page_size;
  p.max_pages = c.max_pages;
  return p;
}

/// \tparam T  element type of the coefficients: float or kvc::half
template <class T = half>
class projected_cache {
  static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value,
                "kvc::lowrank::projected_cache<T>: T must be float or kvc::half");

 public:
  using value_type = T;
  using coefficient_cache = kv_cache<T>;

  /// The source of a decoded view (kvc/view/decoding_accessor.hpp): token t of one stream rebuilt
  /// in the model's D dimensions, U c + μ (keys rotated to their position with pre_rope), from its
  /// coefficient row. Values: false for keys, true for values.
  template <bool Values>
  struct decoded_stream {
    const projected_cache* cache = nullptr;
    typename coefficient_cache::view_type kr{}, vr{};  ///< the inner K rows and V rows: z = [kr | vr]
    const basis* b = nullptr;
    const std::int32_t* positions = nullptr;
    void decode_row(std::int64_t t, float* out) const { cache->reconstruct_row(*this, static_cast<std::int32_t>(t), out); }
  };
  using key_view_type = decoded_view<decoded_stream<false>>;
  using value_view_type = decoded_view<decoded_stream<true>>;
  /// A layer's decoded views, naming this cache, the sequence and the layer (cpu::decode_attention
  /// given them runs cpu::projected_decode_attention, which attends in coefficient space).
  using layer_view = store_layer<projected_cache, stream_heads<key_view_type, value_view_type>>;
  /// Where layer() puts its views.
  using layer_buffer = decoded_layer_buffer<decoded_stream<false>, decoded_stream<true>>;

  explicit projected_cache(const projected_config& c)
      : cfg_(validated(c)), coef_(inner_config(cfg_)), bases_(static_cast<std::size_t>(c.num_layers) * c.num_kv_heads) {
    if (cfg_.pre_rope) rope_.emplace(cfg_.rope);
  }

  const projected_config& config() const noexcept { return cfg_; }
  /// The coefficient store: a kv_cache with head_dim = row_width() / 2 (its views are what the kernel reads).
  const coefficient_cache& coefficients() const noexcept { return coef_; }
  std::int32_t key_rank() const noexcept { return cfg_.rank; }
  std::int32_t value_rank() const noexcept { return cfg_.value_rank != 0 ? cfg_.value_rank : cfg_.rank; }
  /// w: values per token's row, r_k + r_v rounded up to even (the inner K and V rows hold w/2 each).
  std::int32_t row_width() const noexcept { return (key_rank() + value_rank() + 1) / 2 * 2; }
  /// Whether the inner K row is c_k and the V row c_v with keys post-RoPE: what the r-space
  /// kernel reads in place. Otherwise kernels read through split_row.
  bool in_place() const noexcept { return key_rank() == value_rank() && !cfg_.pre_rope; }
  /// The RoPE keys are rotated with after reconstruction; null unless config().pre_rope.
  const rope* key_rope() const noexcept { return rope_ ? &*rope_ : nullptr; }
  /// Unpacks n rows of the inner cache, K rows kr and V rows vr ([n][w/2] each, as
  /// coefficients().gather returns them), into c_k [n][r_k] and c_v [n][r_v] (either may be null).
  void split_row(const float* kr, const float* vr, std::int32_t n, float* ck, float* cv) const noexcept {
    const std::int32_t rk = key_rank(), rv = value_rank(), hw = row_width() / 2;
    for (std::int32_t t = 0; t < n; ++t) {
      const float* a = kr + static_cast<std::size_t>(t) * hw;
      const float* b = vr + static_cast<std::size_t>(t) * hw;
      auto z = [&](std::int32_t i) { return i < hw ? a[i] : b[i - hw]; };
      if (ck)
        for (std::int32_t j = 0; j < rk; ++j) ck[static_cast<std::size_t>(t) * rk + j] = z(j);
      if (cv)
        for (std::int32_t j = 0; j < rv; ++j) cv[static_cast<std::size_t>(t) * rv + j] = z(rk + j);
    }
  }

  seq_id add_sequence() { return coef_.add_sequence(); }
  void remove_sequence(seq_id s) { coef_.remove_sequence(s); }
  seq_id fork(seq_id s) { return coef_.fork(s); }
  bool contains(seq_id s) const noexcept { return coef_.contains(s); }
  std::size_t num_sequences() const noexcept { return coef_.num_sequences(); }

  /// Sets the key and value bases of one (layer, kv head). Both must have dim = head_dim, the key
  /// basis rank = key_rank() and the value basis rank = value_rank(). Replacing a basis does not re-project tokens already stored: set bases
  /// before the first append of that layer (checked).
  void set_basis(std::int32_t layer, std::int32_t head, basis k, basis v) {
    constexpr const char* who = "kvc::lowrank::projected_cache::set_basis";
    KVC_EXPECTS_IN(who, layer >= 0 && layer < cfg_.num_layers, "layer = ", layer, ", expected 0..", cfg_.num_layers - 1);
    KVC_EXPECTS_IN(who, head >= 0 && head < cfg_.num_kv_heads, "head = ", head, ", expected 0..", cfg_.num_kv_heads - 1);
    for (const basis* b : {&k, &v}) {
      const char* which = b == &k ? "key" : "value";
      KVC_EXPECTS_IN(who, b->dim == cfg_.head_dim, which, " basis dim = ", b->dim, ", expected head_dim = ", cfg_.head_dim);
      const std::int32_t want = b == &k ? key_rank() : value_rank();
      KVC_EXPECTS_IN(who, b->rank == want, which, " basis rank = ", b->rank, ", expected the cache's ", which,
                     " rank = ", want, " (fit with rank_spec::of_count(", want, "))");
      KVC_EXPECTS_IN(who, b->u.size() == static_cast<std::size_t>(b->rank) * b->dim, which, " basis holds ",
                     b->u.size(), " floats, expected rank x dim = ", static_cast<std::size_t>(b->rank) * b->dim);
      KVC_EXPECTS_IN(who, b->mean.empty() || b->mean.size() == static_cast<std::size_t>(b->dim), which,
                     " basis mean holds ", b->mean.size(), " floats, expected 0 or dim = ", b->dim);
    }
    KVC_EXPECTS_IN(who, coef_.bytes_in_use(layer) == 0, "layer ", layer, " already holds ", coef_.bytes_in_use(layer),
                   " bytes of coefficients on the old basis, expected set_basis before the layer's first append");
    entry& e = bases_[index(layer, head)];
    e.k = std::move(k);
    e.v = std::move(v);
    e.set = true;
  }
  /// Removes the bases of one (layer, kv head), as before its set_basis; only while the layer
  /// holds no coefficients (checked). What undoes a set_basis whose first append failed.
  void clear_basis(std::int32_t layer, std::int32_t head) {
    constexpr const char* who = "kvc::lowrank::projected_cache::clear_basis";
    KVC_EXPECTS_IN(who, layer >= 0 && layer < cfg_.num_layers, "layer = ", layer, ", expected 0..", cfg_.num_layers - 1);
    KVC_EXPECTS_IN(who, head >= 0 && head < cfg_.num_kv_heads, "head = ", head, ", expected 0..", cfg_.num_kv_heads - 1);
    KVC_EXPECTS_IN(who, coef_.bytes_in_use(layer) == 0, "layer ", layer, " holds ", coef_.bytes_in_use(layer),
                   " bytes of coefficients on this basis, expected an empty layer");
    bases_[index(layer, head)] = entry{};
  }
  /// Fits the key and value bases of every kv head of one layer from n tokens of it
  /// (lowrank::fit_basis of each head's rows, ranks key_rank() and value_rank()) and sets them:
  /// what a cache whose bases come from the prompt's first chunk runs before that chunk's append
  /// (runtime/lowrank_storages.hpp's pca storage, compose::projecting). All heads or none: every
  /// basis is fitted before any is set, so a refused fit (n below the larger rank, a non-finite
  /// row) leaves the cache unchanged. `center`, `sinks`: as fit_basis. If the append that follows
  /// fails, clear_layer_bases undoes this.
  /// \param k,v  [n][num_kv_heads][head_dim] floats, as append takes them
  /// \pre the layer holds no coefficients (checked, as set_basis)
  void fit_layer(std::int32_t layer, const float* k, const float* v, std::int32_t n, bool center = false,
                 std::int32_t sinks = 0, const char* who = "kvc::lowrank::projected_cache::fit_layer") {
    KVC_EXPECTS_IN(who, layer >= 0 && layer < cfg_.num_layers, "layer = ", layer, ", expected 0..", cfg_.num_layers - 1);
    const std::int32_t rk = key_rank(), rv = value_rank(), r = std::max(rk, rv);
    KVC_EXPECTS_IN(who, n >= r, "n = ", n, " tokens in the first append of layer ", layer, " (what fits its bases), expected at least max(rank, vrank) = ", r,
                   " (fewer rows span fewer directions; append the prompt in one call; the cache is unchanged)");
    KVC_EXPECTS_IN(who, k != nullptr && v != nullptr, "k or v is null with n = ", n);
    KVC_EXPECTS_IN(who, coef_.bytes_in_use(layer) == 0, "layer ", layer, " already holds ", coef_.bytes_in_use(layer),
                   " bytes of coefficients on its bases, expected a layer with no tokens (bases are fitted once)");
    const std::int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim;
    const std::int64_t stride = static_cast<std::int64_t>(H) * D;
    std::vector<entry> fitted(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) {
      const std::size_t off = static_cast<std::size_t>(h) * D;
      entry& e = fitted[static_cast<std::size_t>(h)];
      e.k = fit_basis(k + off, n, D, stride, rank_spec::of_count(rk), center, sinks);
      e.v = fit_basis(v + off, n, D, stride, rank_spec::of_count(rv), center, sinks);
      e.set = true;
    }
    for (std::int32_t h = 0; h < H; ++h) bases_[index(layer, h)] = std::move(fitted[static_cast<std::size_t>(h)]);  // noexcept
  }
  /// clear_basis of every kv head of one layer (undoes fit_layer; the layer must hold no coefficients).
  void clear_layer_bases(std::int32_t layer) {
    for (std::int32_t h = 0; h < cfg_.num_kv_heads; ++h) clear_basis(layer, h);
  }
  /// The first append of a layer whose bases come from it: fit_layer, then `store()` (the
  /// caller's append of those n tokens, into this cache or into a store of coefficient rows); if
  /// store() throws (pool exhausted, a coefficient past fp16) the bases go again, so the layer is
  /// as before either way.
  template <class Store>
  void fit_layer_then(std::int32_t layer, const float* k, const float* v, std::int32_t n, bool center,
                      std::int32_t sinks, const char* who, Store&& store) {
    fit_layer(layer, k, v, n, center, sinks, who);
    try {
      store();
    } catch (...) {
      clear_layer_bases(layer);
      throw;
    }
  }

  /// Whether (layer, head) has bases; false for a layer or head out of range.
  bool has_basis(std::int32_t layer, std::int32_t head) const noexcept {
    return layer >= 0 && layer < cfg_.num_layers && head >= 0 && head < cfg_.num_kv_heads && bases_[index(layer, head)].set;
  }
  const basis& key_basis(std::int32_t layer, std::int32_t head) const { return get(layer, head, "key_basis").k; }
  const basis& value_basis(std::int32_t layer, std::int32_t head) const { return get(layer, head, "value_basis").v; }

  /// Projects n tokens of every kv head of one layer and appends their coefficients.
  /// \param k,v  [n][num_kv_heads][head_dim] floats (keys before RoPE when config().pre_rope, else after)
  /// \param positions  [n] the tokens' positions (null: the next ones); with pre_rope, what keys are rotated to
  /// \pre every head of the layer has a basis; values finite, and for T = half every coefficient
  /// within fp16's range (|c| <= 65504): both checked before anything changes
  void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions = nullptr) {
    constexpr const char* who = "kvc::lowrank::projected_cache::append";
    KVC_EXPECTS_IN(who, layer >= 0 && layer < cfg_.num_layers, "layer = ", layer, ", expected 0..", cfg_.num_layers - 1);
    KVC_EXPECTS_IN(who, n >= 0, "n = ", n, ", expected >= 0 tokens");
    if (n == 0) return;
    std::vector<float> kr, vr;
    encode(layer, k, v, n, kr, vr, std::is_same<T, half>::value, who);
    coef_.append(s, layer, kr.data(), vr.data(), n, positions);
  }

  /// The rows append() stores for n tokens of one layer, without storing them: kr and vr become
  /// the inner K rows and V rows, [n][num_kv_heads][row_width() / 2] each (the two halves of
  /// [c_k | c_v | pad]). What a caller that keeps the rows in another store encodes with (a pca
  /// cache whose coefficients live in int8 pages, runtime/lowrank_storages.hpp). `fp16_range`:
  /// refuse a coefficient past 65504 (for a store of fp16). Messages start with `who`.
  /// \pre as append (checked: kvc::error, nothing written)
  void encode(std::int32_t layer, const float* k, const float* v, std::int32_t n, std::vector<float>& kr,
              std::vector<float>& vr, bool fp16_range, const char* who) const {
    KVC_EXPECTS_IN(who, layer >= 0 && layer < cfg_.num_layers, "layer = ", layer, ", expected 0..", cfg_.num_layers - 1);
    KVC_EXPECTS_IN(who, n >= 0, "n = ", n, ", expected >= 0 tokens");
    KVC_EXPECTS_IN(who, n == 0 || (k != nullptr && v != nullptr), "k or v is null with n = ", n);
    const std::int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim, rk = key_rank(), w = row_width();
    for (std::int32_t h = 0; h < H; ++h)
      KVC_EXPECTS_IN(who, bases_[index(layer, h)].set, "layer ", layer, " head ", h,
                     " has no basis, expected set_basis(layer, head, ...) before appending");
    const std::size_t total = static_cast<std::size_t>(n) * H * D;
    for (std::size_t i = 0; i < total; ++i) {
      KVC_EXPECTS_IN(who, std::isfinite(k[i]), "k[", i, "] = ", k[i], ", expected a finite value (the cache is unchanged)");
      KVC_EXPECTS_IN(who, std::isfinite(v[i]), "v[", i, "] = ", v[i], ", expected a finite value (the cache is unchanged)");
    }
    // z = [c_k | c_v | pad] per (token, head); its first half is the inner K row, the second the V row.
    std::vector<float> z(static_cast<std::size_t>(n) * H * w, 0.0f);
    for (std::int32_t h = 0; h < H; ++h) {
      const entry& e = bases_[index(layer, h)];
      for (std::int32_t t = 0; t < n; ++t) {
        const std::size_t in = (static_cast<std::size_t>(t) * H + h) * D, out = (static_cast<std::size_t>(t) * H + h) * w;
        project(e.k, k + in, z.data() + out);
        project(e.v, v + in, z.data() + out + rk);
      }
    }
    if (fp16_range) {
      // A finite row can still project past fp16's largest value; stored, it would read back as
      // inf and turn every softmax it enters into NaN.
      constexpr float fp16_max = 65504.0f;
      for (std::size_t i = 0; i < z.size(); ++i)
        if (!(std::abs(z[i]) <= fp16_max)) {
          const std::size_t t = i / (static_cast<std::size_t>(H) * w), h = i / w % H;
          const std::int32_t j = static_cast<std::int32_t>(i % w);
          detail::fail(detail::concat(who, ": ", j < rk ? "key" : "value", " coefficient ", j < rk ? j : j - rk,
                                      " of token ", t, " head ", h, " of layer ", layer, " = ", z[i],
                                      ", expected |c| <= 65504 to store it as fp16 (use float coefficients; the "
                                      "cache is unchanged)"));
        }
    }
    // Split z into the inner cache's K rows and V rows ([n][H][w/2] each).
    const std::int32_t hw = w / 2;
    kr.assign(static_cast<std::size_t>(n) * H * hw, 0.0f);
    vr.assign(kr.size(), 0.0f);
    for (std::size_t i = 0; i < static_cast<std::size_t>(n) * H; ++i)
      for (std::int32_t j = 0; j < hw; ++j) {
        kr[i * hw + j] = z[i * w + j];
        vr[i * hw + j] = z[i * w + hw + j];
      }
  }

  /// Appends to every kv head h of one layer its own n[h] tokens at their own positions: k[h] and
  /// v[h] are [n[h]][head_dim] floats, pos[h] [n[h]] positions. What moves streams that eviction
  /// left ragged in from another store (ThinK's staged prompt, runtime/lowrank_storages.hpp).
  /// All heads or none (the checks of append). seen() grows by max n[h].
  void append_streams(seq_id s, std::int32_t layer, const std::vector<const float*>& k, const std::vector<const float*>& v,
                      const std::vector<std::int32_t>& n, const std::vector<const std::int32_t*>& pos) {
    constexpr const char* who = "kvc::lowrank::projected_cache::append_streams";
    const std::int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim;
    KVC_EXPECTS_IN(who, k.size() == static_cast<std::size_t>(H) && v.size() == k.size() && n.size() == k.size() &&
                            pos.size() == k.size(),
                   "k, v, n and pos hold ", k.size(), ", ", v.size(), ", ", n.size(), " and ", pos.size(),
                   " heads, expected num_kv_heads = ", H, " each");
    std::int32_t N = 0;
    for (std::int32_t h = 0; h < H; ++h) {
      KVC_EXPECTS_IN(who, n[h] >= 0, "n[", h, "] = ", n[h], ", expected >= 0 tokens");
      KVC_EXPECTS_IN(who, n[h] == 0 || (k[h] && v[h] && pos[h]), "head ", h, ": k, v or pos is null with n = ", n[h]);
      N = std::max(N, n[h]);
    }
    if (N == 0) return;
    // One append of N rows per head (the short heads padded with zeros), then one keep that drops
    // the padding and sets each head's positions: all-or-nothing, each step undone if the next fails.
    std::vector<float> kb(static_cast<std::size_t>(N) * H * D, 0.0f), vb(kb.size(), 0.0f);
    std::vector<std::vector<std::int32_t>> before(static_cast<std::size_t>(H)), kept(before.size()), newpos(before.size());
    for (std::int32_t h = 0; h < H; ++h) {
      for (std::int32_t t = 0; t < n[h]; ++t)
        for (std::int32_t d = 0; d < D; ++d) {
          const std::size_t o = (static_cast<std::size_t>(t) * H + h) * D + d, i = static_cast<std::size_t>(t) * D + d;
          kb[o] = k[h][i];
          vb[o] = v[h][i];
        }
      const std::int32_t L = coef_.length(s, layer, h);
      const std::int32_t* p = coef_.positions(s, layer, h);
      for (std::int32_t i = 0; i < L; ++i) before[h].push_back(i), newpos[h].push_back(p[i]);
      kept[h] = before[h];
      for (std::int32_t t = 0; t < n[h]; ++t) kept[h].push_back(L + t), newpos[h].push_back(pos[h][t]);
    }
    append(s, layer, kb.data(), vb.data(), N);
    try {
      coef_.keep_layer_rewrite_keys(s, layer, kept, [](std::int32_t, std::int32_t, T*) {}, &newpos);
    } catch (...) {
      coef_.keep_layer(s, layer, before);  // releases the N rows just appended
      throw;
    }
  }

  /// Keeps tokens kept[0..n) of one stream (eviction), freeing the pages this empties.
  void keep(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n) {
    coef_.keep(s, layer, head, kept, n);
  }
  /// Keeps, for every kv head h of one layer, the tokens kept[h]: all heads change or none does
  /// (kv_cache::keep_layer on the coefficient pages).
  void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) {
    coef_.keep_layer(s, layer, kept);
  }
  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const { return coef_.length(s, layer, head); }
  /// The original positions of one stream's tokens ([length]).
  const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const {
    return coef_.positions(s, layer, head);
  }
  /// Tokens appended to the layer so far, evicted ones included (the next position).
  std::int32_t seen(seq_id s, std::int32_t layer) const { return coef_.seen(s, layer); }
  /// The keys and values one stream stands for, rebuilt in head_dim channels as the decoded views
  /// read them (U c + μ; pre-RoPE keys rotated to their positions): [length][head_dim] each, either
  /// may be null. What eviction scorers read (evict::compressor runs on this store). O(length·D·r);
  /// cpu::projected_gather is the vectorised equivalent.
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out) const {
    const entry& e = get(layer, head, "gather");
    const std::int32_t n = coef_.length(s, layer, head), D = cfg_.head_dim;
    const auto kr = coef_.keys(s, layer, head), vr = coef_.values(s, layer, head);
    const std::int32_t* pos = coef_.positions(s, layer, head);
    const decoded_stream<false> ks{this, kr, vr, &e.k, pos};
    const decoded_stream<true> vs{this, kr, vr, &e.v, pos};
    for (std::int32_t t = 0; t < n; ++t) {
      if (k_out) reconstruct_row(ks, t, k_out + static_cast<std::size_t>(t) * D);
      if (v_out) reconstruct_row(vs, t, v_out + static_cast<std::size_t>(t) * D);
    }
  }
  /// Pool traffic of the coefficient pages (evict::apply_layer reports it).
  memory_traffic traffic() const noexcept { return coef_.traffic(); }

  /// All heads of one layer as views of the rebuilt keys and values (the projection as an
  /// accessor): the double reference and any reader of views read the low-rank store as they read
  /// plain pages; an element read rebuilds its row (O(D r)). The fast path stays
  /// cpu::projected_decode_attention, which attends in the coefficients' space. The result points
  /// into `buf`, which must outlive it.
  layer_view layer(seq_id s, std::int32_t layer, layer_buffer& buf) const {
    const std::int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim;
    buf.reset(H);
    for (std::int32_t h = 0; h < H; ++h) {
      const entry& e = get(layer, h, "layer");
      const auto kr = coef_.keys(s, layer, h), vr = coef_.values(s, layer, h);
      const std::int32_t* pos = coef_.positions(s, layer, h);
      const std::int32_t n = coef_.length(s, layer, h);
      buf.k.push_back(make_decoded_view(decoded_stream<false>{this, kr, vr, &e.k, pos}, n, D));
      buf.v.push_back(make_decoded_view(decoded_stream<true>{this, kr, vr, &e.v, pos}, n, D));
    }
    return {buf.heads(D), this, s, layer};
  }

  /// Row t of a decoded view: its coefficients c (c_k = z[0, r_k), c_v = z[r_k, r_k + r_v)), then
  /// out = Σ_j c_j u_j + μ, rotated to the token's position for pre-RoPE keys.
  template <bool Values>
  void reconstruct_row(const decoded_stream<Values>& src, std::int32_t t, float* out) const {
    const std::int32_t D = cfg_.head_dim, hw = row_width() / 2, r = src.b->rank, j0 = Values ? key_rank() : 0;
    for (std::int32_t d = 0; d < D; ++d) out[d] = src.b->mean.empty() ? 0.0f : src.b->mean[static_cast<std::size_t>(d)];
    for (std::int32_t j = 0; j < r; ++j) {
      const std::int32_t i = j0 + j;
      const float c = static_cast<float>(i < hw ? src.kr(t, 0, i) : src.vr(t, 0, i - hw));
      const float* u = src.b->direction(j);
      for (std::int32_t d = 0; d < D; ++d) out[d] += c * u[d];
    }
    if (!Values && rope_) rope_->apply(out, src.positions[t]);
  }
  /// Pool bytes of the coefficient pages (the bases are metadata_bytes()).
  std::size_t bytes_in_use() const noexcept { return coef_.bytes_in_use(); }
  std::size_t bytes_in_use(std::int32_t layer) const { return coef_.bytes_in_use(layer); }
  /// Host bytes of the bases (U_k, U_v and means, float) plus the coefficient cache's bookkeeping.
  std::size_t metadata_bytes() const noexcept {
    std::size_t b = coef_.metadata_bytes();
    for (const entry& e : bases_) b += 4 * (e.k.u.size() + e.v.u.size() + e.k.mean.size() + e.v.mean.size());
    return b;
  }

 private:
  struct entry {
    basis k, v;
    bool set = false;
  };

  static projected_config validated(const projected_config& c) {
    constexpr const char* who = "kvc::lowrank::projected_cache::projected_cache";
    KVC_EXPECTS_IN(who, c.head_dim > 0, "projected_config.head_dim = ", c.head_dim, ", expected > 0");
    KVC_EXPECTS_IN(who, c.rank >= 1 && c.rank <= c.head_dim, "projected_config.rank = ", c.rank, ", expected 1..",
                   c.head_dim, " (head_dim)");
    KVC_EXPECTS_IN(who, c.value_rank >= 0 && c.value_rank <= c.head_dim, "projected_config.value_rank = ", c.value_rank,
                   ", expected 0 (= rank) or 1..", c.head_dim, " (head_dim)");
    KVC_EXPECTS_IN(who, !c.pre_rope || c.rope.head_dim == c.head_dim, "projected_config.rope.head_dim = ",
                   c.rope.head_dim, ", expected head_dim = ", c.head_dim, " with pre_rope");
    return c;  // the rest is checked by kv_cache, whose messages name cache_config's fields
  }
  static cache_config inner_config(const projected_config& c) {
    cache_config k;
    k.num_layers = c.num_layers;
    k.num_kv_heads = c.num_kv_heads;
    k.head_dim = (c.rank + (c.value_rank != 0 ? c.value_rank : c.rank) + 1) / 2;  // row_width() / 2
    k.page_size = c.page_size;
    k.max_pages = c.max_pages;
    k.check_finite = false;  // append checked the inputs and, for fp16, the coefficients' range
    return k;
  }
  std::size_t index(std::int32_t layer, std::int32_t head) const noexcept {
    return static_cast<std::size_t>(layer) * cfg_.num_kv_heads + head;
  }
  /// The entry of (layer, head), checked; the message names the public member `fn`. The name is
  /// built only on failure: the kernel asks for every query head's bases each step.
  const entry& get(std::int32_t layer, std::int32_t head, const char* fn) const {
    constexpr const char* cls = "kvc::lowrank::projected_cache::";
    if (!(layer >= 0 && layer < cfg_.num_layers))
      detail::fail(detail::concat(cls, fn, ": layer = ", layer, ", expected 0..", cfg_.num_layers - 1));
    if (!(head >= 0 && head < cfg_.num_kv_heads))
      detail::fail(detail::concat(cls, fn, ": head = ", head, ", expected 0..", cfg_.num_kv_heads - 1));
    const entry& e = bases_[index(layer, head)];
    if (!e.set)
      detail::fail(detail::concat(cls, fn, ": layer ", layer, " head ", head, " has no basis, expected set_basis first"));
    return e;
  }
  /// c[j] = u_j · (x − μ), in float (the kernel's precision; a double reference checks it).
  static void project(const basis& b, const float* x, float* c) noexcept {
    const std::int32_t D = b.dim;
    const float* mu = b.mean.empty() ? nullptr : b.mean.data();
    for (std::int32_t j = 0; j < b.rank; ++j) {
      const float* u = b.direction(j);
      float s = 0;
      if (mu)
        for (std::int32_t d = 0; d < D; ++d) s += u[d] * (x[d] - mu[d]);
      else
        for (std::int32_t d = 0; d < D; ++d) s += u[d] * x[d];
      c[j] = s;
    }
  }

  projected_config cfg_;
  coefficient_cache coef_;
  std::vector<entry> bases_;  // [layer * num_kv_heads + head]
  std::optional<rope> rope_;  // with pre_rope
};

}  // namespace lowrank
KVC_END_NAMESPACE
