// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// KeyDiff: keep the keys least similar to the mean normalised key,
/// score = -cos(k_j, mean_i(k_i / ‖k_i‖)); attention-free.
/// \par Reference
/// Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in Resource-Constrained Environments", arXiv:2504.15364.

#include <cmath>
#include <vector>

#include <kvc/evict/core.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct keydiff_params {
  protection protect{4, 0};
};

struct keydiff {
  using params_type = keydiff_params;
  using observation_type = no_observation;
  static constexpr unsigned reads = reads_keys;
  static constexpr const char* name = "keydiff";
  params_type p;
  keydiff() = default;
  explicit keydiff(const params_type& params) : p(params) {}
  protection protect() const { return p.protect; }
  void score(const layer_input& in, const observations&, layer_scores& out) const {
    shape_scores(in, out);
    const std::int32_t D = in.head_dim;
    std::vector<double> mean(static_cast<std::size_t>(D));
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const head_input& hi = in.heads[static_cast<std::size_t>(h)];
      std::fill(mean.begin(), mean.end(), 0.0);
      for (std::int32_t t = 0; t < hi.n; ++t) {
        const float* k = hi.k + static_cast<std::size_t>(t) * D;
        const double nk = std::max(static_cast<double>(detail::l2(k, D)), 1e-12);
        for (std::int32_t d = 0; d < D; ++d) mean[static_cast<std::size_t>(d)] += k[d] / nk;
      }
      double nm = 0;
      for (std::int32_t d = 0; d < D; ++d) nm += mean[static_cast<std::size_t>(d)] * mean[static_cast<std::size_t>(d)];
      nm = std::max(std::sqrt(nm), 1e-12);
      for (std::int32_t t = 0; t < hi.n; ++t) {
        const float* k = hi.k + static_cast<std::size_t>(t) * D;
        double dot = 0;
        for (std::int32_t d = 0; d < D; ++d) dot += k[d] * mean[static_cast<std::size_t>(d)];
        const double nk = std::max(static_cast<double>(detail::l2(k, D)), 1e-12);
        out[static_cast<std::size_t>(h)][static_cast<std::size_t>(t)] = static_cast<float>(-dot / (nk * nm));
      }
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
