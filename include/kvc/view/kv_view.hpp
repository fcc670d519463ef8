// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `kv_view`: a non-owning, trivially copyable, mdspan-shaped view of one K or V tensor of one
/// sequence, indexed (token, head, dim). Where elements are is the Layout; how they are read and
/// in which memory space is the Accessor.

#include <cstdint>
#include <type_traits>

#include <kvc/config.hpp>
#include <kvc/view/accessor.hpp>
#include <kvc/view/extents.hpp>
#include <kvc/view/layout_common.hpp>

KVC_BEGIN_NAMESPACE

template <class ElementType, class Extents, class Layout, class Accessor = default_accessor<ElementType>>
class kv_view {
  static_assert(Extents::rank() == 3,
                "kvc::kv_view: a KV view is rank 3 (token, head, dim); use kvc::kv_dextents<> or "
                "kvc::kv_extents<Heads, HeadDim>");
  static_assert(std::is_same<ElementType, typename Accessor::element_type>::value,
                "kvc::kv_view: ElementType must equal Accessor::element_type");

 public:
  using element_type = ElementType;
  using value_type = std::remove_cv_t<ElementType>;
  using extents_type = Extents;
  using layout_type = Layout;
  using accessor_type = Accessor;
  using mapping_type = typename Layout::template mapping<Extents>;
  using index_type = typename Extents::index_type;
  using size_type = typename Extents::size_type;
  using rank_type = typename Extents::rank_type;
  using data_handle_type = typename Accessor::data_handle_type;
  using reference = typename Accessor::reference;
  using memory_space = typename Accessor::memory_space;

  kv_view() = default;
  KVC_HOST_DEVICE constexpr kv_view(data_handle_type p, const mapping_type& m, const Accessor& a = Accessor{}) noexcept
      : ptr_(p), map_(m), acc_(a) {}

  static constexpr rank_type rank() noexcept { return 3; }
  KVC_HOST_DEVICE constexpr index_type extent(rank_type r) const noexcept { return map_.extents().extent(r); }
  KVC_HOST_DEVICE constexpr const extents_type& extents() const noexcept { return map_.extents(); }
  KVC_HOST_DEVICE constexpr index_type tokens() const noexcept { return extent(0); }
  KVC_HOST_DEVICE constexpr index_type heads() const noexcept { return extent(1); }
  KVC_HOST_DEVICE constexpr index_type head_dim() const noexcept { return extent(2); }

  KVC_HOST_DEVICE constexpr reference operator()(index_type t, index_type h, index_type d) const noexcept {
    return acc_.access(ptr_, static_cast<std::size_t>(map_(t, h, d)));
  }

  KVC_HOST_DEVICE constexpr const data_handle_type& data_handle() const noexcept { return ptr_; }
  KVC_HOST_DEVICE constexpr const mapping_type& mapping() const noexcept { return map_; }
  KVC_HOST_DEVICE constexpr const accessor_type& accessor() const noexcept { return acc_; }

  /// Tokens [t, t + run.length) of head h as rows; only for layouts whose dim axis is contiguous.
  KVC_HOST_DEVICE constexpr row_run<index_type> run(index_type t, index_type h) const noexcept {
    return map_.run(t, h);
  }

 private:
  data_handle_type ptr_{};
  mapping_type map_{};
  accessor_type acc_{};
};

KVC_END_NAMESPACE
