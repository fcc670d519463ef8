// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// R-KV style redundancy-aware selection over any importance scorer: importance I (the inner
/// scores, softmax-normalised over the stream) and redundancy R_j = softmax over tokens of the
/// mean cosine similarity of key j to the other keys; score = λ·I − (1 − λ)·R (λ = 0.1 as
/// published). The mean similarity uses Σ_i k̂_i, so it costs O(n·d). Simplification: R-KV's
/// threshold step that spares the most recent of each near-duplicate group is not reproduced.
/// \par Reference
/// Cai et al., "R-KV: Redundancy-aware KV Cache Compression for Reasoning Models", arXiv:2505.24133.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <kvc/evict/core.hpp>
#include <kvc/isa.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {
namespace detail {

/// Tokens whose normalised keys are summed in float before the sum goes to double.
inline constexpr std::int32_t rkv_block = 64;

/// Σ_d a[d]·b[d] in eight float lanes (summed in a tree, not in index order). ISA-neutral
/// (docs/isa.md): the AVX2 + FMA path is compiled for that target and chosen at run time by the
/// CPU, never by the TU's -m flags, so every TU runs the same body.
inline float dot_f_portable(const float* a, const float* b, std::int32_t D) noexcept {
  float acc[8] = {};
  std::int32_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (std::int32_t j = 0; j < 8; ++j) acc[j] += a[d + j] * b[d + j];
  float s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

#if KVC_X86_DISPATCH
KVC_TARGET_AVX2 inline float dot_f_avx2(const float* a, const float* b, std::int32_t D) noexcept {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  std::int32_t d = 0;
  for (; d + 16 <= D; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), a1);
  }
  for (; d + 8 <= D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), a0);
  const __m256 s8 = _mm256_add_ps(a0, a1);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_shuffle_ps(s4, s4, 1));
  float s = _mm_cvtss_f32(s4);
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}
#endif

inline float dot_f(const float* a, const float* b, std::int32_t D) noexcept {
#if KVC_X86_DISPATCH
  if (kvc::detail::cpu_has_avx2_fma_f16c()) return dot_f_avx2(a, b, D);
#endif
  return dot_f_portable(a, b, D);
}

}  // namespace detail

struct rkv_params {
  float lambda = 0.1f;
};

template <class Inner>
struct rkv {
  using params_type = rkv_params;
  using observation_type = typename Inner::observation_type;
  static constexpr unsigned reads = Inner::reads | reads_keys;
  static constexpr const char* name = "rkv";
  Inner inner;
  params_type p;
  rkv() = default;
  explicit rkv(const params_type& params, const Inner& in = Inner{}) : inner(in), p(params) {
    KVC_EXPECTS(p.lambda >= 0 && p.lambda <= 1, "lambda = ", p.lambda, ", expected in [0, 1]");
  }
  protection protect() const { return inner.protect(); }
  void score(const layer_input& in, const observations& obs, layer_scores& out) const {
    inner.score(in, obs, out);
    check_scores(in, out, Inner::name);
    const std::int32_t D = in.head_dim;
    std::vector<float> red, inv, ksum_f(static_cast<std::size_t>(D)), block(static_cast<std::size_t>(D));
    std::vector<double> ksum(static_cast<std::size_t>(D));
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const head_input& hi = in.heads[static_cast<std::size_t>(h)];
      const std::int32_t n = hi.n;
      if (n == 0) continue;
      auto& o = out[static_cast<std::size_t>(h)];
      detail::softmax_inplace(o.data(), n);
      // Pass 1: inverse norms and Σ_t k̂_t. The products are summed in float over blocks of
      // rkv_block tokens, the blocks in double: float SIMD throughout, yet the sum of 32k unit
      // vectors keeps a relative error near float's epsilon.
      std::fill(ksum.begin(), ksum.end(), 0.0);
      inv.resize(static_cast<std::size_t>(n));
      for (std::int32_t t0 = 0; t0 < n; t0 += detail::rkv_block) {
        const std::int32_t t1 = std::min(n, t0 + detail::rkv_block);
        std::fill(block.begin(), block.end(), 0.0f);
        for (std::int32_t t = t0; t < t1; ++t) {
          const float* k = hi.k + static_cast<std::size_t>(t) * D;
          const float it = 1.0f / std::max(std::sqrt(detail::dot_f(k, k, D)), 1e-8f);
          inv[static_cast<std::size_t>(t)] = it;
          for (std::int32_t d = 0; d < D; ++d) block[static_cast<std::size_t>(d)] += k[d] * it;
        }
        for (std::int32_t d = 0; d < D; ++d) ksum[static_cast<std::size_t>(d)] += block[static_cast<std::size_t>(d)];
      }
      for (std::int32_t d = 0; d < D; ++d) ksum_f[static_cast<std::size_t>(d)] = static_cast<float>(ksum[static_cast<std::size_t>(d)]);
      // Pass 2: the mean similarity of k̂_t to the others, (k̂_t · Σ k̂ - 1) / (n - 1).
      red.resize(static_cast<std::size_t>(n));
      const double inv_n1 = n > 1 ? 1.0 / (n - 1) : 0.0;
      for (std::int32_t t = 0; t < n; ++t) {
        const float* k = hi.k + static_cast<std::size_t>(t) * D;
        const double dot = static_cast<double>(detail::dot_f(k, ksum_f.data(), D)) * inv[static_cast<std::size_t>(t)];
        red[static_cast<std::size_t>(t)] = static_cast<float>((dot - 1.0) * inv_n1);  // self-similarity removed
      }
      detail::softmax_inplace(red.data(), n);
      for (std::int32_t t = 0; t < n; ++t)
        o[static_cast<std::size_t>(t)] = p.lambda * o[static_cast<std::size_t>(t)] - (1.0f - p.lambda) * red[static_cast<std::size_t>(t)];
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
