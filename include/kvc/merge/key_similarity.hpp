// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// What the similarity-based merges (D2O, kvc/merge/d2o.hpp; KVMerger, kvc/merge/kvmerger.hpp)
/// share: the checks of a layer's keys and of per-head token lists, and cosine similarity in
/// double with a zero key at cosine 0 with everything.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <kvc/error.hpp>

KVC_BEGIN_NAMESPACE
namespace merge {
/// Not `detail`: a nested merge::detail would hide kvc::detail from the KVC_EXPECTS macros.
namespace similarity {

/// keys: [kv heads][n_h · head_dim], every element finite; head_dim >= 1.
inline void check_layer_keys(const char* who, const std::vector<std::vector<float>>& keys, std::int32_t head_dim) {
  KVC_EXPECTS_IN(who, head_dim >= 1, "head_dim = ", head_dim, ", expected >= 1");
  const std::size_t D = static_cast<std::size_t>(head_dim);
  for (std::size_t h = 0; h < keys.size(); ++h) {
    const auto& kh = keys[h];
    KVC_EXPECTS_IN(who, kh.size() % D == 0, "keys[", h, "].size() = ", kh.size(),
                   ", expected a multiple of head_dim = ", head_dim);
    for (std::size_t i = 0; i < kh.size(); ++i)
      KVC_EXPECTS_IN(who, std::isfinite(kh[i]), "keys[", h, "][", i, "] = ", kh[i], ", expected a finite key");
  }
}

/// list (named `name` in errors): strictly increasing token indices of kv head h into 0..n-1.
inline void check_token_list(const char* who, const char* name, std::size_t h, const std::vector<std::int32_t>& list,
                             std::int64_t n) {
  for (std::size_t i = 0; i < list.size(); ++i) {
    KVC_EXPECTS_IN(who, list[i] >= 0 && list[i] < n, name, "[", h, "][", i, "] = ", list[i], ", expected 0..", n - 1,
                   " (kv head ", h, " holds ", n, " tokens)");
    KVC_EXPECTS_IN(who, i == 0 || list[i] > list[i - 1], name, "[", h, "][", i, "] = ", list[i], " after ",
                   list[i - 1], ", expected strictly increasing indices");
  }
}

/// Euclidean norms in double of n rows of D floats.
inline std::vector<double> row_norms(const float* k, std::int32_t n, std::size_t D) {
  std::vector<double> norm(static_cast<std::size_t>(n));
  for (std::int32_t t = 0; t < n; ++t) {
    const float* r = k + static_cast<std::size_t>(t) * D;
    double q = 0;
    for (std::size_t d = 0; d < D; ++d) q += static_cast<double>(r[d]) * r[d];
    norm[static_cast<std::size_t>(t)] = std::sqrt(q);
  }
  return norm;
}

/// cos(k_a, k_b) in double from row_norms' norms; 0 when either key is zero.
inline double cosine(const float* k, const std::vector<double>& norm, std::int32_t a, std::int32_t b, std::size_t D) {
  const double den = norm[static_cast<std::size_t>(a)] * norm[static_cast<std::size_t>(b)];
  if (!(den > 0)) return 0.0;
  const float* x = k + static_cast<std::size_t>(a) * D;
  const float* y = k + static_cast<std::size_t>(b) * D;
  double dot = 0;
  for (std::size_t d = 0; d < D; ++d) dot += static_cast<double>(x[d]) * y[d];
  return dot / den;
}

}  // namespace similarity
}  // namespace merge
KVC_END_NAMESPACE
