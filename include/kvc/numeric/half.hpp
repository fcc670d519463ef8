// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// IEEE 754 binary16 storage type with round-to-nearest-even conversion from float.

#include <cstddef>
#include <cstdint>

#include <kvc/config.hpp>
#include <kvc/isa.hpp>
#include <kvc/numeric/bits.hpp>

/// Whether this TU is compiled for F16C. Only ISA-namespaced code may test it (kvc/isa.hpp):
/// half's own conversions are the same in every TU.
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

/// The scalar conversions are the portable ones in every TU, whatever its -m flags: `half` is one
/// type across TUs, and an F16C body under one name in some TUs and a portable one in others is
/// an ODR violation whose linker-chosen copy can be the F16C one on a CPU without F16C
/// (docs/isa.md). Bulk conversions (below) use F16C, chosen at run time.
///
/// On the device the conversion instructions do the work. Measured on an H200 (fp16 decode, 32k
/// tokens, batch 16, D 128, G 4): the portable decode (~12 instructions and a subnormal loop per
/// element) held the kernel to 1.09 TB/s; cvt plus __expf in the softmax, 1.40 with a NaN test
/// per element, 2.00 without it. Both paths agree bit for bit on every non-NaN
/// (test_cuda_numeric checks every binary16 and a sweep of floats). A NaN stays a NaN; its
/// payload is the hardware's when decoding (the hot path), the portable rule's when encoding.
KVC_HOST_DEVICE std::uint16_t float_to_half_bits(float f) noexcept {
#if defined(__CUDA_ARCH__)
  if (f != f) return float_to_half_bits_portable(f);
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  return float_to_half_bits_portable(f);
#endif
}

KVC_HOST_DEVICE float half_bits_to_float(std::uint16_t h) noexcept {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(static_cast<unsigned short>(h)));
  return f;
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

namespace detail {

#if KVC_X86_DISPATCH
/// Bulk F16C conversions, 8 lanes at a time (n rounded down to a multiple of 8; returns how many
/// were done). Same rounding as the scalar path (round to nearest even), bit for bit.
KVC_TARGET_AVX2 inline std::size_t half_to_float_n_f16c(const half* x, std::size_t n, float* out) noexcept {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  return i;
}
KVC_TARGET_AVX2 inline std::size_t float_to_half_n_f16c(const float* x, std::size_t n, half* out) noexcept {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return i;
}
KVC_TARGET_AVX2 inline std::size_t round_through_half_n_f16c(const float* x, std::size_t n, float* out) noexcept {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i),
                                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
  return i;
}
#endif

/// out[i] = float(x[i]) for i < n: F16C where the CPU has it (run-time choice, docs/isa.md).
inline void half_to_float_n(const half* x, std::size_t n, float* out) noexcept {
  std::size_t i = 0;
#if KVC_X86_DISPATCH
  if (cpu_has_avx2_fma_f16c()) i = half_to_float_n_f16c(x, n, out);
#endif
  for (; i < n; ++i) out[i] = static_cast<float>(x[i]);
}
/// out[i] = half(x[i]) for i < n.
inline void float_to_half_n(const float* x, std::size_t n, half* out) noexcept {
  std::size_t i = 0;
#if KVC_X86_DISPATCH
  if (cpu_has_avx2_fma_f16c()) i = float_to_half_n_f16c(x, n, out);
#endif
  for (; i < n; ++i) out[i] = half(x[i]);
}
/// out[i] = float(half(x[i])) for i < n.
inline void round_through_half_n(const float* x, std::size_t n, float* out) noexcept {
  std::size_t i = 0;
#if KVC_X86_DISPATCH
  if (cpu_has_avx2_fma_f16c()) i = round_through_half_n_f16c(x, n, out);
#endif
  for (; i < n; ++i) out[i] = static_cast<float>(half(x[i]));
}

}  // namespace detail

KVC_END_NAMESPACE
