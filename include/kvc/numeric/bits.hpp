// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Bit casts usable on host and device (std::bit_cast is C++20 and not constexpr-usable by nvcc
/// in every mode, so kvc carries its own memcpy-based one).

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <kvc/config.hpp>

KVC_BEGIN_NAMESPACE
namespace detail {

template <class To, class From>
KVC_HOST_DEVICE To bit_cast(const From& from) noexcept {
  static_assert(sizeof(To) == sizeof(From), "kvc::detail::bit_cast: sizes must match");
  static_assert(std::is_trivially_copyable<To>::value && std::is_trivially_copyable<From>::value,
                "kvc::detail::bit_cast: both types must be trivially copyable");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

KVC_HOST_DEVICE std::uint32_t float_bits(float f) noexcept { return bit_cast<std::uint32_t>(f); }
KVC_HOST_DEVICE float bits_float(std::uint32_t u) noexcept { return bit_cast<float>(u); }

}  // namespace detail
KVC_END_NAMESPACE
