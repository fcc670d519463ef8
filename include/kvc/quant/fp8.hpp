// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `fp8<Format, Scaling>`: K and V stored as OCP FP8 (E4M3 or E5M2) with round-to-nearest-even and
/// saturation. Scaling is either per token and head (a float scale = max|x| / max_finite stored with
/// each row), or per tensor, compatible with vLLM's `kv_cache_dtype=fp8` checkpoints: the stored
/// code is fp8(x / k_scale) (or v_scale) and reads back as code * k_scale; scales 1.0 when
/// uncalibrated, as in vLLM.
/// \par Reference
/// Micikevicius et al., "FP8 Formats for Deep Learning", arXiv:2209.05433.

#include <cmath>
#include <cstring>
#include <type_traits>

#include <kvc/numeric/fp8.hpp>
#include <kvc/quant/codec.hpp>

KVC_BEGIN_NAMESPACE
namespace quant {

namespace detail {
#if KVC_X86_DISPATCH
/// Format(f).bits for 8 floats (kvc::detail::float_to_minifloat, the same integer steps per lane):
/// 8 codes in the low 8 bytes. Round to nearest even on the bit pattern, x + (half - 1) + lsb,
/// whose carry moves into the exponent as the scalar ++code does; minifloat subnormals shift the
/// mantissa with its implicit bit right by a per-lane count (srlv/sllv give 0 for counts >= 32,
/// which is the scalar "shift >= 25: zero"); finite values beyond the largest code and infinities
/// saturate to max_code; NaN gives nan_code; the sign is or-ed back.
template <class Format>
KVC_TARGET_AVX2 inline __m128i to_fp8_avx2(__m256 f) noexcept {
  constexpr int E = Format::exponent_bits, M = Format::mantissa_bits;
  constexpr int bias = (1 << (E - 1)) - 1;
  constexpr int min_normal = (127 + 1 - bias) << 23;
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i x = _mm256_castps_si256(f);
  const __m256i ax = _mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff));
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(x, 24), _mm256_set1_epi32(0x80));
  // normal minifloats (the sum stays below 2^32 for every non-NaN lane)
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(ax, 23 - M), one);
  __m256i cn = _mm256_srli_epi32(_mm256_add_epi32(ax, _mm256_add_epi32(_mm256_set1_epi32((1 << (22 - M)) - 1), lsb)), 23 - M);
  cn = _mm256_sub_epi32(cn, _mm256_set1_epi32((127 - bias) << M));
  cn = _mm256_min_epi32(cn, _mm256_set1_epi32(Format::max_code));  // also infinities
  // subnormal minifloats: units of 2^(1 - bias - M)
  const __m256i shift = _mm256_sub_epi32(_mm256_set1_epi32(151 - bias - M), _mm256_srli_epi32(ax, 23));
  const __m256i m = _mm256_or_si256(_mm256_and_si256(ax, _mm256_set1_epi32(0x7fffff)), _mm256_set1_epi32(0x800000));
  const __m256i slsb = _mm256_and_si256(_mm256_srlv_epi32(m, shift), one);
  const __m256i shalf = _mm256_sub_epi32(_mm256_sllv_epi32(one, _mm256_sub_epi32(shift, one)), one);
  const __m256i cs = _mm256_srlv_epi32(_mm256_add_epi32(_mm256_add_epi32(m, shalf), slsb), shift);
  __m256i code = _mm256_blendv_epi8(cn, cs, _mm256_cmpgt_epi32(_mm256_set1_epi32(min_normal), ax));
  code = _mm256_blendv_epi8(code, _mm256_set1_epi32(Format::nan_code), _mm256_cmpgt_epi32(ax, _mm256_set1_epi32(0x7f800000)));
  code = _mm256_or_si256(code, sign);
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
  return _mm_packus_epi16(w, w);
}
#endif
}  // namespace detail

enum class fp8_scaling {
  per_token_head,  ///< dynamic float scale per token and head, stored after the codes
  per_tensor,      ///< one static scale for K and one for V (vLLM k_scale / v_scale)
};

/// \tparam Format  kvc::fp8_e4m3 or kvc::fp8_e5m2
template <class Format = fp8_e4m3, fp8_scaling Scaling = fp8_scaling::per_token_head>
struct fp8 : codec_base {
  static_assert(std::is_same<Format, fp8_e4m3>::value || std::is_same<Format, fp8_e5m2>::value,
                "kvc::quant::fp8<Format>: Format must be kvc::fp8_e4m3 or kvc::fp8_e5m2");
  static constexpr int bits = 8;
  static constexpr bool per_tensor = Scaling == fp8_scaling::per_tensor;
  using format = Format;

  float k_scale = 1.0f;  ///< per_tensor only: dequantized key = code * k_scale
  float v_scale = 1.0f;  ///< per_tensor only: dequantized value = code * v_scale

  fp8() = default;
  fp8(float ks, float vs) : k_scale(ks), v_scale(vs) {}

