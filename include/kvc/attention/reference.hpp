// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Reference decode attention: element-wise reads through the views, every sum in double. It is
/// slow on purpose and exists for tests; it shares no code with the CPU kernel.

#include <cmath>
#include <cstdint>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/error.hpp>
#include <kvc/view/heads.hpp>

KVC_BEGIN_NAMESPACE
namespace reference {

/// out[qh] = softmax(scale * K q[qh] + lw) V over the kv head of qh's group; lw is the heads'
/// per-token log-weight when they carry one (kvc::weighted_stream_heads), else 0.
/// \tparam Heads  anything with num_kv_heads(), head_dim(), keys(h), values(h), index(h)
template <class Heads>
void decode_attention(const Heads& heads, const float* q, std::int32_t num_q_heads, float* out,
                      const decode_options& opt = {}) {
  const std::int32_t hkv = heads.num_kv_heads(), D = heads.head_dim();
  KVC_EXPECTS(num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
              ", expected a positive multiple of num_kv_heads = ", hkv);
  const std::int32_t G = num_q_heads / hkv;
  const double scale = opt.scale != 0.0f ? opt.scale : 1.0 / std::sqrt(static_cast<double>(D));
  for (std::int32_t h = 0; h < hkv; ++h) {
    const auto& K = heads.keys(h);
    const auto& V = heads.values(h);
    const std::int32_t hi = heads.index(h);
    const std::int32_t n = static_cast<std::int32_t>(K.extent(0));
    for (std::int32_t g = 0; g < G; ++g) {
      const std::int32_t qh = h * G + g;
      const float* qv = q + static_cast<std::size_t>(qh) * D;
      std::vector<double> s(static_cast<std::size_t>(n));
      double mx = -INFINITY;
      for (std::int32_t t = 0; t < n; ++t) {
        double acc = 0;
        for (std::int32_t d = 0; d < D; ++d) acc += static_cast<double>(qv[d]) * static_cast<float>(K(t, hi, d));
        s[static_cast<std::size_t>(t)] = acc * scale;
        if constexpr (has_log_weights_v<Heads>) s[static_cast<std::size_t>(t)] += heads.log_weights(h)[t];
        mx = std::max(mx, s[static_cast<std::size_t>(t)]);
      }
      double sum = 0;
      for (std::int32_t t = 0; t < n; ++t) sum += std::exp(s[static_cast<std::size_t>(t)] - mx);
      float* o = out + static_cast<std::size_t>(qh) * D;
      for (std::int32_t d = 0; d < D; ++d) {
        double acc = 0;
        for (std::int32_t t = 0; t < n; ++t)
          acc += std::exp(s[static_cast<std::size_t>(t)] - mx) * static_cast<float>(V(t, hi, d));
        o[d] = n ? static_cast<float>(acc / sum) : 0.0f;
      }
      if (opt.lse) opt.lse[qh] = n ? static_cast<float>(mx + std::log(sum)) : -INFINITY;
      for (std::int32_t t = 0; t < n; ++t) {
        const double p = std::exp(s[static_cast<std::size_t>(t)] - mx) / sum;
        if (opt.probs) opt.probs[static_cast<std::size_t>(qh) * opt.probs_stride + t] = static_cast<float>(p);
        if (opt.group_probs) {
          float& gp = opt.group_probs[static_cast<std::size_t>(h) * opt.probs_stride + t];
          if (g == 0) gp = 0.0f;
          gp += static_cast<float>(p);
        }
      }
    }
  }
}

}  // namespace reference
KVC_END_NAMESPACE
