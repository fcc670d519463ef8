// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Per-head PCA bases for projected (low-rank) KV, training-free: an orthonormal basis U (D x r)
/// per (layer, kv head) from a block of keys (and, separately, values), so the cache can hold the
/// r coefficients c = Uᵀ(x − μ) of every token instead of its D channels.
///
/// The idea is the one of Loki (Singhania et al. 2024, "Loki: Low-rank Keys for Efficient Sparse
/// Attention": keys of a head live near a low-dimensional subspace, found by PCA) and of Eigen
/// Attention (Saxena et al. 2024, "Eigen Attention: Attention in Low-Rank Space for KV Cache
/// Compression": attention computed in the span of the top eigenvectors of K and V). Both fit the
/// basis offline from calibration data; here it is fitted from whatever block the caller passes
/// (typically the prompt's keys and values), so no training and no calibration set.
///
/// Method: the D x D second-moment matrix S = (1/n) Σ (x − μ)(x − μ)ᵀ, accumulated and solved in
/// double with Eigen's SelfAdjointEigenSolver (D ≤ a few hundred: the solve is O(D³) once per head,
/// the accumulation O(n D²)); the basis is the eigenvectors of the r largest eigenvalues. With
/// `center = false`, μ = 0 and S is the uncentered Gram XᵀX/n: the truncated SVD of X, which is
/// what both papers use.
///
/// Centering (`center = true`) fits μ = the mean row and stores it with the basis. Attention stays
/// exact in structure: a key k̂ = μ_k + U c adds q·μ_k to every score of a query, which the softmax
/// cancels (only the log-sum-exp moves, by that amount); a value v̂ = μ_v + U c_v adds μ_v to the
/// output because the probabilities sum to 1. So centering costs one D-vector add per query head
/// and step, and spends no rank on the mean direction. Neither paper centers; it is an option.
///
/// Host code, one body in every TU (docs/isa.md): no kvc::cpu, no SIMD of its own. Eigen's own
/// vectorisation still follows each TU's -m flags (the caveat docs/isa.md states for any inline
/// library code; GEAR's eigensolver shares it).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <Eigen/Core>
#include <Eigen/Eigenvalues>

#include <kvc/error.hpp>

