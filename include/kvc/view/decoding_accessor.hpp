// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `decoding_accessor`: an encoding as an accessor. A kv_view with it reads a store's encoded pages
/// (quantized codes, sinks, residual windows) as decoded floats, so that the double reference, a
/// scorer or a user reads any encoding through the same view as plain pages. The data handle is a
/// *source*: a small copyable object that decodes one row of head_dim values,
///
///     void decode_row(std::int64_t row, float* out) const;   // row = offset / head_dim
///
/// (for the usual [token][1][head_dim] mapping, row is the token). An element read decodes its
/// whole row: O(head_dim) per element, for references and tests. Kernels that read rows ask the
/// accessor for a row at once (`decode_row`, detected by `accessor_decodes_rows_v`): the CPU decode
/// kernel then costs one row decode per token; the stores' own kernels read the codes directly.

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <kvc/config.hpp>
#include <kvc/view/accessor.hpp>
#include <kvc/view/extents.hpp>
#include <kvc/view/heads.hpp>
#include <kvc/view/kv_view.hpp>
#include <kvc/view/layout_dense.hpp>

KVC_BEGIN_NAMESPACE

/// \tparam Source  decode_row(std::int64_t row, float* out) const; trivially copyable is best (views
///                 are passed by value)
template <class Source>
struct decoding_accessor {
  using offset_policy = decoding_accessor;
  using element_type = const float;
  using reference = float;  ///< a decoded value, not a reference into the pages
  using data_handle_type = Source;
  using memory_space = host_memory;
  static constexpr bool is_plain = false;
  /// Rows up to this many values are decoded on the stack by access().
  static constexpr std::int32_t stack_dim = 256;

  decoding_accessor() = default;
  explicit constexpr decoding_accessor(std::int32_t head_dim) noexcept : dim(head_dim) {}

  /// Element `i` of the view's index space: row i / dim, column i % dim.
  reference access(const data_handle_type& src, std::size_t i) const {
    const std::size_t D = static_cast<std::size_t>(dim);
    if (dim <= stack_dim) {
      float row[stack_dim];
      src.decode_row(static_cast<std::int64_t>(i / D), row);
      return row[i % D];
    }
    std::vector<float> row(D);
    src.decode_row(static_cast<std::int64_t>(i / D), row.data());
    return row[i % D];
  }
  /// The row whose first element is at offset `i` (a multiple of dim), decoded into out[0..dim).
  void decode_row(const data_handle_type& src, std::size_t i, float* out) const {
    src.decode_row(static_cast<std::int64_t>(i / static_cast<std::size_t>(dim)), out);
  }

  std::int32_t dim = 0;  ///< values per row (the view's head_dim)
};

/// One stream's K or V read through Source: [tokens][1][head_dim] decoded floats.
template <class Source>
using decoded_view = kv_view<const float, kv_dextents<>, layout_nhd, decoding_accessor<Source>>;

/// The decoded view of `tokens` rows of `head_dim` values that src decodes.
template <class Source>
decoded_view<Source> make_decoded_view(const Source& src, std::int32_t tokens, std::int32_t head_dim) {
  return {src, typename decoded_view<Source>::mapping_type(kv_dextents<>(tokens, 1, head_dim)),
          decoding_accessor<Source>(head_dim)};
}

/// Where a store's layer() puts the decoded views of its heads.
template <class KSource, class VSource>
struct decoded_layer_buffer {
  std::vector<decoded_view<KSource>> k;
  std::vector<decoded_view<VSource>> v;
  /// Empties both, with room for `heads` views each.
  void reset(std::int32_t heads) {
    k.clear();
    v.clear();
    k.reserve(static_cast<std::size_t>(heads));
    v.reserve(static_cast<std::size_t>(heads));
  }
  /// The views pushed since reset, as the heads of one layer.
  stream_heads<decoded_view<KSource>, decoded_view<VSource>> heads(std::int32_t head_dim) const {
    return {k.data(), v.data(), static_cast<std::int32_t>(k.size()), head_dim};
  }
};

namespace detail {
template <class A, class = void>
struct accessor_decodes_rows : std::false_type {};
template <class A>
struct accessor_decodes_rows<A, std::void_t<decltype(std::declval<const A&>().decode_row(
                                    std::declval<const typename A::data_handle_type&>(), std::size_t{},
                                    static_cast<float*>(nullptr)))>> : std::true_type {};
}  // namespace detail

/// True when the accessor decodes a whole row at once (decoding_accessor): kernels read rows
/// through it instead of element by element.
template <class A>
inline constexpr bool accessor_decodes_rows_v = detail::accessor_decodes_rows<A>::value;

KVC_END_NAMESPACE
