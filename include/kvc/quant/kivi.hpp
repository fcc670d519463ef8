// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `kivi<Bits, Group, Residual>`: keys quantized per channel over groups of Group tokens, values
/// per token over groups of Group channels, both asymmetric min/max (scale = (max - min)/(2^b - 1),
/// zero = min), with the newest Residual tokens kept in full precision. Key and value bit widths
/// are independent: quant_cache<kivi<4>, kivi<2>> is K4V2. Keys wait in the residual window until a
/// whole group of Group tokens is there: a per-channel group is never one token.
/// \par Reference
/// Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv:2402.02750.

#include <kvc/quant/codec.hpp>

KVC_BEGIN_NAMESPACE
namespace quant {

/// \tparam Bits      2, 3, 4 or 8 (KIVI's CUDA kernels ship 2 and 4; 3 bits is the width at which
///                   KVQuant, arXiv:2401.18079, reports under 0.1 perplexity lost on LLaMA with its
///                   other measures). 3-bit codes are packed in planes (codec.hpp); kvc's CUDA
///                   readers take 2, 4 and 8 bits.
/// \tparam Group     tokens per key group and channels per value group (KIVI: 32)
/// \tparam Residual  full-precision window in tokens, a multiple of Group (KIVI: 128); a runtime
///                   value may replace it through the `residual_tokens` member
template <int Bits, int Group = 32, int Residual = 128>
struct kivi : detail::grouped_key_codec<detail::channel_affine<Bits, Group>,
                                        detail::token_affine<Bits, scheme::asymmetric, Group>, Group, Residual> {
  static_assert(Bits == 2 || Bits == 3 || Bits == 4 || Bits == 8, "kvc::quant::kivi<Bits>: Bits must be 2, 3, 4 or 8");
  static_assert(Group >= 8 && Group % 8 == 0, "kvc::quant::kivi<Bits, Group>: Group must be a multiple of 8 (KIVI uses 32)");
  static_assert(Bits != 3 || Group % 16 == 0,
                "kvc::quant::kivi<3, Group>: Group must be a multiple of 16 (3-bit codes are packed in blocks of 16 channels)");
  static_assert(Residual >= 0 && Residual % Group == 0,
                "kvc::quant::kivi<Bits, Group, Residual>: Residual must be a multiple of Group (KIVI: G=32, R=128)");
  using key_impl = detail::channel_affine<Bits, Group>;
  using value_impl = detail::token_affine<Bits, scheme::asymmetric, Group>;
  static constexpr int bits = Bits;

  kivi() = default;
  explicit kivi(std::int32_t residual) {
    this->residual_tokens = residual;
    check(Group);
  }

  void check(int D) const { this->check_as(D, "kvc::quant::kivi"); }
  /// Encodes tokens decoded from kivi records: keys on dyadic grids (channel_affine::repack:
  /// exact for survivors of a compaction); per-token value records are never re-encoded.
  template <role R>
  void repack(const float* x, int D, std::byte* rec) const noexcept {
    if constexpr (R == role::key) key_impl::repack(x, D, rec);
    else value_impl::encode(x, D, rec);
  }
  static const char* name() noexcept { return Bits == 2 ? "kivi2" : Bits == 3 ? "kivi3" : Bits == 4 ? "kivi4" : "kivi8"; }
};

}  // namespace quant
KVC_END_NAMESPACE
