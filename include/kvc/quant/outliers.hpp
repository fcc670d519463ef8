// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `outliers<Q>`: dense-and-sparse quantization. The largest-magnitude `fraction` of the entries of
/// each record (one token for per-token codecs, one group of G tokens for per-channel ones) is kept
/// exactly as binary16 in a fixed-capacity sparse list (uint16 index + half value); the dense part,
/// with those entries clamped into the range of the others, is quantized by Q. The sparse list lives
/// in the record, so the pool accounts for it. Combine with quant_cache_config::sink_tokens to keep
/// KVQuant's first tokens in full precision.
/// \par Reference
/// Hooper et al., "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache
/// Quantization", arXiv:2401.18079.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>

#include <kvc/numeric/half.hpp>
#include <kvc/quant/codec.hpp>

KVC_BEGIN_NAMESPACE
namespace quant {

/// \tparam Q  the dense quantizer
template <class Q>
struct outliers : codec_base {
  static_assert(is_codec_v<Q>, "kvc::quant::outliers<Q>: Q must be a kvc quantizer");
  static_assert(!Q::rotates, "kvc::quant::outliers<Q>: write rotated<outliers<Q>>, not outliers<rotated<Q>>");
  static constexpr int bits = Q::bits;
  using inner = Q;

  Q q{};
  float fraction = 0.01f;  ///< KVQuant: 1% (--sparsity-threshold 0.99)

  outliers() = default;
  explicit outliers(float f, Q inner_codec = Q{}) : q(inner_codec), fraction(f) {}

  static constexpr int tokens_per_record(role r) noexcept { return Q::tokens_per_record(r); }
  /// Sparse entries per record.
  int capacity(role r, int D) const noexcept {
    return static_cast<int>(std::ceil(static_cast<double>(fraction) * tokens_per_record(r) * D - 1e-9));
  }
  std::size_t record_bytes(role r, int D) const noexcept {
    return q.record_bytes(r, D) + static_cast<std::size_t>(capacity(r, D)) * 4;
  }
  std::int32_t residual() const noexcept { return q.residual(); }
  void check(int D) const {
    KVC_EXPECTS(fraction >= 0.0f && fraction <= 0.5f, "kvc::quant::outliers: fraction = ", fraction,
                ", expected 0..0.5 (KVQuant keeps 0.01)");
    KVC_EXPECTS(static_cast<long>(tokens_per_record(role::key)) * D <= 65535, "kvc::quant::outliers: head_dim = ", D,
                ", expected tokens_per_record * head_dim <= 65535 (16-bit sparse indices)");
    q.check(D);
  }

  template <role R>
  void encode(const float* x, int D, std::byte* rec) const noexcept {
    const int n = tokens_per_record(R) * D, k = capacity(R, D);
    float buf[8192];
    std::uint16_t idx[8192];
    const bool fits = n <= 8192;
    if (!fits) std::abort();  // check() bounds n by 65535; records above 8192 entries are not supported
    std::iota(idx, idx + n, std::uint16_t{0});
    std::partial_sort(idx, idx + k, idx + n, [&](std::uint16_t a, std::uint16_t b) {
      return std::fabs(x[a]) > std::fabs(x[b]) || (std::fabs(x[a]) == std::fabs(x[b]) && a < b);
    });
    float lo = INFINITY, hi = -INFINITY;
    for (int i = k; i < n; ++i) {
      lo = std::min(lo, x[idx[i]]);
      hi = std::max(hi, x[idx[i]]);
    }
    std::memcpy(buf, x, sizeof(float) * static_cast<std::size_t>(n));
    if (k < n)
      for (int i = 0; i < k; ++i) buf[idx[i]] = std::min(std::max(buf[idx[i]], lo), hi);
    q.template encode<R>(buf, D, rec);
    std::byte* sp = rec + q.record_bytes(R, D);
    for (int i = 0; i < k; ++i) {
      const half h(x[idx[i]]);
      std::memcpy(sp + 4 * i, &idx[i], 2);
      std::memcpy(sp + 4 * i + 2, &h, 2);
    }
  }
  template <role R>
  void decode(const std::byte* rec, int D, float* out) const noexcept {
    q.template decode<R>(rec, D, out);
    const std::byte* sp = rec + q.record_bytes(R, D);
    for (int i = 0; i < capacity(R, D); ++i) {
      std::uint16_t j;
      half h;
      std::memcpy(&j, sp + 4 * i, 2);
      std::memcpy(&h, sp + 4 * i + 2, 2);
      out[j] = static_cast<float>(h);
    }
  }
  template <role R>
  void decode_token(const std::byte* rec, int D, int t, float* out) const noexcept {
    q.template decode_token<R>(rec, D, t, out);
    const std::byte* sp = rec + q.record_bytes(R, D);
    for (int i = 0; i < capacity(R, D); ++i) {
      std::uint16_t j;
      half h;
      std::memcpy(&j, sp + 4 * i, 2);
      std::memcpy(&h, sp + 4 * i + 2, 2);
      if (j / D == t) out[j % D] = static_cast<float>(h);
    }
  }
};

}  // namespace quant
KVC_END_NAMESPACE
