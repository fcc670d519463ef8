// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// CAKE's layer preference from the observation window's attention: spatial dispersion H (the
/// entropy of the window-mean attention over the tokens) and temporal shift V (the variance, over
/// the window's queries, of each token's attention, summed over tokens), averaged over heads;
/// P = H^(1/tau1) · V^(1/tau2). allocator::cake(P per layer) then scales each layer's budget by
/// L·P_l/ΣP. The engine computes P for every layer during prefill and compresses once all are
/// known (the cascading re-eviction of the paper is not reproduced).
/// \par Reference
/// Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences", arXiv:2503.12491.

#include <cmath>
#include <vector>

#include <kvc/evict/window_attention.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct cake_params {
  double tau1 = 1.0;
  double tau2 = 1.0;
};

/// The preference P of one layer (in.heads must hold keys).
inline double cake_preference(const layer_input& in, const query_window& w, const cake_params& p = {}) {
  check_window(w, in, "cake_preference");
  KVC_EXPECTS(p.tau1 > 0 && p.tau2 > 0, "tau1/tau2 = ", p.tau1, "/", p.tau2, ", expected > 0");
  const std::int32_t G = in.group();
  std::vector<float> probs;
  double H = 0, V = 0;
  for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
    const head_input& hi = in.heads[static_cast<std::size_t>(h)];
    const std::int32_t n = hi.n;
    for (std::int32_t g = 0; g < G; ++g) {
      window_probs(hi, w, h * G + g, in.seen, in.head_dim, probs);
      for (std::int32_t t = 0; t < n; ++t) {
        double m = 0, m2 = 0;
        for (std::int32_t i = 0; i < w.n; ++i) {
          const double x = probs[static_cast<std::size_t>(i) * n + t];
          m += x;
          m2 += x * x;
        }
        m /= std::max(1, w.n);
        m2 /= std::max(1, w.n);
        if (m > 0) H -= m * std::log(m);
        V += std::max(0.0, m2 - m * m);
      }
    }
  }
  H /= in.num_q_heads;
  V /= in.num_q_heads;
  return std::pow(H, 1.0 / p.tau1) * std::pow(V, 1.0 / p.tau2);
}

}  // namespace evict
KVC_END_NAMESPACE
