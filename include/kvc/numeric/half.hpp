// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// IEEE 754 binary16 storage type with round-to-nearest-even conversion from float.

#include <cstdint>

#include <kvc/config.hpp>
#include <kvc/numeric/bits.hpp>

#if defined(__F16C__) && !defined(__CUDA_ARCH__)
#include <immintrin.h>
#define KVC_HAS_F16C 1
#else
#define KVC_HAS_F16C 0
#endif

KVC_BEGIN_NAMESPACE
namespace detail {

/// Portable float -> binary16, round to nearest even. NaN stays NaN (quiet, payload truncated the
/// way x86 F16C does it, so both paths agree bit for bit); overflow goes to infinity.
KVC_HOST_DEVICE std::uint16_t float_to_half_bits_portable(float f) noexcept {
  const std::uint32_t x = float_bits(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // inf or NaN
    return static_cast<std::uint16_t>(
        sign | 0x7c00u | (ax > 0x7f800000u ? (0x200u | ((ax >> 13) & 0x3ffu)) : 0u));
  }
  if (ax >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520 -> inf
  if (ax < 0x38800000u) {  // below 2^-14: binary16 subnormal or zero
    if (ax <= 0x33000000u) return static_cast<std::uint16_t>(sign);  // <= 2^-25 ties to 0
    const std::uint32_t e = ax >> 23;
    const std::uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126u - e;  // value in units of 2^-24 is m >> shift
    std::uint32_t h = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return static_cast<std::uint16_t>(sign | h);
  }
  std::uint32_t h = (ax - 0x38000000u) >> 13;  // rebias exponent 127 -> 15
  const std::uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return static_cast<std::uint16_t>(sign | h);
}

/// Portable binary16 -> float (exact). Signalling NaNs come back quiet, as with F16C.
KVC_HOST_DEVICE float half_bits_to_float_portable(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t e = (h >> 10) & 0x1fu;
  std::uint32_t m = h & 0x3ffu;
  if (e == 0x1fu) return bits_float(sign | 0x7f800000u | (m ? (0x400000u | (m << 13)) : 0u));
  if (e == 0) {
    if (m == 0) return bits_float(sign);
    int ee = 1;
    while (!(m & 0x400u)) {
      m <<= 1;
      --ee;
    }
    return bits_float(sign | (static_cast<std::uint32_t>(ee + 112) << 23) | ((m & 0x3ffu) << 13));
  }
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

KVC_HOST_DEVICE std::uint16_t float_to_half_bits(float f) noexcept {
#if KVC_HAS_F16C
  return static_cast<std::uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  return float_to_half_bits_portable(f);
#endif
}

KVC_HOST_DEVICE float half_bits_to_float(std::uint16_t h) noexcept {
#if KVC_HAS_F16C
  return _cvtsh_ss(h);
#else
  return half_bits_to_float_portable(h);
#endif
}

}  // namespace detail

/// binary16 storage. Arithmetic happens in float; this type only stores and converts.
struct half {
  std::uint16_t bits;

  half() = default;
  KVC_HOST_DEVICE explicit half(float f) noexcept : bits(detail::float_to_half_bits(f)) {}
  KVC_HOST_DEVICE operator float() const noexcept { return detail::half_bits_to_float(bits); }
  KVC_HOST_DEVICE static half from_bits(std::uint16_t b) noexcept {
    half h;
    h.bits = b;
    return h;
  }
};

static_assert(sizeof(half) == 2, "kvc::half must be two bytes");

KVC_END_NAMESPACE
