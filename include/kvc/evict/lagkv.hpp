// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// LagKV: after the sinks, the stream is cut into partitions of `lag` tokens. Each partition's K
/// (and V) is min-max normalised per channel by the *next* partition's min/max; a token's score
/// is the std over channels (unbiased), softmaxed within the partition, averaged over K and V,
/// and ranked within the partition (rank / lag) unless cross_scoring. The sinks and the tail
/// (the last full partition plus the remainder, which has no successor) score the maximum.
/// Attention-free. A zero min-max range normalises to 0 (kvpress divides by it).
/// \par Reference
/// Liang et al., "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important", arXiv:2504.04704.

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include <kvc/evict/core.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct lagkv_params {
  std::int32_t sinks = 4;
  std::int32_t lag = 128;
  bool cross_scoring = false;
};

struct lagkv {
  using params_type = lagkv_params;
  using observation_type = no_observation;
  static constexpr unsigned reads = reads_keys | reads_values;
  static constexpr const char* name = "lagkv";
  params_type p;
  lagkv() = default;
  explicit lagkv(const params_type& params) : p(params) {
    KVC_EXPECTS(p.sinks >= 0, "sinks = ", p.sinks, ", expected >= 0");
    KVC_EXPECTS(p.lag >= 2, "lag = ", p.lag, ", expected >= 2 tokens");
  }
  protection protect() const { return {p.sinks, 0}; }

  /// Softmaxed normalised-std score of the tokens of partition [a, a + lag) against [a + lag, a + 2 lag).
  void partition_scores(const float* x, std::int32_t D, std::int32_t a, float* out) const {
    const std::int32_t lag = p.lag;
    std::vector<float> mn(static_cast<std::size_t>(D), INFINITY), mx(static_cast<std::size_t>(D), -INFINITY);
    for (std::int32_t t = a + lag; t < a + 2 * lag; ++t)
      for (std::int32_t d = 0; d < D; ++d) {
        const float v = x[static_cast<std::size_t>(t) * D + d];
        mn[static_cast<std::size_t>(d)] = std::min(mn[static_cast<std::size_t>(d)], v);
        mx[static_cast<std::size_t>(d)] = std::max(mx[static_cast<std::size_t>(d)], v);
      }
    for (std::int32_t i = 0; i < lag; ++i) {
      const float* r = x + static_cast<std::size_t>(a + i) * D;
      double s = 0, s2 = 0;
      for (std::int32_t d = 0; d < D; ++d) {
        const float range = mx[static_cast<std::size_t>(d)] - mn[static_cast<std::size_t>(d)];
        const double z = range > 0 ? (r[d] - mn[static_cast<std::size_t>(d)]) / range : 0.0;
        s += z;
        s2 += z * z;
      }
      const double var = D > 1 ? std::max(0.0, (s2 - s * s / D) / (D - 1)) : 0.0;
      out[i] = static_cast<float>(std::sqrt(var));
    }
    detail::softmax_inplace(out, lag);
  }

  void score(const layer_input& in, const observations&, layer_scores& out) const {
    shape_scores(in, out);
    const std::int32_t D = in.head_dim, lag = p.lag;
    std::vector<float> ks(static_cast<std::size_t>(lag)), vs(static_cast<std::size_t>(lag));
    std::vector<std::int32_t> order(static_cast<std::size_t>(lag));
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const head_input& hi = in.heads[static_cast<std::size_t>(h)];
      auto& o = out[static_cast<std::size_t>(h)];
      const std::int32_t n = hi.n;
      if (n < p.sinks + 2 * lag) {  // too short to partition: every token scores the same
        std::fill(o.begin(), o.end(), 1.0f);
        continue;
      }
      const std::int32_t parts = (n - p.sinks) / lag;  // full partitions; the last one is only a reference
      float best = -INFINITY;
      for (std::int32_t q = 0; q + 1 < parts; ++q) {
        const std::int32_t a = p.sinks + q * lag;
        partition_scores(hi.k, D, a, ks.data());
        partition_scores(hi.v, D, a, vs.data());
        for (std::int32_t i = 0; i < lag; ++i) ks[static_cast<std::size_t>(i)] = 0.5f * (ks[static_cast<std::size_t>(i)] + vs[static_cast<std::size_t>(i)]);
        if (!p.cross_scoring) {  // rank within the partition: argsort(argsort) / lag, stable
          std::iota(order.begin(), order.end(), 0);
          std::stable_sort(order.begin(), order.end(),
                           [&](std::int32_t x, std::int32_t y) { return ks[static_cast<std::size_t>(x)] < ks[static_cast<std::size_t>(y)]; });
          for (std::int32_t r = 0; r < lag; ++r)
            o[static_cast<std::size_t>(a + order[static_cast<std::size_t>(r)])] = static_cast<float>(r) / static_cast<float>(lag);
        } else {
          for (std::int32_t i = 0; i < lag; ++i) o[static_cast<std::size_t>(a + i)] = ks[static_cast<std::size_t>(i)];
        }
        for (std::int32_t i = 0; i < lag; ++i) best = std::max(best, o[static_cast<std::size_t>(a + i)]);
      }
      for (std::int32_t t = 0; t < p.sinks; ++t) o[static_cast<std::size_t>(t)] = best;
      for (std::int32_t t = p.sinks + (parts - 1) * lag; t < n; ++t) o[static_cast<std::size_t>(t)] = best;
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
