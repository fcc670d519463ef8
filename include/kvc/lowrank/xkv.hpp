// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// xKV (Chang et al. 2025, "xKV: Cross-Layer SVD for KV-Cache Compression"): the dominant
/// singular vectors of the KV cache line up across adjacent layers, so one SVD over a group of
/// layers puts all of them in one shared low-rank subspace.
///
/// The matrix is the group's keys side by side: row t is token t's keys of every layer of the
/// group and every kv head, X = [K_l0 | K_l1 | ...] of n x (G·H·D) (values the same, separately;
/// keys before RoPE, as the paper's cache takes them). Its truncated SVD X ≈ (X V_r) V_rᵀ gives
/// each token one latent a_t = V_rᵀ x_t of r values shared by the whole group, and each
/// (layer, head) its own slice of V_rᵀ (r x D) to rebuild its D channels from the latent:
/// k̂_t = B_{l,h}ᵀ a_t. The cache holds the latents (r per token per group, against G·H·D
/// whole) and the slices (metadata, independent of the context length).
///
/// Published settings (the repository's RULER scripts on Llama-3.1-8B, 8 kv heads x 128
/// channels): one layer r_k = 96, r_v = 144; two layers 192 / 288; four layers 384 / 576: the same
/// 9.4% of the group's width for keys and 14.1% for values at every group size.
///
/// V_r is found as the top eigenvectors of XᵀX (fit_basis, pca.hpp: uncentered, so the truncated
/// SVD), O(n·w² + w³) in double for w = G·H·D: 0.1 s at w = 384, about a minute at w = 4096.
/// Host code, one body in every TU (docs/isa.md).

#include <cstddef>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include <kvc/error.hpp>
#include <kvc/lowrank/pca.hpp>

KVC_BEGIN_NAMESPACE
namespace lowrank {

/// One group's shared basis: r directions of the concatenated width w = layers·heads·dim, and
/// the per-(layer, head) slices that rebuild each stream from a latent.
struct group_basis {
  std::int32_t layers = 0, heads = 0, dim = 0;
  basis whole;                 ///< dim = w, rank = r: u [r][w], unit rows (V_rᵀ)
  std::vector<basis> slices;   ///< [layer · heads + head]: dim = D, rank = r, u [r][D] (not orthonormal)
  std::int32_t rank() const noexcept { return whole.rank; }
  std::int32_t width() const noexcept { return layers * heads * dim; }
  const basis& slice(std::int32_t layer, std::int32_t head) const { return slices.at(static_cast<std::size_t>(layer) * heads + head); }
};

/// Fits a group basis to n rows x ([n][layers · heads · dim], a token's row is its streams side by
/// side, layer-major, then head, then channel). `exact_rows` as fit_basis: the first m rows are
/// rebuilt exactly (the attention sinks).
/// \pre n >= 1, finite rows, a rank fit_basis accepts for width w (checked: kvc::error)
inline group_basis fit_group_basis(const float* x, std::int32_t n, std::int32_t layers, std::int32_t heads, std::int32_t dim,
                                   const rank_spec& r, std::int32_t exact_rows = 0) {
  KVC_EXPECTS_IN("kvc::lowrank::fit_group_basis", layers >= 1 && heads >= 1 && dim >= 1, "layers = ", layers,
                 ", heads = ", heads, ", dim = ", dim, ", expected each >= 1");
  group_basis g;
  g.layers = layers;
  g.heads = heads;
  g.dim = dim;
  const std::int32_t w = g.width();
  g.whole = fit_basis(x, n, w, w, r, false, exact_rows);
  const std::int32_t rk = g.whole.rank;
  g.slices.resize(static_cast<std::size_t>(layers) * heads);
  for (std::int32_t s = 0; s < layers * heads; ++s) {
    basis& b = g.slices[static_cast<std::size_t>(s)];
    b.dim = dim;
    b.rank = rk;
    b.u.resize(static_cast<std::size_t>(rk) * dim);
    for (std::int32_t j = 0; j < rk; ++j)
      for (std::int32_t d = 0; d < dim; ++d)
        b.u[static_cast<std::size_t>(j) * dim + d] = g.whole.u[static_cast<std::size_t>(j) * w + static_cast<std::size_t>(s) * dim + d];
    b.energy = g.whole.energy;
  }
  return g;
}

/// The latents of n rows: a[t] = V_rᵀ x[t], a is [n][rank] (one float GEMM).
inline void project_group(const group_basis& g, const float* x, std::int32_t n, float* a) {
  using rowmat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const rowmat> X(x, n, g.width());
  const Eigen::Map<const rowmat> U(g.whole.u.data(), g.rank(), g.width());
  Eigen::Map<rowmat> A(a, n, g.rank());
  A.noalias() = X * U.transpose();
}

}  // namespace lowrank
KVC_END_NAMESPACE
