// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `intn<Bits, Scheme, Group>`: per-token integer quantization of K and V (one scale, and a zero
/// point when asymmetric, per token and head, or per Group channels of it). `int8` is vLLM's
/// `int8_per_token_head`; `int4`/`int2` are the asymmetric low-bit variants.
/// \par Reference
/// Kwon et al., "Efficient Memory Management for Large Language Model Serving with PagedAttention" (vLLM), arXiv:2309.06180.

#include <kvc/quant/codec.hpp>

KVC_BEGIN_NAMESPACE
namespace quant {

/// \tparam Bits    2, 4 or 8
/// \tparam Scheme  symmetric (zero point 0) or asymmetric (min/max)
/// \tparam Group   channels per scale; 0 (the default) means the whole head
template <int Bits, scheme Scheme = scheme::symmetric, int Group = 0>
struct intn : codec_base {
  static_assert(Bits == 2 || Bits == 4 || Bits == 8,
                "kvc::quant::intn<Bits>: Bits must be 2, 4 or 8 (use fp8<> for 8-bit floats)");
  static_assert(Group >= 0 && (Group == 0 || Group % 8 == 0),
                "kvc::quant::intn<Bits, Scheme, Group>: Group must be 0 (whole head) or a multiple of 8");
  using impl = detail::token_affine<Bits, Scheme, Group>;
  static constexpr int bits = Bits;
  static constexpr int group_size = Group;
  static constexpr scheme quant_scheme = Scheme;

  static constexpr int tokens_per_record(role) noexcept { return 1; }
  std::size_t record_bytes(role, int D) const noexcept { return impl::record_bytes(D); }
  void check(int D) const { impl::check(D, "kvc::quant::intn"); }
  template <role R>
  void encode(const float* x, int D, std::byte* rec) const noexcept { impl::encode(x, D, rec); }
  template <role R>
  void decode(const std::byte* rec, int D, float* out) const noexcept { impl::decode(rec, D, out); }
  template <role R>
  void decode_token(const std::byte* rec, int D, int, float* out) const noexcept { impl::decode(rec, D, out); }
  static const char* name() noexcept {
    return Bits == 8 ? (Scheme == scheme::symmetric ? "int8" : "int8a")
                     : Bits == 4 ? (Scheme == scheme::symmetric ? "int4s" : "int4") : (Scheme == scheme::symmetric ? "int2s" : "int2");
  }
};

using int8 = intn<8, scheme::symmetric>;
using int8_asym = intn<8, scheme::asymmetric>;
using int4 = intn<4, scheme::asymmetric>;
using int2 = intn<2, scheme::asymmetric>;

}  // namespace quant
KVC_END_NAMESPACE
