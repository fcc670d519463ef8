// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Softmax attention of a window of queries over one stream, as the window-based scorers
/// (SnapKV, PyramidKV, Finch, SimLayerKV, CAKE, the observer's prefill seeding) need it.
/// Causality follows positions: query i sees key j when key_pos[j] <= query_pos[i], which stays
/// right after the stream has been compacted (chunked prefill).

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include <kvc/evict/core.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

/// probs[i][j] (row-major, [w.n][head.n]) = softmax_j over visible keys of q_i . k_j * scale for
/// query head qh. Masked entries are 0. `causal = false` lets every query see every key.
inline void window_probs(const head_input& head, const query_window& w, std::int32_t qh, std::int32_t seen,
                         std::int32_t head_dim, std::vector<float>& probs, bool causal = true, float scale = 0.0f) {
  KVC_EXPECTS(head.k != nullptr || head.n == 0, "head keys = null, expected gathered keys");
  KVC_EXPECTS(w.head_dim == head_dim, "query_window.head_dim = ", w.head_dim, ", expected ", head_dim);
  KVC_EXPECTS(qh >= 0 && qh < w.num_q_heads, "query head = ", qh, ", expected 0..", w.num_q_heads - 1);
  const std::int32_t n = head.n, m = w.n, D = head_dim;
  if (scale == 0.0f) scale = 1.0f / std::sqrt(static_cast<float>(D));
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<const RowMat> K(head.k, n, D);
  RowMat Q(m, D);
  for (std::int32_t i = 0; i < m; ++i)
    for (std::int32_t d = 0; d < D; ++d) Q(i, d) = w.q[(static_cast<std::size_t>(i) * w.num_q_heads + qh) * D + d] * scale;
  probs.resize(static_cast<std::size_t>(m) * n);
  Eigen::Map<RowMat> P(probs.data(), m, n);
  P.noalias() = Q * K.transpose();
  for (std::int32_t i = 0; i < m; ++i) {
    float* row = probs.data() + static_cast<std::size_t>(i) * n;
    const std::int32_t qp = w.position(i, seen);
    float mx = -std::numeric_limits<float>::infinity();
    for (std::int32_t j = 0; j < n; ++j)
      if (!causal || head.positions[j] <= qp) mx = std::max(mx, row[j]);
    double sum = 0;
    for (std::int32_t j = 0; j < n; ++j) {
      if (causal && head.positions[j] > qp) {
        row[j] = 0.0f;
      } else {
        row[j] = std::exp(row[j] - mx);
        sum += row[j];
      }
    }
    const float inv = sum > 0 ? static_cast<float>(1.0 / sum) : 0.0f;
    for (std::int32_t j = 0; j < n; ++j) row[j] *= inv;
  }
}

/// Checks the window's shape against the layer.
inline void check_window(const query_window& w, const layer_input& in, const char* scorer) {
  KVC_EXPECTS(w.q != nullptr || w.n == 0, scorer, ": query_window.q = null with n = ", w.n);
  KVC_EXPECTS(w.n >= 0, scorer, ": query_window.n = ", w.n, ", expected >= 0");
  KVC_EXPECTS(w.num_q_heads == in.num_q_heads, scorer, ": query_window.num_q_heads = ", w.num_q_heads,
              ", expected the model's num_q_heads = ", in.num_q_heads);
  KVC_EXPECTS(w.head_dim == in.head_dim, scorer, ": query_window.head_dim = ", w.head_dim, ", expected ",
              in.head_dim);
}

}  // namespace evict
KVC_END_NAMESPACE
