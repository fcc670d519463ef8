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

#include <cmath>
#include <vector>

#include <kvc/evict/core.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

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
    std::vector<double> ksum(static_cast<std::size_t>(D));
    std::vector<float> red;
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const head_input& hi = in.heads[static_cast<std::size_t>(h)];
      const std::int32_t n = hi.n;
      if (n == 0) continue;
      auto& o = out[static_cast<std::size_t>(h)];
      detail::softmax_inplace(o.data(), n);
      std::fill(ksum.begin(), ksum.end(), 0.0);
      std::vector<float> inv(static_cast<std::size_t>(n));
      for (std::int32_t t = 0; t < n; ++t) {
        const float* k = hi.k + static_cast<std::size_t>(t) * D;
        inv[static_cast<std::size_t>(t)] = 1.0f / std::max(detail::l2(k, D), 1e-8f);
        for (std::int32_t d = 0; d < D; ++d) ksum[static_cast<std::size_t>(d)] += k[d] * inv[static_cast<std::size_t>(t)];
      }
      red.assign(static_cast<std::size_t>(n), 0.0f);
      for (std::int32_t t = 0; t < n; ++t) {
        const float* k = hi.k + static_cast<std::size_t>(t) * D;
        double dot = 0;
        for (std::int32_t d = 0; d < D; ++d) dot += k[d] * inv[static_cast<std::size_t>(t)] * ksum[static_cast<std::size_t>(d)];
        red[static_cast<std::size_t>(t)] = n > 1 ? static_cast<float>((dot - 1.0) / (n - 1)) : 0.0f;  // self-similarity removed
      }
      detail::softmax_inplace(red.data(), n);
      for (std::int32_t t = 0; t < n; ++t)
        o[static_cast<std::size_t>(t)] = p.lambda * o[static_cast<std::size_t>(t)] - (1.0f - p.lambda) * red[static_cast<std::size_t>(t)];
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
