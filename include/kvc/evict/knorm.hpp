// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// K-norm: keep keys with a low L2 norm (score = -‖k‖₂); attention-free.
/// \par Reference
/// Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", arXiv:2406.11430.

#include <kvc/evict/core.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct knorm_params {
  protection protect{4, 0};
};

struct knorm {
  using params_type = knorm_params;
  using observation_type = no_observation;
  static constexpr unsigned reads = reads_keys;
  static constexpr const char* name = "knorm";
  params_type p;
  knorm() = default;
  explicit knorm(const params_type& params) : p(params) {}
  protection protect() const { return p.protect; }
  void score(const layer_input& in, const observations&, layer_scores& out) const {
    shape_scores(in, out);
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const head_input& hi = in.heads[static_cast<std::size_t>(h)];
      for (std::int32_t t = 0; t < hi.n; ++t)
        out[static_cast<std::size_t>(h)][static_cast<std::size_t>(t)] =
            -detail::l2(hi.k + static_cast<std::size_t>(t) * in.head_dim, in.head_dim);
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
