// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// What kvc's layouts share beyond the mdspan LayoutMapping requirements: a *row run*, a stretch
/// of consecutive tokens of one head whose `head_dim` elements are contiguous. Kernels walk runs
/// so that paging costs one table lookup per page, not one per element.

#include <cstdint>

#include <kvc/config.hpp>

KVC_BEGIN_NAMESPACE

/// Element offsets into a KV buffer. 64-bit whatever the extents' index type: a paged offset is
/// page id x page stride, which leaves int32 at vLLM block 40000 of 16 x 32 x 128 elements and
/// at page 2^19 of kvc's own 16-token, head_dim 128 pages.
using offset_type = std::int64_t;

/// Tokens [t, t + length) of one head: token t + i's row starts at offset + i * token_stride.
template <class IndexType>
struct row_run {
  offset_type offset;
  IndexType length;
  IndexType token_stride;
};

/// Order of the three axes inside one page (or a dense cache), outermost first.
enum class page_order {
  nhd,  ///< [token][head][dim]: vLLM's and FlashInfer's default
  hnd,  ///< [head][token][dim]: one head's tokens are contiguous rows
  hdn,  ///< [head][dim][token]: token innermost, so per-channel groups (KIVI keys) are contiguous
};

namespace detail {
KVC_HOST_DEVICE constexpr bool is_pow2(std::int64_t x) noexcept { return x > 0 && (x & (x - 1)) == 0; }
KVC_HOST_DEVICE constexpr int log2_exact(std::int64_t x) noexcept {
  int s = 0;
  while ((std::int64_t{1} << s) < x) ++s;
  return s;
}
}  // namespace detail

KVC_END_NAMESPACE
