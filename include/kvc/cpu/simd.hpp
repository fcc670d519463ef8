// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// xsimd helpers for the CPU kernels: load any storage type as a batch of float. xsimd 8.1 has no
/// half or bfloat16 batches, so the conversions use the F16C/AVX2/AVX-512 instructions when the
/// compiler targets them and a scalar path otherwise. Everything here is compiled per ISA, in
/// the ISA namespace of kvc/isa.hpp, so TUs built with different -m flags never share a body. Never names xsimd's base arch tag (it is
/// `generic` in xsimd 8 and `common` later).

#include <cstdint>
#include <type_traits>

#include <xsimd/xsimd.hpp>

#include <kvc/isa.hpp>
#include <kvc/types.hpp>

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md

/// The ISA this TU's kernels were compiled for, e.g. "isa_avx2_fma_f16c" or "isa_sse2": the
/// name of the inline namespace they live in (docs/isa.md). Each TU gets its own answer.
inline const char* isa_name() noexcept { return KVC_ISA_STR(KVC_ISA_NAMESPACE); }

/// The arch kernels use unless told otherwise: the best the compiler targets (-march is the
/// user's choice).
using default_arch = xsimd::default_arch;

template <class Arch>
using fbatch = xsimd::batch<float, Arch>;

/// Loads fbatch<Arch>::size consecutive elements of p as float.
template <class Arch, class T>
KVC_FORCEINLINE fbatch<Arch> load_as_float(const T* p) noexcept {
  constexpr std::size_t W = fbatch<Arch>::size;
  if constexpr (std::is_same<T, float>::value) {
    return fbatch<Arch>::load_unaligned(p);
  } else if constexpr (std::is_same<T, half>::value) {
#if defined(__F16C__)
    if constexpr (W == 8) return fbatch<Arch>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    if constexpr (W == 4) return fbatch<Arch>(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
#if defined(__AVX512F__)
    if constexpr (W == 16)
      return fbatch<Arch>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#endif
    alignas(64) float buf[W];
    for (std::size_t i = 0; i < W; ++i) buf[i] = static_cast<float>(p[i]);
    return fbatch<Arch>::load_aligned(buf);
  } else if constexpr (std::is_same<T, bfloat16>::value) {
#if defined(__AVX2__)
    if constexpr (W == 8)
      return fbatch<Arch>(_mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16)));
#endif
#if defined(__AVX512F__)
    if constexpr (W == 16)
      return fbatch<Arch>(_mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16)));
#endif
    alignas(64) float buf[W];
    for (std::size_t i = 0; i < W; ++i) buf[i] = static_cast<float>(p[i]);
    return fbatch<Arch>::load_aligned(buf);
  } else {
    alignas(64) float buf[W];
    for (std::size_t i = 0; i < W; ++i) buf[i] = static_cast<float>(p[i]);
    return fbatch<Arch>::load_aligned(buf);
  }
}

/// Sum of the lanes. xsimd 8 spells it `hadd`, later versions `reduce_add`.
template <class Arch>
KVC_FORCEINLINE float reduce_add(const fbatch<Arch>& x) noexcept {
#if XSIMD_VERSION_MAJOR >= 9
  return xsimd::reduce_add(x);
#else
  return xsimd::hadd(x);
#endif
}

/// Hints that the cache line holding p will be read soon (no-op where the compiler has no hint).
/// Locality 2 (prefetcht1 on x86): within noise of 3 and 0 in bench_decode fp16 32x8x128
/// ctx:32768 (2026-11), and it leaves L1 to the tile being computed.
KVC_FORCEINLINE void prefetch_read(const void* p) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
#endif
}

/// exp over n floats in place (vectorised; the tail is scalar).
template <class Arch>
inline void exp_inplace(float* x, std::int32_t n) noexcept {
  constexpr std::int32_t W = static_cast<std::int32_t>(fbatch<Arch>::size);
  std::int32_t i = 0;
  for (; i + W <= n; i += W) xsimd::exp(fbatch<Arch>::load_unaligned(x + i)).store_unaligned(x + i);
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

KVC_END_ISA_NAMESPACE
}  // namespace cpu
KVC_END_NAMESPACE
