// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Paged KV layout: a logical (token, head, dim) goes through a page table to an offset in a
/// pool of pages. Paging is a layout, not a container, so the same kernels read kvc's store,
/// vLLM block arrays and FlashInfer page tables without copies.

#include <cstddef>
#include <cstdint>

#include <kvc/config.hpp>
#include <kvc/view/extents.hpp>
#include <kvc/view/layout_common.hpp>

KVC_BEGIN_NAMESPACE

/// \tparam Order     axis order inside one page
/// \tparam PageSize  tokens per page; dynamic_extent for a run-time power of two
template <page_order Order, std::size_t PageSize = dynamic_extent>
struct layout_paged {
  static_assert(PageSize == dynamic_extent || (PageSize > 0 && (PageSize & (PageSize - 1)) == 0),
                "kvc::layout_paged: PageSize must be a power of two (or dynamic_extent for a run-time one)");

  template <class Extents>
  class mapping {
    static_assert(Extents::rank() == 3, "kvc::layout_paged: KV views are rank 3 (token, head, dim)");

   public:
    using extents_type = Extents;
    using index_type = typename Extents::index_type;
    using size_type = typename Extents::size_type;
    using rank_type = typename Extents::rank_type;
    using layout_type = layout_paged;
    using offset_type = ::kvc::offset_type;
    static constexpr bool dim_contiguous = Order != page_order::hdn;
    static constexpr page_order order = Order;

    mapping() = default;

    /// \param e            (tokens, heads, head_dim) of this sequence
    /// \param page_table   page ids, ceil(tokens / page_size) of them; must outlive the mapping
    /// \param page_size    tokens per page; ignored (and checked equal) when PageSize is static
    /// \param page_stride  elements from one page to the next in the pool (>= page_size*heads*dim)
    /// \param page_offset  elements from the start of a page to this tensor (e.g. V after K)
    /// \pre page_size is a power of two; checked by the factory functions, asserted here
    KVC_HOST_DEVICE mapping(const Extents& e, const std::int32_t* page_table, index_type page_size,
                            offset_type page_stride, offset_type page_offset = 0) noexcept
        : ext_(e), table_(page_table), stride_(page_stride), offset_(page_offset),
          shift_(static_cast<index_type>(detail::log2_exact(page_size))) {}

    /// Dense page stride: page_size * heads * dim.
    KVC_HOST_DEVICE mapping(const Extents& e, const std::int32_t* page_table, index_type page_size) noexcept
        : mapping(e, page_table, page_size, offset_type{page_size} * e.extent(1) * e.extent(2), 0) {}

    KVC_HOST_DEVICE constexpr const extents_type& extents() const noexcept { return ext_; }
    KVC_HOST_DEVICE constexpr index_type page_size() const noexcept {
      if constexpr (PageSize != dynamic_extent) return static_cast<index_type>(PageSize);
      else return index_type{1} << shift_;
    }
    KVC_HOST_DEVICE constexpr const std::int32_t* page_table() const noexcept { return table_; }
    KVC_HOST_DEVICE constexpr offset_type page_stride() const noexcept { return stride_; }
    KVC_HOST_DEVICE constexpr offset_type page_offset() const noexcept { return offset_; }
    KVC_HOST_DEVICE constexpr index_type num_pages() const noexcept {
      return (ext_.extent(0) + page_size() - 1) / page_size();
    }

    /// Offset of (slot, head, dim) inside one page, in elements.
    KVC_HOST_DEVICE constexpr offset_type in_page(index_type s, index_type h, index_type d) const noexcept {
      const offset_type H = ext_.extent(1), D = ext_.extent(2), P = page_size();
      if constexpr (Order == page_order::nhd) return (s * H + h) * D + d;
      else if constexpr (Order == page_order::hnd) return (h * P + s) * D + d;
      else return (h * D + d) * P + s;
    }

    /// 64-bit, unlike mdspan's index_type result: the page id times the stride is a pool offset,
    /// not an index into this sequence, and exceeds int32 in pools of a few GB.
    KVC_HOST_DEVICE constexpr offset_type operator()(index_type t, index_type h, index_type d) const noexcept {
      const offset_type page = table_[t >> shift()];
      return page * stride_ + offset_ + in_page(t & (page_size() - 1), h, d);
    }

    /// Tokens from t to the end of t's page (or of the sequence).
    KVC_HOST_DEVICE constexpr row_run<index_type> run(index_type t, index_type h) const noexcept {
      const index_type left_in_page = page_size() - (t & (page_size() - 1));
      const index_type left = ext_.extent(0) - t;
      const index_type ts = Order == page_order::nhd ? ext_.extent(1) * ext_.extent(2)
                            : Order == page_order::hnd ? ext_.extent(2)
                                                       : index_type{1};
      return {(*this)(t, h, 0), left < left_in_page ? left : left_in_page, ts};
    }

    /// The largest offset + 1 this mapping can produce is unknown without the table; the pool
    /// size is the caller's. Reported as the span of the pages the table can name if they are
    /// the first num_pages() of the pool, which is what mdspan needs only for debug checks.
    KVC_HOST_DEVICE constexpr offset_type required_span_size() const noexcept {
      offset_type m = 0;
      for (index_type i = 0; i < num_pages(); ++i)
        if (offset_type{table_[i]} + 1 > m) m = offset_type{table_[i]} + 1;
      return m * stride_;
    }

    static constexpr bool is_always_unique() noexcept { return true; }  // \pre no page repeats
    static constexpr bool is_always_exhaustive() noexcept { return false; }
    static constexpr bool is_always_strided() noexcept { return false; }
    static constexpr bool is_unique() noexcept { return true; }
    static constexpr bool is_exhaustive() noexcept { return false; }
    static constexpr bool is_strided() noexcept { return false; }
    KVC_HOST_DEVICE friend constexpr bool operator==(const mapping& a, const mapping& b) noexcept {
      return a.ext_ == b.ext_ && a.table_ == b.table_ && a.stride_ == b.stride_ &&
             a.offset_ == b.offset_ && a.page_size() == b.page_size();
    }

   private:
    KVC_HOST_DEVICE constexpr index_type shift() const noexcept {
      if constexpr (PageSize != dynamic_extent) return static_cast<index_type>(detail::log2_exact(PageSize));
      else return shift_;
    }

    Extents ext_{};
    const std::int32_t* table_ = nullptr;
    offset_type stride_ = 0;
    offset_type offset_ = 0;
    index_type shift_ = 0;
  };
};

KVC_END_NAMESPACE
