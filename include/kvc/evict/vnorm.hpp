// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Value-norm weighting of any scorer: score ← (s + epsilon)·‖v‖₁ (VATP), or, when the caller
/// supplies the output projection, (s + epsilon)·‖W_o v‖₁ (CriticalKV's value-aware rescoring,
/// single stage). W_o is given per kv-head as the [out_dim][head_dim] block that multiplies that
/// head's values (the stacked W_o slices of its query group).
/// \par Reference
/// Guo et al., "Attention Score is not All You Need for Token Importance Indicator in KV Cache Reduction: Value Also Matters", arXiv:2406.12335;
/// Feng et al., "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective", arXiv:2502.03805.

#include <cmath>
#include <vector>

#include <kvc/evict/core.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct vnorm_params {
  float epsilon = 0.0f;
  /// Optional [num_layers][num_kv_heads][out_dim][head_dim] projection blocks; null: ‖v‖₁.
  const float* w_o = nullptr;
  std::int32_t out_dim = 0;
};

template <class Inner>
struct vnorm {
  using params_type = vnorm_params;
  using inner_params_type = typename Inner::params_type;
  using observation_type = typename Inner::observation_type;
  static constexpr unsigned reads = Inner::reads | reads_values;
  static constexpr const char* name = "vnorm";
  Inner inner;
  params_type p;
  vnorm() = default;
  explicit vnorm(const params_type& params, const Inner& in = Inner{}) : inner(in), p(params) {
    KVC_EXPECTS(p.epsilon >= 0, "epsilon = ", p.epsilon, ", expected >= 0");
    KVC_EXPECTS(!p.w_o || p.out_dim > 0, "out_dim = ", p.out_dim, ", expected > 0 with w_o");
  }
  protection protect() const { return inner.protect(); }
  void score(const layer_input& in, const observations& obs, layer_scores& out) const {
    inner.score(in, obs, out);
    check_scores(in, out, Inner::name);
    const std::int32_t D = in.head_dim;
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const head_input& hi = in.heads[static_cast<std::size_t>(h)];
      const float* W = p.w_o ? p.w_o + (static_cast<std::size_t>(in.layer) * in.num_kv_heads + h) * p.out_dim * D : nullptr;
      for (std::int32_t t = 0; t < hi.n; ++t) {
        const float* v = hi.v + static_cast<std::size_t>(t) * D;
        double norm = 0;
        if (W) {
          for (std::int32_t o = 0; o < p.out_dim; ++o) {
            double s = 0;
            for (std::int32_t d = 0; d < D; ++d) s += double(W[static_cast<std::size_t>(o) * D + d]) * v[d];
            norm += std::abs(s);
          }
        } else {
          for (std::int32_t d = 0; d < D; ++d) norm += std::abs(v[d]);
        }
        float& s = out[static_cast<std::size_t>(h)][static_cast<std::size_t>(t)];
        s = static_cast<float>((s + p.epsilon) * norm);
      }
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
