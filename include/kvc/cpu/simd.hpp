// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// xsimd helpers for the CPU kernels: load any storage type as a batch of float. xsimd 8.1 has no
/// half or bfloat16 batches, so the conversions use the F16C/AVX2/AVX-512 instructions when the
/// compiler targets them, SSE2 integer operations for binary16 at the baseline x86-64 target, and
/// a scalar path otherwise. Everything here is compiled per ISA, in
/// the ISA namespace of kvc/isa.hpp, so TUs built with different -m flags never share a body. Never names xsimd's base arch tag (it is
/// `generic` in xsimd 8 and `common` later).

#include <cstdint>
#include <type_traits>

#include <xsimd/xsimd.hpp>

#include <kvc/isa.hpp>
#include <kvc/types.hpp>

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__) || defined(__SSE2__)
#include <immintrin.h>
#endif

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md

#if defined(__SSE2__) && !defined(__F16C__)
/// Four binary16 values as float with SSE2 integer operations, the bits of F16C's conversion for
/// every input (zeros, subnormals, infinities, NaNs quietened) and independent of the FTZ/DAZ modes: the baseline
/// x86-64 target has no F16C, and a scalar conversion per element was most of its decode step.
KVC_FORCEINLINE __m128 half4_to_float_sse2(const void* p) noexcept {
  const __m128i x = _mm_unpacklo_epi16(_mm_loadl_epi64(static_cast<const __m128i*>(p)), _mm_setzero_si128());
  const __m128i sign = _mm_slli_epi32(_mm_and_si128(x, _mm_set1_epi32(0x8000)), 16);
  const __m128i em = _mm_and_si128(x, _mm_set1_epi32(0x7fff));
  // Normal: exponent rebiased by 127 - 15 = 112; infinity and NaN (exponent 31) by 112 more, to 255.
  __m128i bits = _mm_add_epi32(_mm_slli_epi32(em, 13), _mm_set1_epi32(112 << 23));
  const __m128i inf_nan = _mm_cmpgt_epi32(em, _mm_set1_epi32(0x7bff));
  bits = _mm_add_epi32(bits, _mm_and_si128(inf_nan, _mm_set1_epi32(112 << 23)));
  // A NaN comes back quiet, as F16C and kvc::half's conversion return it.
  bits = _mm_or_si128(bits, _mm_and_si128(_mm_cmpgt_epi32(em, _mm_set1_epi32(0x7c00)), _mm_set1_epi32(0x00400000)));
  // Zero and subnormal (exponent 0): mantissa x 2^-24, an exact float product.
  const __m128i small = _mm_cmplt_epi32(em, _mm_set1_epi32(0x0400));
  const __m128i sub = _mm_castps_si128(_mm_mul_ps(_mm_cvtepi32_ps(em), _mm_set1_ps(5.9604644775390625e-8f)));
  bits = _mm_or_si128(_mm_andnot_si128(small, bits), _mm_and_si128(small, sub));
  return _mm_castsi128_ps(_mm_or_si128(bits, sign));
}
#endif

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
#if defined(__SSE2__) && !defined(__F16C__)
    if constexpr (W == 4) return fbatch<Arch>(half4_to_float_sse2(p));
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

/// Largest lane (xsimd 8.1 has no reduce_max): one instruction sequence per width where the
/// compiler targets it, the lanes compared one by one otherwise.
template <class Arch>
KVC_FORCEINLINE float reduce_max(const fbatch<Arch>& x) noexcept {
  constexpr std::size_t W = fbatch<Arch>::size;
#if defined(__AVX512F__)
  if constexpr (W == 16) return _mm512_reduce_max_ps(x);
#endif
#if defined(__AVX__)
  if constexpr (W == 8) {
    const __m256 v = x;
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
  }
#endif
  alignas(64) float buf[W];
  x.store_aligned(buf);
  float m = buf[0];
  for (std::size_t i = 1; i < W; ++i) m = buf[i] > m ? buf[i] : m;
  return m;
}

/// Transposed horizontal add: lane i of the result is the sum of the lanes of rows[i], for the
/// fbatch<Arch>::size batches at rows. xsimd's haddp everywhere except AVX-512: xsimd 8.1's
/// avx512f haddp for float returns the sums in the lane order 0 1 4 5 2 3 6 7 8 9 12 13 10 11 14 15
/// (its _mm512_shuffle_ps step interleaves the row pairs), which put each token's score on another
/// token in decode attention built with -march=native on AVX-512 CPUs. The AVX-512 body here is
/// kvc's own, so it does not depend on which xsimd is installed; test_attention (each ISA
/// variant, test_attention_avx512 for this body) checks it against sums in double.
template <class Arch>
KVC_FORCEINLINE fbatch<Arch> haddp(const fbatch<Arch>* rows) noexcept {
#if defined(__AVX512F__)
  if constexpr (fbatch<Arch>::size == 16) {
    // Pairs of rows: per 128-bit block k, [a0+a2, b0+b2, a1+a3, b1+b3] of that block's 4 lanes.
    __m512 x[8];
    for (int i = 0; i < 8; ++i) {
      const __m512 a = rows[2 * i], b = rows[2 * i + 1];
      x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    // Quads of rows: per 128-bit block k, [a, b, c, d] summed over that block's lanes.
    __m512 z[4];
    for (int j = 0; j < 4; ++j) {
      const __m512d a = _mm512_castps_pd(x[2 * j]), b = _mm512_castps_pd(x[2 * j + 1]);
      z[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    // Sum the 4 blocks of z[j] into block j of the result (a 4x4 transpose of 128-bit blocks).
    const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return fbatch<Arch>(_mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(3, 1, 3, 1))));
  }
#endif
  return xsimd::haddp(rows);
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
