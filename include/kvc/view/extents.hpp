// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// A minimal, mdspan-compatible `extents`: static extents cost no storage and let kernels
/// specialise on head_dim and kv-head count at compile time (what FlashInfer's DISPATCH_HEAD_DIM
/// does with macros).

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <kvc/config.hpp>

KVC_BEGIN_NAMESPACE

inline constexpr std::size_t dynamic_extent = std::numeric_limits<std::size_t>::max();

/// \tparam IndexType  signed or unsigned integer used for indices and offsets
/// \tparam Exts       one value per rank; dynamic_extent for a run-time extent
template <class IndexType, std::size_t... Exts>
class extents {
  static_assert(std::is_integral<IndexType>::value,
                "kvc::extents: IndexType must be an integer type such as std::int32_t");

 public:
  using index_type = IndexType;
  using size_type = std::make_unsigned_t<IndexType>;
  using rank_type = std::size_t;

  static constexpr rank_type rank() noexcept { return sizeof...(Exts); }
  static constexpr rank_type rank_dynamic() noexcept {
    return ((Exts == dynamic_extent ? 1 : 0) + ... + 0);
  }
  static constexpr std::size_t static_extent(rank_type r) noexcept {
    constexpr std::size_t e[] = {Exts...};
    return e[r];
  }

  constexpr extents() noexcept = default;

  /// One value per dynamic extent, in order (mdspan's constructor from dynamic extents).
  template <class... Ints,
            std::enable_if_t<sizeof...(Ints) == rank_dynamic() && rank_dynamic() != 0, int> = 0>
  KVC_HOST_DEVICE constexpr explicit extents(Ints... dyn) noexcept
      : dyn_{static_cast<index_type>(dyn)...} {}

  /// One value per rank; the static ones must match (checked with KVC_ASSERT by the caller).
  template <class... Ints, std::enable_if_t<sizeof...(Ints) == rank() && rank_dynamic() != rank() &&
                                                 rank_dynamic() != 0,
                                             int> = 0>
  KVC_HOST_DEVICE constexpr explicit extents(Ints... all) noexcept : dyn_{} {
    const index_type v[] = {static_cast<index_type>(all)...};
    rank_type j = 0;
    for (rank_type r = 0; r < rank(); ++r)
      if (static_extent(r) == dynamic_extent) dyn_[j++] = v[r];
  }

  KVC_HOST_DEVICE constexpr index_type extent(rank_type r) const noexcept {
    if (static_extent(r) != dynamic_extent) return static_cast<index_type>(static_extent(r));
    rank_type j = 0;
    for (rank_type i = 0; i < r; ++i)
      if (static_extent(i) == dynamic_extent) ++j;
    return dyn_[j];
  }

  template <class I2, std::size_t... E2>
  KVC_HOST_DEVICE friend constexpr bool operator==(const extents& a, const extents<I2, E2...>& b) noexcept {
    if (a.rank() != b.rank()) return false;
    for (rank_type r = 0; r < a.rank(); ++r)
      if (a.extent(r) != static_cast<index_type>(b.extent(r))) return false;
    return true;
  }

 private:
  std::array<index_type, rank_dynamic() == 0 ? 1 : rank_dynamic()> dyn_{};
};

/// Rank-3 extents (token, head, dim) with every extent known at run time.
template <class IndexType = std::int32_t>
using kv_dextents = extents<IndexType, dynamic_extent, dynamic_extent, dynamic_extent>;

/// Rank-3 extents with static heads and head_dim, the common case in an engine.
template <std::size_t Heads, std::size_t HeadDim, class IndexType = std::int32_t>
using kv_extents = extents<IndexType, dynamic_extent, Heads, HeadDim>;

KVC_END_NAMESPACE
