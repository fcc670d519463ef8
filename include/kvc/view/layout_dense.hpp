// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Dense, contiguous KV layouts: NHD ([token][head][dim], i.e. mdspan's layout_right) and HND
/// ([head][token][dim] with a token capacity, the layout of a preallocated per-head cache).

#include <kvc/config.hpp>
#include <kvc/view/layout_common.hpp>

KVC_BEGIN_NAMESPACE

/// [token][head][dim], row-major.
struct layout_nhd {
  template <class Extents>
  class mapping {
    static_assert(Extents::rank() == 3, "kvc::layout_nhd: KV views are rank 3 (token, head, dim)");

   public:
    using extents_type = Extents;
    using index_type = typename Extents::index_type;
    using size_type = typename Extents::size_type;
    using rank_type = typename Extents::rank_type;
    using layout_type = layout_nhd;
    using offset_type = ::kvc::offset_type;
    /// Kernels may read a head's dim axis as one contiguous row.
    static constexpr bool dim_contiguous = true;

    mapping() = default;
    KVC_HOST_DEVICE constexpr explicit mapping(const Extents& e) noexcept : ext_(e) {}

    KVC_HOST_DEVICE constexpr const extents_type& extents() const noexcept { return ext_; }
    KVC_HOST_DEVICE constexpr offset_type operator()(index_type t, index_type h, index_type d) const noexcept {
      return (offset_type{t} * ext_.extent(1) + h) * ext_.extent(2) + d;
    }
    KVC_HOST_DEVICE constexpr offset_type required_span_size() const noexcept {
      return offset_type{ext_.extent(0)} * ext_.extent(1) * ext_.extent(2);
    }
    KVC_HOST_DEVICE constexpr index_type stride(rank_type r) const noexcept {
      return r == 2 ? 1 : r == 1 ? ext_.extent(2) : ext_.extent(1) * ext_.extent(2);
    }
    KVC_HOST_DEVICE constexpr row_run<index_type> run(index_type t, index_type h) const noexcept {
      return {(*this)(t, h, 0), ext_.extent(0) - t, ext_.extent(1) * ext_.extent(2)};
    }
    static constexpr bool is_always_unique() noexcept { return true; }
    static constexpr bool is_always_exhaustive() noexcept { return true; }
    static constexpr bool is_always_strided() noexcept { return true; }
    static constexpr bool is_unique() noexcept { return true; }
    static constexpr bool is_exhaustive() noexcept { return true; }
    static constexpr bool is_strided() noexcept { return true; }
    KVC_HOST_DEVICE friend constexpr bool operator==(const mapping& a, const mapping& b) noexcept {
      return a.ext_ == b.ext_;
    }

   private:
    Extents ext_{};
  };
};

/// [head][token capacity][dim]: each head's rows are contiguous; `capacity` >= tokens.
struct layout_hnd {
  template <class Extents>
  class mapping {
    static_assert(Extents::rank() == 3, "kvc::layout_hnd: KV views are rank 3 (token, head, dim)");

   public:
    using extents_type = Extents;
    using index_type = typename Extents::index_type;
    using size_type = typename Extents::size_type;
    using rank_type = typename Extents::rank_type;
    using layout_type = layout_hnd;
    using offset_type = ::kvc::offset_type;
    static constexpr bool dim_contiguous = true;

    mapping() = default;
    KVC_HOST_DEVICE constexpr explicit mapping(const Extents& e) noexcept : ext_(e), capacity_(e.extent(0)) {}
    /// \pre capacity >= e.extent(0) (the caller's preallocated token slots per head)
    KVC_HOST_DEVICE constexpr mapping(const Extents& e, index_type capacity) noexcept
        : ext_(e), capacity_(capacity) {}

    KVC_HOST_DEVICE constexpr const extents_type& extents() const noexcept { return ext_; }
    KVC_HOST_DEVICE constexpr index_type capacity() const noexcept { return capacity_; }
    KVC_HOST_DEVICE constexpr offset_type operator()(index_type t, index_type h, index_type d) const noexcept {
      return (offset_type{h} * capacity_ + t) * ext_.extent(2) + d;
    }
    KVC_HOST_DEVICE constexpr offset_type required_span_size() const noexcept {
      return offset_type{ext_.extent(1)} * capacity_ * ext_.extent(2);
    }
    KVC_HOST_DEVICE constexpr index_type stride(rank_type r) const noexcept {
      return r == 2 ? 1 : r == 0 ? ext_.extent(2) : capacity_ * ext_.extent(2);
    }
    KVC_HOST_DEVICE constexpr row_run<index_type> run(index_type t, index_type h) const noexcept {
      return {(*this)(t, h, 0), ext_.extent(0) - t, ext_.extent(2)};
    }
    static constexpr bool is_always_unique() noexcept { return true; }
    static constexpr bool is_always_exhaustive() noexcept { return false; }
    static constexpr bool is_always_strided() noexcept { return true; }
    static constexpr bool is_unique() noexcept { return true; }
    KVC_HOST_DEVICE constexpr bool is_exhaustive() const noexcept { return capacity_ == ext_.extent(0); }
    static constexpr bool is_strided() noexcept { return true; }
    KVC_HOST_DEVICE friend constexpr bool operator==(const mapping& a, const mapping& b) noexcept {
      return a.ext_ == b.ext_ && a.capacity_ == b.capacity_;
    }

   private:
    Extents ext_{};
    index_type capacity_ = 0;
  };
};

KVC_END_NAMESPACE
