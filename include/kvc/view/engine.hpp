// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Zero-copy views of the KV layouts engines already use, so kvc's kernels and scorers can read an
/// engine's cache in place:
///  - vLLM-style block arrays, `[num_blocks, block_size, heads, dim]` (NHD) or
///    `[num_blocks, heads, block_size, dim]` (HND), one block table per sequence;
///  - FlashInfer-style CSR page tables (`indptr`, `indices`, `last_page_len`) over a pool of pages.

#include <cstdint>

#include <kvc/error.hpp>
#include <kvc/view/extents.hpp>
#include <kvc/view/kv_view.hpp>
#include <kvc/view/layout_paged.hpp>

KVC_BEGIN_NAMESPACE

template <class T, page_order Order = page_order::nhd>
using paged_view = kv_view<T, kv_dextents<>, layout_paged<Order>>;

/// View of one sequence in a vLLM-style block array.
/// \param blocks       base of the K (or V) cache, [num_blocks, ...] in `Order`
/// \param block_table  this sequence's block ids, ceil(tokens / block_size) of them
/// \pre block_size is a power of two; tokens, heads, dim > 0 (heads and dim), tokens >= 0
template <page_order Order = page_order::nhd, class T>
paged_view<T, Order> vllm_block_view(T* blocks, const std::int32_t* block_table, std::int32_t tokens,
                                     std::int32_t block_size, std::int32_t heads, std::int32_t dim) {
  static_assert(Order != page_order::hdn, "kvc::vllm_block_view: vLLM blocks are NHD or HND");
  KVC_EXPECTS(detail::is_pow2(block_size), "block_size = ", block_size, ", expected a power of two");
  KVC_EXPECTS(tokens >= 0, "tokens = ", tokens, ", expected >= 0");
  KVC_EXPECTS(heads > 0 && dim > 0, "heads = ", heads, ", dim = ", dim, ", expected both > 0");
  KVC_EXPECTS(tokens == 0 || block_table != nullptr, "block_table is null for ", tokens, " tokens");
  using M = typename layout_paged<Order>::template mapping<kv_dextents<>>;
  return {blocks, M(kv_dextents<>(tokens, heads, dim), block_table, block_size)};
}

/// A batch of sequences in FlashInfer's CSR page-table form. Owns nothing.
/// Sequence i holds pages indices[indptr[i] .. indptr[i+1]) and its last page holds
/// last_page_len[i] tokens (1..page_size; an empty sequence has no pages).
template <class T, page_order Order = page_order::nhd>
class paged_batch {
 public:
  using view_type = paged_view<T, Order>;

  /// \param pool         base of the page pool for K (or V)
  /// \param page_stride  elements from one page to the next (2*P*H*D for FlashInfer's combined
  ///                     [pages, 2, P, H, D] cache, P*H*D for separate K and V arrays)
  /// \param page_offset  elements from a page's start to this tensor (P*H*D for V when combined)
  paged_batch(T* pool, std::int32_t batch, const std::int32_t* indptr, const std::int32_t* indices,
              const std::int32_t* last_page_len, std::int32_t page_size, std::int32_t heads,
              std::int32_t dim, std::int32_t page_stride = 0, std::int32_t page_offset = 0)
      : pool_(pool), batch_(batch), indptr_(indptr), indices_(indices), last_(last_page_len),
        page_size_(page_size), heads_(heads), dim_(dim),
        stride_(page_stride ? page_stride : page_size * heads * dim), offset_(page_offset) {
    KVC_EXPECTS(batch >= 0, "batch = ", batch, ", expected >= 0");
    KVC_EXPECTS(detail::is_pow2(page_size), "page_size = ", page_size, ", expected a power of two");
    KVC_EXPECTS(heads > 0 && dim > 0, "heads = ", heads, ", dim = ", dim, ", expected both > 0");
    KVC_EXPECTS(stride_ >= page_size * heads * dim, "page_stride = ", stride_, ", expected >= page_size*heads*dim = ",
                page_size * heads * dim);
    for (std::int32_t i = 0; i < batch; ++i) {
      const std::int32_t n = indptr[i + 1] - indptr[i];
      KVC_EXPECTS(n >= 0, "indptr[", i + 1, "] = ", indptr[i + 1], " < indptr[", i, "] = ", indptr[i]);
      KVC_EXPECTS(n == 0 || (last_page_len[i] >= 1 && last_page_len[i] <= page_size), "last_page_len[", i,
                  "] = ", last_page_len[i], ", expected 1..", page_size);
    }
  }

  std::int32_t size() const noexcept { return batch_; }
  std::int32_t tokens(std::int32_t i) const noexcept {
    const std::int32_t n = indptr_[i + 1] - indptr_[i];
    return n == 0 ? 0 : (n - 1) * page_size_ + last_[i];
  }
  /// The view of sequence i.
  view_type seq(std::int32_t i) const {
    KVC_EXPECTS(i >= 0 && i < batch_, "i = ", i, ", expected 0..", batch_ - 1);
    using M = typename view_type::mapping_type;
    return {pool_, M(kv_dextents<>(tokens(i), heads_, dim_), indices_ + indptr_[i], page_size_, stride_, offset_)};
  }

 private:
  T* pool_;
  std::int32_t batch_;
  const std::int32_t* indptr_;
  const std::int32_t* indices_;
  const std::int32_t* last_;
  std::int32_t page_size_, heads_, dim_, stride_, offset_;
};

KVC_END_NAMESPACE
