// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// CurDKV-style value-aware leverage proxy (kvpress CURPress, kv_product): k2 = ‖k‖², v2 = ‖v‖²,
/// each normalised by its sum within consecutive local windows of `window` tokens, score =
/// k2·v2 normalised to sum 1 over the stream; the first `sinks` tokens score 1 (always kept).
/// Attention-free.
/// \par Reference
/// Sengupta et al., "Value-Guided KV Compression for LLMs via Approximated CUR Decomposition", arXiv:2509.15038.

#include <algorithm>
#include <vector>

#include <kvc/evict/core.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct curdkv_params {
  std::int32_t window = 16;
  std::int32_t sinks = 4;
};

struct curdkv {
  using params_type = curdkv_params;
  using observation_type = no_observation;
  static constexpr unsigned reads = reads_keys | reads_values;
  static constexpr const char* name = "curdkv";
  params_type p;
  curdkv() = default;
  explicit curdkv(const params_type& params) : p(params) {
    KVC_EXPECTS(p.window >= 1, "window = ", p.window, ", expected >= 1 token");
    KVC_EXPECTS(p.sinks >= 0, "sinks = ", p.sinks, ", expected >= 0");
  }
  protection protect() const { return {p.sinks, 0}; }
  void score(const layer_input& in, const observations&, layer_scores& out) const {
    shape_scores(in, out);
    const std::int32_t D = in.head_dim;
    std::vector<double> k2, v2;
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const head_input& hi = in.heads[static_cast<std::size_t>(h)];
      const std::int32_t n = hi.n;
      k2.assign(static_cast<std::size_t>(n), 0.0);
      v2.assign(static_cast<std::size_t>(n), 0.0);
      for (std::int32_t t = 0; t < n; ++t)
        for (std::int32_t d = 0; d < D; ++d) {
          const double a = hi.k[static_cast<std::size_t>(t) * D + d], b = hi.v[static_cast<std::size_t>(t) * D + d];
          k2[static_cast<std::size_t>(t)] += a * a;
          v2[static_cast<std::size_t>(t)] += b * b;
        }
      std::vector<double> s(static_cast<std::size_t>(n));
      double total = 0;
      for (std::int32_t w0 = 0; w0 < n; w0 += p.window) {
        const std::int32_t w1 = std::min(n, w0 + p.window);
        double sk = 0, sv = 0;
        for (std::int32_t t = w0; t < w1; ++t) sk += k2[static_cast<std::size_t>(t)], sv += v2[static_cast<std::size_t>(t)];
        for (std::int32_t t = w0; t < w1; ++t) {
          const double a = sk > 0 ? k2[static_cast<std::size_t>(t)] / sk : 0.0, b = sv > 0 ? v2[static_cast<std::size_t>(t)] / sv : 0.0;
          total += (s[static_cast<std::size_t>(t)] = a * b);
        }
      }
      for (std::int32_t t = 0; t < n; ++t)
        out[static_cast<std::size_t>(h)][static_cast<std::size_t>(t)] =
            t < p.sinks ? 1.0f : static_cast<float>(total > 0 ? s[static_cast<std::size_t>(t)] / total : 0.0);
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
