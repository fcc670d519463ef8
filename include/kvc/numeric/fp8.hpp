// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// OCP 8-bit floats: E4M3 ("FN": no infinities, max 448, one NaN pattern per sign) and E5M2
/// (IEEE-like, max 57344, has infinities). Conversion from float rounds to nearest even and
/// saturates to the largest finite value, as the KV caches of vLLM and TensorRT-LLM do
/// (__NV_SATFINITE); NaN stays NaN.

#include <cstdint>

#include <kvc/config.hpp>
#include <kvc/numeric/bits.hpp>

KVC_BEGIN_NAMESPACE
namespace detail {

/// Encodes float as a minifloat with E exponent and M mantissa bits. `MaxCode` is the largest
/// finite positive code and `NanCode` the positive NaN code.
template <int E, int M, std::uint8_t MaxCode, std::uint8_t NanCode>
KVC_HOST_DEVICE std::uint8_t float_to_minifloat(float f) noexcept {
  constexpr int bias = (1 << (E - 1)) - 1;
  const std::uint32_t x = float_bits(f);
  const std::uint8_t sign = static_cast<std::uint8_t>((x >> 24) & 0x80u);
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<std::uint8_t>(sign | NanCode);
  if (ax == 0x7f800000u) return static_cast<std::uint8_t>(sign | MaxCode);  // saturate
  constexpr std::uint32_t min_normal = static_cast<std::uint32_t>(127 + 1 - bias) << 23;
  std::uint32_t code;
  if (ax < min_normal) {  // minifloat subnormal: count units of 2^(1 - bias - M)
    const std::uint32_t e = ax >> 23;
    if (e == 0) return sign;  // float subnormals are far below half a unit
    const std::uint32_t shift = static_cast<std::uint32_t>(151 - bias - M) - e;
    if (shift >= 25) return sign;
    const std::uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    code = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (code & 1u))) ++code;
  } else {
    if (ax >= (static_cast<std::uint32_t>(127 + 16) << 23)) return static_cast<std::uint8_t>(sign | MaxCode);
    code = (ax - (static_cast<std::uint32_t>(127 - bias) << 23)) >> (23 - M);
    const std::uint32_t rem = ax & ((1u << (23 - M)) - 1u);
    const std::uint32_t halfway = 1u << (22 - M);
    if (rem > halfway || (rem == halfway && (code & 1u))) ++code;
  }
  if (code > MaxCode) code = MaxCode;
  return static_cast<std::uint8_t>(sign | code);
}

template <int E, int M, bool HasInf>
KVC_HOST_DEVICE float minifloat_to_float(std::uint8_t c) noexcept {
  constexpr int bias = (1 << (E - 1)) - 1;
  const std::uint32_t sign = static_cast<std::uint32_t>(c & 0x80u) << 24;
  const std::uint32_t e = (c >> M) & ((1u << E) - 1u);
  const std::uint32_t m = c & ((1u << M) - 1u);
  if (HasInf && e == (1u << E) - 1u) return bits_float(sign | 0x7f800000u | (m ? 0x400000u : 0u));
  if (!HasInf && e == (1u << E) - 1u && m == (1u << M) - 1u) return bits_float(sign | 0x7fc00000u);
  if (e == 0) {
    // m * 2^(1 - bias - M), exact in float
    const float unit = bits_float(static_cast<std::uint32_t>(127 + 1 - bias - M) << 23);
    const float v = static_cast<float>(m) * unit;
    return sign ? -v : v;
  }
  return bits_float(sign | ((e - bias + 127u) << 23) | (m << (23 - M)));
}

}  // namespace detail

/// OCP FP8 E4M3 (FN variant): 4 exponent bits, bias 7, max 448, no infinity.
struct fp8_e4m3 {
  std::uint8_t bits;
  static constexpr float max_finite = 448.0f;
  /// The encoding's parameters, for vectorised encoders that must match this one bit for bit.
  static constexpr int exponent_bits = 4, mantissa_bits = 3;
  static constexpr std::uint8_t max_code = 0x7e, nan_code = 0x7f;

  fp8_e4m3() = default;
  KVC_HOST_DEVICE explicit fp8_e4m3(float f) noexcept
      : bits(detail::float_to_minifloat<exponent_bits, mantissa_bits, max_code, nan_code>(f)) {}
  KVC_HOST_DEVICE operator float() const noexcept { return detail::minifloat_to_float<4, 3, false>(bits); }
  KVC_HOST_DEVICE static fp8_e4m3 from_bits(std::uint8_t b) noexcept {
    fp8_e4m3 r;
    r.bits = b;
    return r;
  }
};

/// OCP FP8 E5M2: 5 exponent bits, bias 15, max 57344, infinities and NaNs as in IEEE.
struct fp8_e5m2 {
  std::uint8_t bits;
  static constexpr float max_finite = 57344.0f;
  /// The encoding's parameters, for vectorised encoders that must match this one bit for bit.
  static constexpr int exponent_bits = 5, mantissa_bits = 2;
  static constexpr std::uint8_t max_code = 0x7b, nan_code = 0x7e;

  fp8_e5m2() = default;
  KVC_HOST_DEVICE explicit fp8_e5m2(float f) noexcept
      : bits(detail::float_to_minifloat<exponent_bits, mantissa_bits, max_code, nan_code>(f)) {}
  KVC_HOST_DEVICE operator float() const noexcept { return detail::minifloat_to_float<5, 2, true>(bits); }
  KVC_HOST_DEVICE static fp8_e5m2 from_bits(std::uint8_t b) noexcept {
    fp8_e5m2 r;
    r.bits = b;
    return r;
  }
};

static_assert(sizeof(fp8_e4m3) == 1 && sizeof(fp8_e5m2) == 1, "kvc fp8 types must be one byte");

KVC_END_NAMESPACE
