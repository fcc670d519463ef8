// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Q-Filters: per (layer, kv-head) a context-agnostic filter f, the principal right singular
/// vector of calibration queries (the top eigenvector of their D x D Gram matrix), oriented so the queries project positively on it;
/// then ⟨q, k⟩ ≈ κ⟨k, f⟩ and a key's score is ⟨k, f⟩ (higher = keep). Calibration queries must be in
/// the space of the stored keys (after RoPE when keys are stored rotated). kvpress loads learned
/// filters and scores -(f·k) with its own sign convention; here the sign is fixed by calibration.
/// \par Reference
/// Godey et al., "Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression", arXiv:2503.02812.

#include <cmath>
#include <vector>

#include <Eigen/Core>
#include <Eigen/Eigenvalues>

#include <kvc/evict/core.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

/// Fits the filters of one layer from n calibration queries [n][num_q_heads][head_dim]: for kv-head
/// h, the queries of its group, stacked. Returns [num_kv_heads][head_dim].
inline std::vector<float> fit_qfilters(const float* q, std::int32_t n, std::int32_t num_q_heads,
                                       std::int32_t num_kv_heads, std::int32_t head_dim) {
  KVC_EXPECTS(n > 0 && q != nullptr, "n = ", n, ", expected > 0 calibration queries");
  KVC_EXPECTS(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "num_q_heads = ", num_q_heads,
              ", expected a multiple of num_kv_heads = ", num_kv_heads);
  const std::int32_t G = num_q_heads / num_kv_heads, D = head_dim;
  std::vector<float> f(static_cast<std::size_t>(num_kv_heads) * D);
  for (std::int32_t h = 0; h < num_kv_heads; ++h) {
    Eigen::MatrixXd Q(static_cast<Eigen::Index>(n) * G, D);
    for (std::int32_t i = 0; i < n; ++i)
      for (std::int32_t g = 0; g < G; ++g)
        for (std::int32_t d = 0; d < D; ++d)
          Q(static_cast<Eigen::Index>(i) * G + g, d) = q[(static_cast<std::size_t>(i) * num_q_heads + h * G + g) * D + d];
    // The principal right singular vector of Q is the top eigenvector of QᵀQ. Why not Eigen's
    // BDCSVD: its instantiation was 8 of the 15.7 s clang took for <kvc/runtime/evictor_registry.hpp>
    // at -O2 (-ftime-trace), paid by every TU that includes the registry; the self-adjoint solver
    // is instantiated anyway (quant/gear.hpp) and D x D is small.
    const Eigen::MatrixXd gram = Q.transpose() * Q;
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(gram);  // ascending eigenvalues
    Eigen::VectorXd v = es.eigenvectors().col(D - 1);
    if ((Q * v).mean() < 0) v = -v;
    for (std::int32_t d = 0; d < D; ++d) f[static_cast<std::size_t>(h) * D + d] = static_cast<float>(v[d]);
  }
  return f;
}

struct qfilters_params {
  /// [num_layers][num_kv_heads][head_dim] filters (fit_qfilters per layer); not owned.
  const float* filters = nullptr;
  std::int32_t num_layers = 0;
  protection protect{4, 0};
};

struct qfilters {
  using params_type = qfilters_params;
  using observation_type = no_observation;  // the filters are calibrated offline
  static constexpr unsigned reads = reads_keys;
  static constexpr const char* name = "qfilters";
  params_type p;
  qfilters() = default;
  explicit qfilters(const params_type& params) : p(params) {}
  protection protect() const { return p.protect; }
  void score(const layer_input& in, const observations&, layer_scores& out) const {
    KVC_EXPECTS(p.filters != nullptr, name, ": filters = null, expected [num_layers][num_kv_heads][head_dim] filters");
    KVC_EXPECTS(p.num_layers == in.num_layers, name, ": num_layers = ", p.num_layers, ", expected the cache's ",
                in.num_layers);
    shape_scores(in, out);
    const std::int32_t D = in.head_dim;
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const float* f = p.filters + (static_cast<std::size_t>(in.layer) * in.num_kv_heads + h) * D;
      const head_input& hi = in.heads[static_cast<std::size_t>(h)];
      for (std::int32_t t = 0; t < hi.n; ++t) {
        double s = 0;
        for (std::int32_t d = 0; d < D; ++d) s += double(hi.k[static_cast<std::size_t>(t) * D + d]) * f[d];
        out[static_cast<std::size_t>(h)][static_cast<std::size_t>(t)] = static_cast<float>(s);
      }
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
