// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Palu (Chang et al. 2024, "Palu: Compressing KV-Cache with Low-Rank Projection"): the key and
/// value projections are factored, W ≈ A B, the cache holds the r-dimensional latent h = A x and
/// the keys are rebuilt from it on the fly (then rotated: the latent is pre-RoPE).
///
/// kvc's form is the per-head decomposition (the paper's M-LRD): for kv head h with projection
/// W_h (D x in; k = W_h x), the truncated SVD W_h ≈ U_r Σ_r V_rᵀ. The latent Σ_r V_rᵀ x equals
/// U_rᵀ k exactly (U_r has orthonormal columns), so a projected cache (projected_cache.hpp) whose
/// key basis is U_r, appended with the model's pre-RoPE keys, stores Palu's latent and rebuilds
/// U_r h before RoPE, as the paper's kernel does; the same for values with W_v (no RoPE). The
/// basis comes from the weights alone: the left singular vectors of W_h are the eigenvectors of
/// W_h W_hᵀ, the covariance of k for inputs of identity covariance; fit_basis does that solve on
/// the rows of W_hᵀ: Palu's `svd` decomposition. Its `whiten` decomposition (SVD-LLM's: W S with
/// S the Cholesky factor of the calibration inputs' XᵀX) has U = the eigenvectors of
/// W XᵀX Wᵀ = KᵀK, the uncentered PCA of the calibration keys, which `pca(pre_rope=1)` computes
/// with the prompt as calibration (pca.hpp). Not done here: the paper's group-head decomposition
/// (one latent shared by several heads) and its Fisher-information rank search.
///
/// Host code, one body in every TU (docs/isa.md).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/lowrank/pca.hpp>

KVC_BEGIN_NAMESPACE
namespace lowrank {

/// The top-r left singular vectors of W_h, the D rows of a projection weight starting at w
/// (row d at w + d·row_stride, `in` columns: k_d = Σ_j w[d][j] x_j), as a basis of dim D.
/// `eigenvalues` are the squared singular values over `in` (W_h W_hᵀ / in), `energy` their kept share.
/// \pre D >= 1, in >= 1, row_stride >= in, finite weights (checked: kvc::error)
inline basis weight_basis(const float* w, std::int32_t D, std::int32_t in, std::int64_t row_stride, const rank_spec& r) {
  constexpr const char* who = "kvc::lowrank::weight_basis";
  KVC_EXPECTS_IN(who, w != nullptr, "w is null");
  KVC_EXPECTS_IN(who, D >= 1 && in >= 1, "D = ", D, ", in = ", in, ", expected both >= 1");
  KVC_EXPECTS_IN(who, row_stride >= in, "row_stride = ", row_stride, ", expected >= in = ", in);
  // The columns of W_h as rows of D values: fit_basis's second moment is then W_h W_hᵀ / in.
  std::vector<float> wt(static_cast<std::size_t>(in) * D);
  for (std::int32_t d = 0; d < D; ++d)
    for (std::int32_t j = 0; j < in; ++j) {
      const float x = w[d * row_stride + j];
      KVC_EXPECTS_IN(who, std::isfinite(x), "w[", d, "][", j, "] = ", x, ", expected finite weights");
      wt[static_cast<std::size_t>(j) * D + d] = x;
    }
  return fit_basis(wt.data(), in, D, D, r);
}

}  // namespace lowrank
KVC_END_NAMESPACE
