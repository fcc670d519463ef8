// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// The kv-heads of one layer of one sequence, as the attention kernels and scorers consume them:
/// `num_kv_heads()`, `head_dim()`, `keys(h)`, `values(h)` and `index(h)`, the head index to use
/// inside those views. Two shapes cover every source:
///  - `stream_heads`: one view per head (kvc's store, where heads have their own lengths);
///  - `same_heads`: one multi-head view for all heads (an engine's dense or block cache).

#include <cstdint>
#include <type_traits>
#include <utility>

#include <kvc/config.hpp>

KVC_BEGIN_NAMESPACE

/// Head h reads keys(h)/values(h) at in-view head index 0.
template <class KView, class VView = KView>
struct stream_heads {
  using key_view = KView;
  using value_view = VView;
  const KView* k;  ///< [num_heads]
  const VView* v;  ///< [num_heads]
  std::int32_t num_heads;
  std::int32_t dim;
  std::int32_t num_kv_heads() const noexcept { return num_heads; }
  std::int32_t head_dim() const noexcept { return dim; }
  const KView& keys(std::int32_t h) const noexcept { return k[h]; }
  const VView& values(std::int32_t h) const noexcept { return v[h]; }
  static constexpr std::int32_t index(std::int32_t) noexcept { return 0; }
};

/// Head h reads the shared K/V views at in-view head index h.
template <class KView, class VView = KView>
struct same_heads {
  using key_view = KView;
  using value_view = VView;
  KView k;
  VView v;
  std::int32_t num_kv_heads() const noexcept { return static_cast<std::int32_t>(k.extent(1)); }
  std::int32_t head_dim() const noexcept { return static_cast<std::int32_t>(k.extent(2)); }
  const KView& keys(std::int32_t) const noexcept { return k; }
  const VView& values(std::int32_t) const noexcept { return v; }
  static constexpr std::int32_t index(std::int32_t h) noexcept { return h; }
};

template <class KView, class VView>
same_heads<KView, VView> make_same_heads(const KView& k, const VView& v) {
  return {k, v};
}

/// stream_heads whose tokens carry a log-weight each, added to the token's logit: a merged token
/// standing for m tokens has log m, so it gets their softmax mass (kvc/store/merged_cache.hpp).
/// Readers that honour it: kvc::reference::decode_attention and the merged kernels; the plain
/// kernels refuse such heads at compile time instead of ignoring the weights.
template <class KView, class VView = KView>
struct weighted_stream_heads : stream_heads<KView, VView> {
  const float* const* lw;  ///< [num_heads] -> [tokens of that head]
  const float* log_weights(std::int32_t h) const noexcept { return lw[h]; }
};

/// Heads that name the store, sequence and layer they were read from (what a store's `layer()`
/// returns). Readers of views read Base as usual; a kernel that reads the store's encoding
/// directly overloads on store_layer<TheStore, ...> and calls its store entry point with them, so
/// one call, decode_attention(store.layer(seq, layer, buf), q, ...), runs each store's own kernel.
template <class Store, class Base>
struct store_layer : Base {
  const Store* store;
  std::int32_t seq;
  std::int32_t layer;
};

namespace detail {
template <class H>
struct is_store_layer : std::false_type {};
template <class Store, class Base>
struct is_store_layer<store_layer<Store, Base>> : std::true_type {};
}  // namespace detail

/// True for heads a store's `layer()` returned (store_layer): they have a kernel of their own.
template <class Heads>
inline constexpr bool is_store_layer_v = detail::is_store_layer<Heads>::value;

namespace detail {
template <class H, class = void>
struct has_log_weights : std::false_type {};
template <class H>
struct has_log_weights<H, std::void_t<decltype(std::declval<const H&>().log_weights(0))>> : std::true_type {};
}  // namespace detail

/// True for heads whose tokens carry log-weights (weighted_stream_heads).
template <class Heads>
inline constexpr bool has_log_weights_v = detail::has_log_weights<Heads>::value;

KVC_END_NAMESPACE
