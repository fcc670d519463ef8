// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// bfloat16 storage type (the upper half of a float) with round-to-nearest-even conversion.

#include <cstdint>

#include <kvc/config.hpp>
#include <kvc/numeric/bits.hpp>

KVC_BEGIN_NAMESPACE
namespace detail {

/// float -> bfloat16, round to nearest even; NaN stays NaN and is made quiet.
KVC_HOST_DEVICE std::uint16_t float_to_bf16_bits(float f) noexcept {
  const std::uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  return static_cast<std::uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

KVC_HOST_DEVICE float bf16_bits_to_float(std::uint16_t b) noexcept {
  return bits_float(static_cast<std::uint32_t>(b) << 16);
}

}  // namespace detail

/// bfloat16 storage. Arithmetic happens in float; this type only stores and converts.
struct bfloat16 {
  std::uint16_t bits;

  bfloat16() = default;
  KVC_HOST_DEVICE explicit bfloat16(float f) noexcept : bits(detail::float_to_bf16_bits(f)) {}
  KVC_HOST_DEVICE operator float() const noexcept { return detail::bf16_bits_to_float(bits); }
  KVC_HOST_DEVICE static bfloat16 from_bits(std::uint16_t b) noexcept {
    bfloat16 h;
    h.bits = b;
    return h;
  }
};

static_assert(sizeof(bfloat16) == 2, "kvc::bfloat16 must be two bytes");

KVC_END_NAMESPACE
