// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `rotated<Q>`: an orthonormal Hadamard rotation (fast Walsh-Hadamard transform, optionally with
/// fixed random signs) applied before quantizing with Q. Rotation spreads outlier channels over all
/// channels, so low-bit codes lose far less. Attention rotates the query once (q.k = Hq.Hk) and, for
/// values, rotates the output back (sum p Hv = H sum p v). head_dim must be a power of two.
/// \par Reference
/// Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", arXiv:2404.00456
/// (as applied to the KV cache by llama.cpp PR #21038).

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include <kvc/quant/codec.hpp>

KVC_BEGIN_NAMESPACE
namespace quant {
namespace detail {

/// In-place unnormalised Walsh-Hadamard transform of n = 2^k values.
KVC_HOST_DEVICE void fwht(float* x, int n) noexcept {
  for (int h = 1; h < n; h *= 2)
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
}

/// Fixed pseudo-random sign of channel d (splitmix-style hash of d and the seed).
KVC_HOST_DEVICE float channel_sign(std::uint32_t seed, int d) noexcept {
  std::uint64_t z = (static_cast<std::uint64_t>(seed) << 32) + static_cast<std::uint64_t>(d) + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return ((z ^ (z >> 31)) & 1u) ? -1.0f : 1.0f;
}

}  // namespace detail

/// \tparam Q            the quantizer applied in the rotated domain
/// \tparam RandomSigns  multiply by fixed random signs before the transform (QuaRot's randomised
///                      Hadamard); the seed is the runtime member `seed`
template <class Q, bool RandomSigns = true>
struct rotated : codec_base {
  static_assert(is_codec_v<Q>, "kvc::quant::rotated<Q>: Q must be a kvc quantizer (intn, kivi, fp8, outliers<...>)");
  static_assert(!Q::rotates, "kvc::quant::rotated<Q>: Q is already rotated");
  static constexpr bool rotates = true;
  static constexpr int bits = Q::bits;
  using inner = Q;

  Q q{};
  std::uint32_t seed = 0x6b7663u;

  rotated() = default;
  explicit rotated(Q inner_codec, std::uint32_t s = 0x6b7663u) : q(inner_codec), seed(s) {}

  static constexpr int tokens_per_record(role r) noexcept { return Q::tokens_per_record(r); }
  std::size_t record_bytes(role r, int D) const noexcept { return q.record_bytes(r, D); }
  std::int32_t residual() const noexcept { return q.residual(); }
  void check(int D) const {
    KVC_EXPECTS(D > 0 && (D & (D - 1)) == 0 && D <= 1024, "kvc::quant::rotated: head_dim = ", D,
                ", expected a power of two <= 1024 (the fast Walsh-Hadamard transform needs one); use the "
                "unrotated quantizer for this model");
    q.check(D);
  }

  /// x <- H (s . x) / sqrt(D)
  void to_stored(float* x, int D) const noexcept {
    if (RandomSigns)
      for (int d = 0; d < D; ++d) x[d] *= detail::channel_sign(seed, d);
    detail::fwht(x, D);
    const float n = 1.0f / std::sqrt(static_cast<float>(D));
    for (int d = 0; d < D; ++d) x[d] *= n;
  }
  /// y <- s . (H y) / sqrt(D)  (the inverse: H is symmetric and H H = D I)
  void to_model(float* y, int D) const noexcept {
    detail::fwht(y, D);
    const float n = 1.0f / std::sqrt(static_cast<float>(D));
    for (int d = 0; d < D; ++d) y[d] *= n * (RandomSigns ? detail::channel_sign(seed, d) : 1.0f);
  }

  template <role R>
  void encode(const float* x, int D, std::byte* rec) const noexcept {
    const int u = Q::tokens_per_record(R);
    // A per-thread buffer that only grows: a stack array here tripped GCC 12's
    // -Wmaybe-uninitialized at -O3 once the AVX2 encoders were inlined. Growing can throw only
    // bad_alloc inside this noexcept commit, which terminates (nothing sane remains then).
    thread_local std::vector<float> buf;
    const std::size_t need = static_cast<std::size_t>(u) * static_cast<std::size_t>(D);
    if (buf.size() < need) buf.resize(need);
    float* tmp = buf.data();
    for (int i = 0; i < u * D; ++i) tmp[i] = x[i];
    for (int t = 0; t < u; ++t) to_stored(tmp + static_cast<std::size_t>(t) * D, D);
    q.template encode<R>(tmp, D, rec);
  }
  template <role R>
  void decode(const std::byte* rec, int D, float* out) const noexcept { q.template decode<R>(rec, D, out); }
  template <role R>
  void decode_token(const std::byte* rec, int D, int i, float* out) const noexcept {
    q.template decode_token<R>(rec, D, i, out);
  }
};

}  // namespace quant
KVC_END_NAMESPACE
