// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Leverage scores of the keys (kvpress LeverageScorePress, the Compactor paper): centre the
/// pre-RoPE keys, project them with a right Gaussian sketch of dimension 48, and score each
/// token by its leverage diag(X (XᵀX)⁻¹ Xᵀ) = ‖L⁻¹ xᵢ‖² with XᵀX + jitter·I = L Lᵀ (Cholesky),
/// z-normalised over the stream. Keys are un-rotated with `rotary` when given (stored keys carry
/// RoPE); without it the stored keys are used as they are.
/// \par Reference
/// Chari et al., "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores", arXiv:2507.08143.

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include <kvc/evict/core.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct leverage_params {
  std::int32_t sketch_dimension = 48;
  double jitter = 1e-6;  ///< relative to the mean diagonal of XᵀX
  std::uint64_t seed = 0;
  const rope* rotary = nullptr;
  protection protect{4, 0};
};

struct leverage {
  using params_type = leverage_params;
  using observation_type = no_observation;
  static constexpr unsigned reads = reads_keys;
  static constexpr const char* name = "leverage";
  params_type p;
  leverage() = default;
  explicit leverage(const params_type& params) : p(params) {
    KVC_EXPECTS(p.sketch_dimension >= 1, "sketch_dimension = ", p.sketch_dimension, ", expected >= 1");
    KVC_EXPECTS(p.jitter >= 0, "jitter = ", p.jitter, ", expected >= 0");
  }
  protection protect() const { return p.protect; }

  /// The Gaussian sketch [head_dim][sketch], entries N(0, 1/sketch), fixed by the seed and layer.
  Eigen::MatrixXd sketch(std::int32_t D, std::int32_t layer, std::int32_t head) const {
    std::mt19937_64 g(p.seed * 1000003ull + static_cast<std::uint64_t>(layer) * 131ull + static_cast<std::uint64_t>(head));
    std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(static_cast<double>(p.sketch_dimension)));
    Eigen::MatrixXd S(D, p.sketch_dimension);
    for (std::int32_t i = 0; i < D; ++i)
      for (std::int32_t j = 0; j < p.sketch_dimension; ++j) S(i, j) = nd(g);
    return S;
  }

  void score(const layer_input& in, const observations&, layer_scores& out) const {
    shape_scores(in, out);
    const std::int32_t D = in.head_dim;
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const head_input& hi = in.heads[static_cast<std::size_t>(h)];
      const std::int32_t n = hi.n;
      if (n == 0) continue;
      Eigen::MatrixXd K(n, D);
      std::vector<float> row(static_cast<std::size_t>(D));
      for (std::int32_t t = 0; t < n; ++t) {
        std::copy(hi.k + static_cast<std::size_t>(t) * D, hi.k + static_cast<std::size_t>(t + 1) * D, row.begin());
        if (p.rotary) p.rotary->rerotate(row.data(), -static_cast<double>(hi.positions[t]));
        for (std::int32_t d = 0; d < D; ++d) K(t, d) = row[static_cast<std::size_t>(d)];
      }
      K.rowwise() -= K.colwise().mean();
      const Eigen::MatrixXd X = K * sketch(D, in.layer, h);
      Eigen::MatrixXd G = X.transpose() * X;
      const double jit = p.jitter * std::max(G.diagonal().mean(), 1e-30);
      G.diagonal().array() += jit;
      Eigen::LLT<Eigen::MatrixXd> llt(G);
      const Eigen::MatrixXd Y = llt.matrixL().solve(X.transpose());  // [sketch][n]
      std::vector<double> lev(static_cast<std::size_t>(n));
      double mean = 0;
      for (std::int32_t t = 0; t < n; ++t) mean += (lev[static_cast<std::size_t>(t)] = Y.col(t).squaredNorm());
      mean /= n;
      double var = 0;
      for (double x : lev) var += (x - mean) * (x - mean);
      const double sd = n > 1 ? std::sqrt(var / (n - 1)) : 0.0;
      for (std::int32_t t = 0; t < n; ++t)
        out[static_cast<std::size_t>(h)][static_cast<std::size_t>(t)] =
            static_cast<float>(sd > 0 ? (lev[static_cast<std::size_t>(t)] - mean) / sd : 0.0);
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
