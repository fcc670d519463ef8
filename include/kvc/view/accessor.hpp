// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Accessors decide how an element is read (its encoding) and where it lives (its memory space).
/// Quantized encodings plug in here as accessors whose `reference` is a decoded value; layouts
/// never change for them.

#include <cstddef>
#include <type_traits>

#include <kvc/config.hpp>

KVC_BEGIN_NAMESPACE

/// Memory-space tags. The backend (CPU or CUDA) is chosen from these at compile time.
struct host_memory {};
struct device_memory {};

/// Plain element access in host memory (mdspan's default_accessor plus a memory space).
template <class ElementType>
struct default_accessor {
  using offset_policy = default_accessor;
  using element_type = ElementType;
  using reference = ElementType&;
  using data_handle_type = ElementType*;
  using memory_space = host_memory;
  /// Plain accessors let kernels take row pointers and vectorise the dim axis.
  static constexpr bool is_plain = true;

  constexpr default_accessor() noexcept = default;
  template <class Other, std::enable_if_t<std::is_convertible<Other (*)[], ElementType (*)[]>::value, int> = 0>
  KVC_HOST_DEVICE constexpr default_accessor(default_accessor<Other>) noexcept {}

  KVC_HOST_DEVICE constexpr reference access(data_handle_type p, std::size_t i) const noexcept { return p[i]; }
  KVC_HOST_DEVICE constexpr data_handle_type offset(data_handle_type p, std::size_t i) const noexcept { return p + i; }
};

/// Same encoding as Accessor, but the data lives in device memory: only the CUDA backend may
/// read it (libcu++'s device_accessor idea).
template <class Accessor>
struct device_accessor : Accessor {
  using offset_policy = device_accessor;
  using memory_space = device_memory;
  using Accessor::Accessor;
};

namespace detail {
template <class A, class = void>
struct accessor_is_plain : std::false_type {};
template <class A>
struct accessor_is_plain<A, std::void_t<decltype(A::is_plain)>> : std::bool_constant<A::is_plain> {};
}  // namespace detail

/// True when the accessor reads raw elements with `p[i]`, so a row is a plain array.
template <class A>
inline constexpr bool is_plain_accessor_v = detail::accessor_is_plain<A>::value;

KVC_END_NAMESPACE
