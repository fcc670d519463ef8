// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// ThinK (Xu et al. 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning"): per (layer, kv
/// head), keep the key channels that matter to the queries and store only those.
///
/// Channel d of a head scores ‖Q[:, d] K[:, d]ᵀ‖_F = ‖Q[:, d]‖ · ‖K[:, d]‖, with Q the observation
/// window's queries (every query head of the GQA group, post-RoPE) and K every stored key of the
/// head (post-RoPE): the Frobenius norm of channel d's share of QKᵀ, which is what pruning the
/// channel removes from the window's logits. The floor(λ·D) lowest-scoring channels are pruned
/// (λ = the key ratio; kvpress's ThinKPress counts the same way, with a window of 32).
///
/// The value-side variant the paper describes (its appendix): value channel d scores
/// ‖A V[:, d]‖ with A = softmax(scale · Q Kᵀ) over the window (causal: a query sees the keys at
/// or before its position), the norm of channel d of the window's attention outputs.
///
/// kvc stores the result as a projected cache (kvc/store/projected_cache.hpp) whose bases are
/// coordinate selections (selection_basis): a key's coefficients are its kept channels, exactly
/// (selecting is multiplying by 0 and 1), and q'·c_k is q·k over those channels, which is what the
/// paper computes. Where the paper zeroes channels in a full-width cache (kvpress does), kvc's
/// pages hold (D − pruned) key values per token: the bytes are saved, not just the channels.
///
/// Host code, one body in every TU (docs/isa.md).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/lowrank/pca.hpp>

KVC_BEGIN_NAMESPACE
namespace lowrank {

/// The observation window one head group scores with: n tokens of G query heads, query head g of
/// token i at q + i·token_stride + g·D (a [n][num_q_heads][D] window of a group starting at head
/// h·G has q = window + h·G·D and token_stride = num_q_heads·D).
struct window_queries {
  const float* q = nullptr;
  std::int32_t n = 0;
  std::int32_t G = 1;
  std::int64_t token_stride = 0;
  const std::int32_t* positions = nullptr;  ///< [n]; used by the value scores' causal mask
};

/// Channels kept when floor(ratio · D) of D are pruned. \pre 0 <= ratio < 1 (checked).
inline std::int32_t think_kept(double ratio, std::int32_t D) {
  KVC_EXPECTS_IN("kvc::lowrank::think_kept", ratio >= 0 && ratio < 1, "ratio = ", ratio,
                 ", expected 0 <= ratio < 1 (the fraction of channels pruned)");
  const std::int32_t pruned = static_cast<std::int32_t>(std::floor(ratio * D + 1e-9));
  return std::max<std::int32_t>(1, D - pruned);
}

/// ThinK's key channel scores ‖Q[:, d]‖·‖K[:, d]‖ in double: keys [n][D] rows k + t·k_stride.
inline std::vector<double> key_channel_scores(const window_queries& w, const float* k, std::int32_t n,
                                              std::int64_t k_stride, std::int32_t D) {
  std::vector<double> qn(static_cast<std::size_t>(D), 0.0), kn(qn.size(), 0.0);
  for (std::int32_t i = 0; i < w.n; ++i)
    for (std::int32_t g = 0; g < w.G; ++g) {
      const float* q = w.q + i * w.token_stride + static_cast<std::int64_t>(g) * D;
      for (std::int32_t d = 0; d < D; ++d) qn[static_cast<std::size_t>(d)] += static_cast<double>(q[d]) * q[d];
    }
  for (std::int32_t t = 0; t < n; ++t)
    for (std::int32_t d = 0; d < D; ++d) {
      const double x = k[t * k_stride + d];
      kn[static_cast<std::size_t>(d)] += x * x;
    }
  for (std::size_t d = 0; d < qn.size(); ++d) qn[d] = std::sqrt(qn[d]) * std::sqrt(kn[d]);
  return qn;
}

/// The value-side scores ‖(A V)[:, d]‖ in double (see the file comment). keys and values [n][D]
/// rows at t·stride, key_pos [n] their positions; scale the logits' (1/sqrt(D) by default).
/// A window query with no key at or before its position adds nothing.
inline std::vector<double> value_channel_scores(const window_queries& w, const float* k, const float* v,
                                                const std::int32_t* key_pos, std::int32_t n, std::int64_t stride,
                                                std::int32_t D, double scale) {
  std::vector<double> sc(static_cast<std::size_t>(D), 0.0), p(static_cast<std::size_t>(n)), o(sc.size());
  for (std::int32_t i = 0; i < w.n; ++i)
    for (std::int32_t g = 0; g < w.G; ++g) {
      const float* q = w.q + i * w.token_stride + static_cast<std::int64_t>(g) * D;
      double m = -INFINITY;
      for (std::int32_t t = 0; t < n; ++t) {
        if (w.positions && key_pos && key_pos[t] > w.positions[i]) {
          p[static_cast<std::size_t>(t)] = -INFINITY;
          continue;
        }
        double s = 0;
        for (std::int32_t d = 0; d < D; ++d) s += static_cast<double>(q[d]) * k[t * stride + d];
        p[static_cast<std::size_t>(t)] = scale * s;
        m = std::max(m, scale * s);
      }
      if (!(m > -INFINITY)) continue;
      double l = 0;
      for (double& x : p) l += (x = std::exp(x - m));
      std::fill(o.begin(), o.end(), 0.0);
      for (std::int32_t t = 0; t < n; ++t)
        if (p[static_cast<std::size_t>(t)] > 0)
          for (std::int32_t d = 0; d < D; ++d) o[static_cast<std::size_t>(d)] += p[static_cast<std::size_t>(t)] / l * v[t * stride + d];
      for (std::size_t d = 0; d < o.size(); ++d) sc[d] += o[d] * o[d];
    }
  for (double& x : sc) x = std::sqrt(x);
  return sc;
}

/// The `keep` highest-scoring channels, ascending; ties go to the lower channel.
inline std::vector<std::int32_t> top_channels(const std::vector<double>& score, std::int32_t keep) {
  const std::int32_t D = static_cast<std::int32_t>(score.size());
  KVC_EXPECTS_IN("kvc::lowrank::top_channels", keep >= 1 && keep <= D, "keep = ", keep, ", expected 1..", D, " channels");
  std::vector<std::int32_t> idx(static_cast<std::size_t>(D));
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](std::int32_t a, std::int32_t b) {
    return score[static_cast<std::size_t>(a)] > score[static_cast<std::size_t>(b)];
  });
  idx.resize(static_cast<std::size_t>(keep));
  std::sort(idx.begin(), idx.end());
  return idx;
}