  static constexpr int tokens_per_record(role) noexcept { return 1; }
  std::size_t record_bytes(role, int D) const noexcept {
    return static_cast<std::size_t>(D) + (per_tensor ? 0 : sizeof(float));
  }
  void check(int D) const {
    KVC_EXPECTS(D > 0, "kvc::quant::fp8: head_dim = ", D, ", expected > 0");
    KVC_EXPECTS(!per_tensor || (std::isfinite(k_scale) && k_scale > 0.0f), "kvc::quant::fp8: k_scale = ", k_scale,
                ", expected finite > 0");
    KVC_EXPECTS(!per_tensor || (std::isfinite(v_scale) && v_scale > 0.0f), "kvc::quant::fp8: v_scale = ", v_scale,
                ", expected finite > 0");
  }

  template <role R>
  KVC_HOST_DEVICE void encode(const float* x, int D, std::byte* rec) const noexcept {
    // The AVX2 encoder is chosen at run time, not by this TU's flags: fp8<> is one type in
    // every TU, so encode() must be one body (docs/isa.md).
#if KVC_X86_DISPATCH
    if (kvc::detail::cpu_has_avx2_fma_f16c()) return encode_avx2<R>(x, D, rec);
#endif
    encode_scalar<R>(x, D, rec);
  }
  /// The definition of the record (and what CUDA runs): code = Format(x * inv), inv = 1 / scale.
  template <role R>
  KVC_HOST_DEVICE void encode_scalar(const float* x, int D, std::byte* rec) const noexcept {
    float s;
    if constexpr (per_tensor) {
      s = R == role::key ? k_scale : v_scale;
    } else {
      float amax = 0.0f;
      for (int d = 0; d < D; ++d) amax = std::fmax(amax, std::fabs(x[d]));  // fmax: NaNs do not count
      s = amax / Format::max_finite;
      std::memcpy(rec + D, &s, sizeof(float));
    }
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    std::uint8_t* c = reinterpret_cast<std::uint8_t*>(rec);
    for (int d = 0; d < D; ++d) c[d] = Format(x[d] * inv).bits;
  }
#if KVC_X86_DISPATCH
  /// encode_scalar() 8 channels at a time on the host, bit for bit (tests/quant/test_fp8_encode
  /// checks it): the same float product x * inv, then Format's rounding in integer lanes
  /// (detail::to_fp8_avx2), so the result does not depend on MXCSR's rounding mode. The scalar
  /// conversion ran append at 0.15 GB/s of fp16 input (BM_quant_append fp8 32x8x128).
  template <role R>
  KVC_TARGET_AVX2 void encode_avx2(const float* x, int D, std::byte* rec) const noexcept {
    float s;
    if constexpr (per_tensor) {
      s = R == role::key ? k_scale : v_scale;
    } else {
      // max_ps returns its second operand when either is NaN: with the running maximum second,
      // NaN inputs are skipped as std::fmax skips them. The order of a maximum does not matter.
      const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      __m256 acc = _mm256_setzero_ps();
      int d = 0;
      for (; d + 8 <= D; d += 8) acc = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + d), absmask), acc);
      alignas(32) float a8[8];
      _mm256_store_ps(a8, acc);
      float amax = 0.0f;
      for (int i = 0; i < 8; ++i) amax = std::fmax(amax, a8[i]);
      for (; d < D; ++d) amax = std::fmax(amax, std::fabs(x[d]));
      s = amax / Format::max_finite;
      std::memcpy(rec + D, &s, sizeof(float));
    }
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    const __m256 vinv = _mm256_set1_ps(inv);
    std::uint8_t* c = reinterpret_cast<std::uint8_t*>(rec);
    int d = 0;
    for (; d + 8 <= D; d += 8)
      _mm_storel_epi64(reinterpret_cast<__m128i*>(c + d),
                       detail::to_fp8_avx2<Format>(_mm256_mul_ps(_mm256_loadu_ps(x + d), vinv)));
    for (; d < D; ++d) c[d] = Format(x[d] * inv).bits;
  }
#endif
  template <role R>
  KVC_HOST_DEVICE float row_scale(const std::byte* rec, int D) const noexcept {
    if constexpr (per_tensor) {
      (void)rec, (void)D;
      return R == role::key ? k_scale : v_scale;
    } else {
      float s;
      std::memcpy(&s, rec + D, sizeof(float));
      return s;
    }
  }
  template <role R>
  KVC_HOST_DEVICE void decode(const std::byte* rec, int D, float* out) const noexcept {
    const float s = row_scale<R>(rec, D);
    const std::uint8_t* c = reinterpret_cast<const std::uint8_t*>(rec);
    for (int d = 0; d < D; ++d) out[d] = static_cast<float>(Format::from_bits(c[d])) * s;
  }
  template <role R>
  void decode_token(const std::byte* rec, int D, int, float* out) const noexcept { decode<R>(rec, D, out); }
  static const char* name() noexcept {
    return std::is_same<Format, fp8_e4m3>::value ? (per_tensor ? "fp8t" : "fp8") : (per_tensor ? "fp8e5m2t" : "fp8e5m2");
  }
};

using fp8_e4m3_per_token = fp8<fp8_e4m3>;
using fp8_e5m2_per_token = fp8<fp8_e5m2>;
using fp8_e4m3_per_tensor = fp8<fp8_e4m3, fp8_scaling::per_tensor>;
using fp8_e5m2_per_tensor = fp8<fp8_e5m2, fp8_scaling::per_tensor>;

}  // namespace quant
KVC_END_NAMESPACE
