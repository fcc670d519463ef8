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
    float s;
    if constexpr (per_tensor) {
      s = R == role::key ? k_scale : v_scale;
    } else {
      float amax = 0.0f;
      for (int d = 0; d < D; ++d) amax = std::fmax(amax, std::fabs(x[d]));
      s = amax / Format::max_finite;
      std::memcpy(rec + D, &s, sizeof(float));
    }
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    std::uint8_t* c = reinterpret_cast<std::uint8_t*>(rec);
    for (int d = 0; d < D; ++d) c[d] = Format(x[d] * inv).bits;
  }
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