KVC_BEGIN_NAMESPACE
namespace lowrank {

/// How many directions a basis keeps. Three ways to say it:
///  - `of_count(r)`: exactly r, 1 ≤ r ≤ D.
///  - `of_fraction(f)`, 0 < f ≤ 1: r = ceil(f · D) (so of_fraction(0.25) of 128 is 32, of 100 is 25, of
///    10 is 3; never 0). A tiny tolerance (1e-9) keeps 0.25 · 128 from rounding up to 33.
///  - `of_energy(e)`, 0 < e ≤ 1: the smallest r whose eigenvalues sum to at least e of the total
///    (eigenvalues descending, negative round-off clamped to 0; a sum within 1e-12 relative of the
///    target counts as reaching it, so round-off cannot add a direction): e.g. spectrum {4, 3, 2, 1} and
///    e = 0.7 keeps 2 (7/10 ≥ 0.7). Energy is the fraction of Σ‖x − μ‖² the kept directions
///    reconstruct. A block with zero energy (all rows equal to μ) keeps 1. e = 1 may keep fewer
///    than D when trailing eigenvalues are exactly 0.
struct rank_spec {
  enum class kind { count, fraction, energy };
  kind how = kind::count;
  double value = 0;
  static rank_spec of_count(std::int32_t r) noexcept { return {kind::count, static_cast<double>(r)}; }
  static rank_spec of_fraction(double f) noexcept { return {kind::fraction, f}; }
  static rank_spec of_energy(double e) noexcept { return {kind::energy, e}; }
};

/// An orthonormal basis of one (layer, kv head) and what it was fitted on.
struct basis {
  std::int32_t dim = 0;            ///< D
  std::int32_t rank = 0;           ///< r
  std::vector<float> u;            ///< [r][D]: row j is the j-th direction (U's column j), unit length
  std::vector<float> mean;         ///< [D] μ; empty when not centered
  std::vector<double> eigenvalues; ///< [D] of S, descending (the whole spectrum, for diagnostics)
  double energy = 0;               ///< Σ of the kept eigenvalues / Σ of all (1 when the total is 0)
  bool centered() const noexcept { return !mean.empty(); }
  const float* direction(std::int32_t j) const noexcept { return u.data() + static_cast<std::size_t>(j) * dim; }
};

/// The rank `spec` selects on a spectrum `eig` of D eigenvalues in descending order (rank_spec's
/// rules). Throws kvc::error naming the spec when it is out of range.
inline std::int32_t select_rank(const rank_spec& spec, const double* eig, std::int32_t D) {
  KVC_EXPECTS_IN("kvc::lowrank::select_rank", D > 0, "D = ", D, ", expected > 0");
  switch (spec.how) {
    case rank_spec::kind::count: {
      KVC_EXPECTS_IN("kvc::lowrank::select_rank", spec.value >= 1 && spec.value <= D && spec.value == std::floor(spec.value),
                     "rank = ", spec.value, ", expected a whole number of directions in 1..", D, " (head_dim)");
      return static_cast<std::int32_t>(spec.value);
    }
    case rank_spec::kind::fraction: {
      KVC_EXPECTS_IN("kvc::lowrank::select_rank", spec.value > 0 && spec.value <= 1, "rank fraction = ", spec.value,
                     ", expected 0 < fraction <= 1 of head_dim = ", D);
      const double r = std::ceil(spec.value * D - 1e-9);
      return static_cast<std::int32_t>(std::clamp(r, 1.0, static_cast<double>(D)));
    }
    case rank_spec::kind::energy: {
      KVC_EXPECTS_IN("kvc::lowrank::select_rank", spec.value > 0 && spec.value <= 1, "energy = ", spec.value,
                     ", expected 0 < energy <= 1 (the fraction of the spectrum kept)");
      KVC_EXPECTS_IN("kvc::lowrank::select_rank", eig != nullptr, "eigenvalues is null with an energy rank");
      double total = 0;
      for (std::int32_t i = 0; i < D; ++i) total += std::max(0.0, eig[i]);
      if (!(total > 0)) return 1;
      double run = 0;
      for (std::int32_t i = 0; i < D; ++i) {
        run += std::max(0.0, eig[i]);
        // Relative slack of 1e-12: {4,3,2,1} at e = 0.7 must keep 2 although 0.7 * 10 rounds up.
        if (run >= spec.value * total * (1 - 1e-12)) return i + 1;
      }
      return D;
    }
  }
  return D;
}

/// Fits a basis to n rows of D floats: row t starts at x + t * stride (so one kv head of a
/// [n][num_kv_heads][D] block is x + h * D with stride num_kv_heads * D).
///
/// `exact_rows` = m > 0 makes the first m rows exact: their directions (x_t − μ, orthonormalised)
/// are the basis's first q ≤ m directions, and the other r − q are the leading eigenvectors of the
/// covariance with those directions projected out, S' = (I − QQᵀ) S (I − QQᵀ). Why: attention
/// sinks. The first tokens of a prompt draw a large share of every query's attention, and their
/// keys sit far from the bulk, so a plain PCA of thousands of rows spends little of its rank on
/// them; measured on SmolLM2-135M at 4k (docs/results.md, "Low-rank at 4k"), weighting them in the
/// fit cut Δppl by 3-6x. The rank must be at least q (with a count below m: kvc::error; a
/// fraction or energy rank is raised to q). `energy` is then Σ of uᵀSu over the kept directions / tr S.
/// \pre n ≥ 1, D ≥ 1, stride ≥ D, every value finite (checked: kvc::error names the row and channel)
inline basis fit_basis(const float* x, std::int32_t n, std::int32_t D, std::int64_t stride, const rank_spec& spec,
                       bool center = false, std::int32_t exact_rows = 0) {
  constexpr const char* who = "kvc::lowrank::fit_basis";
  KVC_EXPECTS_IN(who, D > 0, "D = ", D, ", expected head_dim > 0");
  KVC_EXPECTS_IN(who, n > 0, "n = ", n, ", expected at least one row to fit");
  KVC_EXPECTS_IN(who, stride >= D, "stride = ", stride, ", expected >= D = ", D, " floats between rows");
  KVC_EXPECTS_IN(who, x != nullptr, "x is null with n = ", n);
  KVC_EXPECTS_IN(who, exact_rows >= 0 && exact_rows <= n, "exact_rows = ", exact_rows, ", expected 0..n = ", n);
  if (spec.how != rank_spec::kind::energy) (void)select_rank(spec, nullptr, D);  // a bad spec fails before the O(nD²) work
  if (spec.how == rank_spec::kind::count)
    KVC_EXPECTS_IN(who, exact_rows <= spec.value, "exact_rows = ", exact_rows, ", expected <= rank = ", spec.value,
                   " (each exact row may need a direction of its own)");
  for (std::int32_t t = 0; t < n; ++t)
    for (std::int32_t d = 0; d < D; ++d) {
      const float v = x[t * stride + d];
      KVC_EXPECTS_IN(who, std::isfinite(v), "x[row ", t, "][", d, "] = ", v, ", expected finite values to fit");
    }
  using mat = Eigen::MatrixXd;
  Eigen::VectorXd mu = Eigen::VectorXd::Zero(D);
  if (center) {
    for (std::int32_t t = 0; t < n; ++t)
      for (std::int32_t d = 0; d < D; ++d) mu[d] += x[t * stride + d];
    mu /= n;
  }
  // S = (1/n) Σ (x − μ)(x − μ)ᵀ, in double, as a rank-update per block of rows (GEMM, not n rank-1s).
  mat S = mat::Zero(D, D);
  constexpr std::int32_t block = 256;
  mat Xb(block, D);
  for (std::int32_t t0 = 0; t0 < n; t0 += block) {
    const std::int32_t bn = std::min(block, n - t0);
    for (std::int32_t i = 0; i < bn; ++i)
      for (std::int32_t d = 0; d < D; ++d) Xb(i, d) = static_cast<double>(x[(t0 + i) * stride + d]) - mu[d];
    S.noalias() += Xb.topRows(bn).transpose() * Xb.topRows(bn);
  }
  S /= n;
  Eigen::SelfAdjointEigenSolver<mat> es(S);
  KVC_EXPECTS_IN(who, es.info() == Eigen::Success, "the eigensolver did not converge on the ", D, "x", D,
                 " covariance of ", n, " rows, expected a solvable block");
  basis b;
  b.dim = D;
  b.eigenvalues.resize(static_cast<std::size_t>(D));
  for (std::int32_t i = 0; i < D; ++i) b.eigenvalues[i] = es.eigenvalues()[D - 1 - i];  // Eigen: ascending
  b.rank = select_rank(spec, b.eigenvalues.data(), D);
  if (center) b.mean.assign(mu.data(), mu.data() + D);
  double total = 0, kept = 0;
  for (std::int32_t i = 0; i < D; ++i) total += std::max(0.0, b.eigenvalues[i]);
  if (exact_rows == 0) {
    b.u.resize(static_cast<std::size_t>(b.rank) * D);
    for (std::int32_t j = 0; j < b.rank; ++j)
      for (std::int32_t d = 0; d < D; ++d) b.u[static_cast<std::size_t>(j) * D + d] = static_cast<float>(es.eigenvectors()(d, D - 1 - j));
    for (std::int32_t i = 0; i < b.rank; ++i) kept += std::max(0.0, b.eigenvalues[i]);
    b.energy = total > 0 ? kept / total : 1.0;
    return b;
  }
  // The exact rows' directions first (Gram-Schmidt, twice for round-off; a row already in their
  // span adds none), then the deflated covariance's leading eigenvectors, each projected off the
  // chosen directions (eigenvectors of S' with eigenvalue 0 may lean into span Q).
  std::vector<Eigen::VectorXd> dirs;
  auto add = [&](Eigen::VectorXd v, double min_norm) {
    for (int pass = 0; pass < 2; ++pass)
      for (const auto& u : dirs) v -= u.dot(v) * u;
    const double nv = v.norm();
    if (nv > min_norm) dirs.push_back(v / nv);
    return nv > min_norm;
  };
  for (std::int32_t t = 0; t < exact_rows; ++t) {
    Eigen::VectorXd e(D);
    for (std::int32_t d = 0; d < D; ++d) e[d] = static_cast<double>(x[t * stride + d]) - mu[d];
    add(e, 1e-9 * std::max(e.norm(), 1e-300));
  }
  b.rank = std::max<std::int32_t>(b.rank, static_cast<std::int32_t>(dirs.size()));
  mat Q(D, static_cast<Eigen::Index>(dirs.size()));
  for (std::size_t j = 0; j < dirs.size(); ++j) Q.col(static_cast<Eigen::Index>(j)) = dirs[j];
  const mat P = mat::Identity(D, D) - Q * Q.transpose();
  Eigen::SelfAdjointEigenSolver<mat> ed(P * S * P);
  KVC_EXPECTS_IN(who, ed.info() == Eigen::Success, "the eigensolver did not converge on the deflated ", D, "x", D,
                 " covariance of ", n, " rows, expected a solvable block");
  for (std::int32_t j = D - 1; j >= 0 && static_cast<std::int32_t>(dirs.size()) < b.rank; --j)
    add(ed.eigenvectors().col(j), 0.5);  // a unit vector keeps over half its length outside the span, or is skipped
  // Directions of zero variance may all have been skipped: complete with the unit axes (any
  // orthonormal completion reconstructs nothing more).
  for (std::int32_t d = 0; d < D && static_cast<std::int32_t>(dirs.size()) < b.rank; ++d)
    add(Eigen::VectorXd::Unit(D, d), 1e-6);
  b.u.resize(static_cast<std::size_t>(b.rank) * D);
  for (std::int32_t j = 0; j < b.rank; ++j) {
    const Eigen::VectorXd& u = dirs[static_cast<std::size_t>(j)];
    for (std::int32_t d = 0; d < D; ++d) b.u[static_cast<std::size_t>(j) * D + d] = static_cast<float>(u[d]);
    kept += std::max(0.0, u.dot(S * u));
  }
  b.energy = total > 0 ? std::min(1.0, kept / total) : 1.0;
  return b;
}

}  // namespace lowrank
KVC_END_NAMESPACE