/// The basis whose direction j is the unit axis channels[j]: coefficients are the kept channels,
/// reconstruction puts them back and zeroes the rest. `energy` is the kept share of `score` (1
/// when every score is 0).
inline basis selection_basis(const std::vector<std::int32_t>& channels, std::int32_t D,
                             const std::vector<double>* score = nullptr) {
  constexpr const char* who = "kvc::lowrank::selection_basis";
  KVC_EXPECTS_IN(who, !channels.empty() && static_cast<std::int32_t>(channels.size()) <= D, "channels.size() = ",
                 channels.size(), ", expected 1..", D);
  basis b;
  b.dim = D;
  b.rank = static_cast<std::int32_t>(channels.size());
  b.u.assign(static_cast<std::size_t>(b.rank) * D, 0.0f);
  for (std::int32_t j = 0; j < b.rank; ++j) {
    const std::int32_t c = channels[static_cast<std::size_t>(j)];
    KVC_EXPECTS_IN(who, c >= 0 && c < D && (j == 0 || c > channels[static_cast<std::size_t>(j - 1)]), "channels[", j,
                   "] = ", c, ", expected strictly increasing channels in 0..", D - 1);
    b.u[static_cast<std::size_t>(j) * D + c] = 1.0f;
  }
  b.energy = 1.0;
  if (score) {
    double all = 0, kept = 0;
    for (double s : *score) all += s;
    for (std::int32_t c : channels) kept += (*score)[static_cast<std::size_t>(c)];
    if (all > 0) b.energy = kept / all;
  }
  return b;
}

}  // namespace lowrank
KVC_END_NAMESPACE
