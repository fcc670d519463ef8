// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// What the similarity-based merges (D2O, kvc/merge/d2o.hpp; KVMerger, kvc/merge/kvmerger.hpp)
/// share: the checks of a layer's keys and of per-head token lists, and cosine similarity in
/// double with a zero key at cosine 0 with everything.
///
/// The fast path: every key is normalised once into a float scratch row (padded with zeros to a
/// multiple of 8 floats, a zero key a zero row) and cosines are float dot products of those rows,
/// 8 lanes with FMA. A float cosine is within float_cosine_slack(D) of the double one
/// (cosine_exact), so a method decides on the float value only where it is farther than that from
/// its threshold or from a rival, and recomputes in double otherwise: its decisions are the
/// double rule's. The SIMD routines are ISA-neutral (docs/isa.md): the AVX2 + FMA bodies are
/// compiled for that target and chosen at run time by the CPU, as evict/rkv.hpp's dot_f.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/isa.hpp>
#include <kvc/store/merged_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace merge {
/// Not `detail`: a nested merge::detail would hide kvc::detail from the KVC_EXPECTS macros.
namespace similarity {

/// Whether x[0, n) are all finite. The largest magnitude's bits, a loop the compiler vectorises:
/// an element-wise isfinite with its branch was 5% of a D2O step's samples (perf, 2026-12-04), as
/// much as the key gather.
inline bool all_finite(const float* x, std::size_t n) noexcept {
  std::uint32_t top = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t b;
    std::memcpy(&b, x + i, sizeof b);
    top = std::max(top, b & 0x7fffffffu);
  }
  return top < 0x7f800000u;  // below the exponent of inf and NaN
}

/// keys: [kv heads][n_h · head_dim], every element finite; head_dim >= 1.
inline void check_layer_keys(const char* who, const std::vector<std::vector<float>>& keys, std::int32_t head_dim) {
  KVC_EXPECTS_IN(who, head_dim >= 1, "head_dim = ", head_dim, ", expected >= 1");
  const std::size_t D = static_cast<std::size_t>(head_dim);
  for (std::size_t h = 0; h < keys.size(); ++h) {
    const auto& kh = keys[h];
    KVC_EXPECTS_IN(who, kh.size() % D == 0, "keys[", h, "].size() = ", kh.size(),
                   ", expected a multiple of head_dim = ", head_dim);
    if (all_finite(kh.data(), kh.size())) continue;  // only a head with an inf or NaN is walked again
    for (std::size_t i = 0; i < kh.size(); ++i)
      KVC_EXPECTS_IN(who, std::isfinite(kh[i]), "keys[", h, "][", i, "] = ", kh[i], ", expected a finite key");
  }
}

/// check_layer_keys' shape half without throwing: head_dim >= 1, each head a whole number of rows.
inline bool layer_shapes_ok(const std::vector<std::vector<float>>& keys, std::int32_t head_dim) noexcept {
  if (head_dim < 1) return false;
  for (const auto& kh : keys)
    if (kh.size() % static_cast<std::size_t>(head_dim) != 0) return false;
  return true;
}

/// check_token_list's condition without throwing.
inline bool token_list_ok(const std::vector<std::int32_t>& list, std::int64_t n) noexcept {
  for (std::size_t i = 0; i < list.size(); ++i)
    if (list[i] < 0 || list[i] >= n || (i > 0 && list[i] <= list[i - 1])) return false;
  return true;
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

/// cos(x, y) in double exactly as row_norms and cosine compute it (the same sums in the same
/// order), 0 when either key is zero: the reference value the float fast path defers to.
inline double cosine_exact(const float* x, const float* y, std::size_t D) noexcept {
  double qx = 0, qy = 0, dot = 0;
  for (std::size_t d = 0; d < D; ++d) {
    qx += static_cast<double>(x[d]) * x[d];
    qy += static_cast<double>(y[d]) * y[d];
    dot += static_cast<double>(x[d]) * y[d];
  }
  const double den = std::sqrt(qx) * std::sqrt(qy);
  if (!(den > 0)) return 0.0;
  return dot / den;
}

/// Kept rows per tile in D2O's nearest-key search: their normalised rows (kept_tile × 512 B at
/// D = 128) stay in L1/L2 while every evicted row is dotted with them. Measured on d2o_plan
/// halving 4k tokens × 8 heads × 128 (2026-12-04, 2-core Xeon VM with 48 KiB L1d and 2 MiB L2,
/// -march=native, medians of 7, three runs each): 16: 124 ms, 32: 123, 64: 117, 128: 138,
/// 256: 138. At 64 that is 8.6 GFlop in 0.117 s, 74 GFlop/s: ~90% of the AVX2 FMA peak at the
/// nominal 2.6 GHz. (No macro to override it: two TUs with different values would be an ODR
/// violation, docs/isa.md.)
inline constexpr std::size_t kept_tile = 64;

/// Floats per scratch row: head_dim rounded up to the 8 lanes, so the dot loops have no tails.
inline std::size_t padded_dim(std::size_t D) noexcept { return (D + 7) / 8 * 8; }

/// A bound on |float cosine − cosine_exact| for rows of D elements, with a factor 2 to spare.
/// With u = 2^-24 and γ_n = n·u/(1 − n·u): a row's float sum of squares is within γ_D of the
/// true one, so 1/‖x‖ (double square root and division, rounded to float) within γ_D/2 + u, a
/// factor common to the row; the two rows' factors move the cosine by at most γ_D + 2u; rounding
/// each product x_d·(1/‖x‖) adds u per row, 2u; the float dot of rows of norm <= 1 + γ_D adds
/// about γ_D; the double reference's own error is ~D·2^-53. Total <= (2D + 8)·u; twice that is
/// (D + 8)·2^-22: 3.2e-5 at D = 128.
inline double float_cosine_slack(std::size_t D) noexcept { return static_cast<double>(D + 8) * 0x1p-22; }

/// normalize_row's path for a key whose float sum of squares leaves [2^-100, 2^100] (an element
/// near float's range ends: its square overflows, or underflow loses its bits, or 1/‖x‖ is past
/// float's range): the norm and the scaling in double, rounded once to float; a zero key, zeros.
/// false when x has an inf or NaN (the double sum of float squares cannot overflow otherwise).
inline bool normalize_row_wide(const float* x, std::size_t D, float* out) noexcept {
  double q = 0;
  for (std::size_t d = 0; d < D; ++d) q += static_cast<double>(x[d]) * x[d];
  const double inv = q > 0 ? 1.0 / std::sqrt(q) : 0.0;
  for (std::size_t d = 0; d < D; ++d) out[d] = static_cast<float>(x[d] * inv);
  for (std::size_t d = D; d < padded_dim(D); ++d) out[d] = 0.0f;
  return std::isfinite(q);
}

inline bool sum_of_squares_in_range(float s) noexcept { return s >= 0x1p-100f && s <= 0x1p100f; }

/// out[0, Dp) = x · (1/‖x‖) in float, then zeros (Dp = padded_dim(D)); a zero row for a zero
/// key. The sum of squares in float, 8 lanes; normalize_row_wide at float's range ends.
inline bool normalize_row_portable(const float* x, std::size_t D, float* out) noexcept {
  const std::size_t D8 = D / 8 * 8;
  float acc[8] = {};
  for (std::size_t d = 0; d < D8; d += 8)
    for (std::size_t j = 0; j < 8; ++j) acc[j] += x[d + j] * x[d + j];
  float s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
  for (std::size_t d = D8; d < D; ++d) s += x[d] * x[d];
  if (!sum_of_squares_in_range(s)) return normalize_row_wide(x, D, out);
  const float inv = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s)));
  for (std::size_t d = 0; d < D; ++d) out[d] = x[d] * inv;
  for (std::size_t d = D; d < padded_dim(D); ++d) out[d] = 0.0f;
  return true;  // a sum of squares in range: every element finite
}

/// Dot products of an r × s block (r, s <= 4, r·s <= 8) of padded rows: out[i·ldo + j] =
/// a_i · b_j, rows Dp apart. Eight lanes per row pair, summed in a tree.
inline void dot_block_portable(const float* a, std::size_t r, const float* b, std::size_t s, std::size_t Dp,
                               float* out, std::size_t ldo) noexcept {
  for (std::size_t i = 0; i < r; ++i)
    for (std::size_t j = 0; j < s; ++j) {
      const float* x = a + i * Dp;
      const float* y = b + j * Dp;
      float acc[8] = {};
      for (std::size_t d = 0; d < Dp; d += 8)
        for (std::size_t l = 0; l < 8; ++l) acc[l] += x[d + l] * y[d + l];
      out[i * ldo + j] = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    }
}

/// Cosines of r normalised padded rows a (r <= 4, Dp apart) with raw keys k + rows[j]·D, j < nc:
/// out[i·ldo + j], each a float dot with the raw key times 1/‖key‖ (its float sum of squares from
/// the same loads), so a key is read once and never stored: the path for a step that evicts a
/// few tokens, where normalising every kept row into scratch cost more than the dots (D2O
/// evicting one token: see d2o_plan). Same bound as normalised rows (float_cosine_slack: the
/// key's norm and the dot each err as there). A key whose sum of squares leaves normalize_row's
/// range is normalised by normalize_row_wide instead. Returns false when a key has an inf or NaN.
inline bool cosines_raw_portable(const float* a, std::size_t r, const float* k, const std::int32_t* rows,
                                 std::size_t nc, std::size_t D, float* out, std::size_t ldo, float* wide) noexcept {
  const std::size_t D8 = D / 8 * 8, Dp = padded_dim(D);
  bool finite = true;
  for (std::size_t j = 0; j < nc; ++j) {
    const float* x = k + static_cast<std::size_t>(rows[j]) * D;
    float ss[8] = {}, dot[4][8] = {};
    for (std::size_t d = 0; d < D8; d += 8)
      for (std::size_t l = 0; l < 8; ++l) {
        ss[l] += x[d + l] * x[d + l];
        for (std::size_t i = 0; i < r; ++i) dot[i][l] += a[i * Dp + d + l] * x[d + l];
      }
    auto tree = [](const float* v) { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); };
    float s = tree(ss);
    for (std::size_t d = D8; d < D; ++d) s += x[d] * x[d];
    if (!sum_of_squares_in_range(s)) {
      finite &= normalize_row_wide(x, D, wide);
      dot_block_portable(a, r, wide, 1, Dp, out + j, ldo);
      continue;
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s)));
    for (std::size_t i = 0; i < r; ++i) {
      float t = tree(dot[i]);
      for (std::size_t d = D8; d < D; ++d) t += a[i * Dp + d] * x[d];
      out[i * ldo + j] = t * inv;
    }
  }
  return finite;
}

#if KVC_X86_DISPATCH
KVC_TARGET_AVX2 inline float hsum_avx2(__m256 v) noexcept {
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_shuffle_ps(s4, s4, 1));
  return _mm_cvtss_f32(s4);
}

KVC_TARGET_AVX2 inline bool normalize_row_avx2(const float* x, std::size_t D, float* out) noexcept {
  const std::size_t D8 = D / 8 * 8, D32 = D / 32 * 32;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (std::size_t d = 0; d < D32; d += 32) {
    const __m256 x0 = _mm256_loadu_ps(x + d), x1 = _mm256_loadu_ps(x + d + 8);
    const __m256 x2 = _mm256_loadu_ps(x + d + 16), x3 = _mm256_loadu_ps(x + d + 24);
    a0 = _mm256_fmadd_ps(x0, x0, a0);
    a1 = _mm256_fmadd_ps(x1, x1, a1);
    a2 = _mm256_fmadd_ps(x2, x2, a2);
    a3 = _mm256_fmadd_ps(x3, x3, a3);
  }
  for (std::size_t d = D32; d < D8; d += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + d);
    a0 = _mm256_fmadd_ps(x0, x0, a0);
  }
  float s = hsum_avx2(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (std::size_t d = D8; d < D; ++d) s += x[d] * x[d];
  if (!sum_of_squares_in_range(s)) return normalize_row_wide(x, D, out);
  const float inv = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s)));
  /// The scale in float, not x·inv in double rounded once: the double multiply's conversions
  /// (two uops each, on one port) made normalisation 3x the cost of the dot products it feeds
  /// (d2o_plan evicting one token: 2.26 ms of which most was this, 2026-12-04); the float
  /// rounding is within float_cosine_slack's 2u per element.
  const __m256 vi = _mm256_set1_ps(inv);
  for (std::size_t d = 0; d < D8; d += 8) _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_loadu_ps(x + d), vi));
  for (std::size_t d = D8; d < D; ++d) out[d] = x[d] * inv;
  for (std::size_t d = D; d < padded_dim(D); ++d) out[d] = 0.0f;
  return true;  // a sum of squares in range: every element finite
}

/// R × S dot products (R·S <= 8) sharing their loads: R + S loads per R·S FMAs; the R·S
/// accumulators are summed into one vector by a tree of horizontal adds.
template <int R, int S>
KVC_TARGET_AVX2 inline void dot_micro_avx2(const float* a, const float* b, std::size_t Dp, float* out,
                                           std::size_t ldo) noexcept {
  static_assert(R * S <= 8, "one vector of sums");
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (std::size_t d = 0; d < Dp; d += 8) {
    __m256 bv[S];
    for (int j = 0; j < S; ++j) bv[j] = _mm256_loadu_ps(b + static_cast<std::size_t>(j) * Dp + d);
    for (int i = 0; i < R; ++i) {
      const __m256 av = _mm256_loadu_ps(a + static_cast<std::size_t>(i) * Dp + d);
      for (int j = 0; j < S; ++j) acc[i * S + j] = _mm256_fmadd_ps(av, bv[j], acc[i * S + j]);
    }
  }
  // hadd(p, q) = [p0+p1, p2+p3, q0+q1, q2+q3 | p4+p5, p6+p7, q4+q5, q6+q7]: two levels give
  // [Σlo(acc0..3) | Σhi(acc0..3)], likewise acc4..7; the 128-bit halves then add to acc0..7's sums.
  const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
  alignas(32) float t[8];
  _mm256_store_ps(t, sum);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < S; ++j) out[static_cast<std::size_t>(i) * ldo + static_cast<std::size_t>(j)] = t[i * S + j];
}

KVC_TARGET_AVX2 inline void dot_block_avx2(const float* a, std::size_t r, const float* b, std::size_t s,
                                           std::size_t Dp, float* out, std::size_t ldo) noexcept {
  std::size_t j = 0;
  if (r == 1) {  // one evicted row (a D2O step evicting one token): four kept rows per pass
    for (; j + 4 <= s; j += 4) dot_micro_avx2<1, 4>(a, b + j * Dp, Dp, out + j, ldo);
    for (; j < s; ++j) dot_micro_avx2<1, 1>(a, b + j * Dp, Dp, out + j, ldo);
    return;
  }
  for (; j + 2 <= s; j += 2) {
    const float* bj = b + j * Dp;
    if (r == 4) dot_micro_avx2<4, 2>(a, bj, Dp, out + j, ldo);
    else if (r == 3) dot_micro_avx2<3, 2>(a, bj, Dp, out + j, ldo);
    else dot_micro_avx2<2, 2>(a, bj, Dp, out + j, ldo);
  }
  if (j < s) {
    const float* bj = b + j * Dp;
    if (r == 4) dot_micro_avx2<4, 1>(a, bj, Dp, out + j, ldo);
    else if (r == 3) dot_micro_avx2<3, 1>(a, bj, Dp, out + j, ldo);
    else dot_micro_avx2<2, 1>(a, bj, Dp, out + j, ldo);
  }
}

template <int R>
KVC_TARGET_AVX2 inline bool cosines_raw_avx2_r(const float* a, const float* k, const std::int32_t* rows,
                                               std::size_t nc, std::size_t D, float* out, std::size_t ldo,
                                               float* wide) noexcept {
  const std::size_t D8 = D / 8 * 8, D16 = D / 16 * 16, Dp = padded_dim(D);
  bool finite = true;
  for (std::size_t j = 0; j < nc; ++j) {
    const float* x = k + static_cast<std::size_t>(rows[j]) * D;
    // Two chains each (d and d + 8) for the FMA latency.
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), p0[R], p1[R];
    for (int i = 0; i < R; ++i) p0[i] = p1[i] = _mm256_setzero_ps();
    for (std::size_t d = 0; d < D16; d += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + d), x1 = _mm256_loadu_ps(x + d + 8);
      s0 = _mm256_fmadd_ps(x0, x0, s0);
      s1 = _mm256_fmadd_ps(x1, x1, s1);
      for (int i = 0; i < R; ++i) {
        p0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(a + static_cast<std::size_t>(i) * Dp + d), x0, p0[i]);
        p1[i] = _mm256_fmadd_ps(_mm256_loadu_ps(a + static_cast<std::size_t>(i) * Dp + d + 8), x1, p1[i]);
      }
    }
    if (D16 < D8) {
      const __m256 x0 = _mm256_loadu_ps(x + D16);
      s0 = _mm256_fmadd_ps(x0, x0, s0);
      for (int i = 0; i < R; ++i)
        p0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(a + static_cast<std::size_t>(i) * Dp + D16), x0, p0[i]);
    }
    float s = hsum_avx2(_mm256_add_ps(s0, s1));
    for (std::size_t d = D8; d < D; ++d) s += x[d] * x[d];
    if (!sum_of_squares_in_range(s)) {
      finite &= normalize_row_wide(x, D, wide);
      dot_block_portable(a, R, wide, 1, Dp, out + j, ldo);
      continue;
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s)));
    for (int i = 0; i < R; ++i) {
      float t = hsum_avx2(_mm256_add_ps(p0[i], p1[i]));
      for (std::size_t d = D8; d < D; ++d) t += a[static_cast<std::size_t>(i) * Dp + d] * x[d];
      out[static_cast<std::size_t>(i) * ldo + j] = t * inv;
    }
  }
  return finite;
}

KVC_TARGET_AVX2 inline float max_avx2(const float* x, std::size_t n) noexcept {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  float r = t[0];
  for (int l = 1; l < 8; ++l) r = std::max(r, t[l]);
  for (; i < n; ++i) r = std::max(r, x[i]);
  return r;
}
#endif

/// normalize_row_portable's result (AVX2 + FMA where the CPU has it). Returns false when x has
/// an inf or NaN (then out is not a row): the finiteness check comes with the normalisation, so
/// a plan that normalises every key need not read them twice.
inline bool normalize_row(const float* x, std::size_t D, float* out) noexcept {
#if KVC_X86_DISPATCH
  if (kvc::detail::cpu_has_avx2_fma_f16c()) return normalize_row_avx2(x, D, out);
#endif
  return normalize_row_portable(x, D, out);
}

/// out[i·ldo + j] = a_i · b_j for i < na, j < nb: padded rows (padded_dim), Dp apart.
inline void dot_tile(const float* a, std::size_t na, const float* b, std::size_t nb, std::size_t Dp, float* out,
                     std::size_t ldo) noexcept {
#if KVC_X86_DISPATCH
  if (kvc::detail::cpu_has_avx2_fma_f16c()) {
    for (std::size_t i = 0; i < na; i += 4)
      dot_block_avx2(a + i * Dp, std::min<std::size_t>(4, na - i), b, nb, Dp, out + i * ldo, ldo);
    return;
  }
#endif
  for (std::size_t i = 0; i < na; i += 4)
    for (std::size_t j = 0; j < nb; j += 2)
      dot_block_portable(a + i * Dp, std::min<std::size_t>(4, na - i), b + j * Dp, std::min<std::size_t>(2, nb - j),
                         Dp, out + i * ldo + j, ldo);
}

/// cosines_raw_portable's result (AVX2 + FMA where the CPU has it); wide: Dp floats of scratch.
inline bool cosines_raw(const float* a, std::size_t r, const float* k, const std::int32_t* rows, std::size_t nc,
                        std::size_t D, float* out, std::size_t ldo, float* wide) noexcept {
#if KVC_X86_DISPATCH
  if (kvc::detail::cpu_has_avx2_fma_f16c()) {
    switch (r) {
      case 1: return cosines_raw_avx2_r<1>(a, k, rows, nc, D, out, ldo, wide);
      case 2: return cosines_raw_avx2_r<2>(a, k, rows, nc, D, out, ldo, wide);
      case 3: return cosines_raw_avx2_r<3>(a, k, rows, nc, D, out, ldo, wide);
      default: return cosines_raw_avx2_r<4>(a, k, rows, nc, D, out, ldo, wide);
    }
  }
#endif
  return cosines_raw_portable(a, r, k, rows, nc, D, out, ldo, wide);
}

/// The largest of x[0, n), -inf for n = 0 (no NaN in x).
inline float max_of(const float* x, std::size_t n) noexcept {
#if KVC_X86_DISPATCH
  if (kvc::detail::cpu_has_avx2_fma_f16c()) return max_avx2(x, n);
#endif
  float r = -std::numeric_limits<float>::infinity();
  for (std::size_t i = 0; i < n; ++i) r = std::max(r, x[i]);
  return r;
}

/// layer_keys' result in a buffer of this thread's, reused by the next call: valid until the
/// thread's next call. Why: layer_keys returns fresh vectors, and at 4k tokens × 8 heads × 128
/// each step then takes 16 MB of new memory, which the allocator may have returned to the kernel
/// (faulted in and zeroed again, then zeroed by resize, then written). A D2O step evicting one
/// token in per-step use (bench_merge BM_merge_loop, 2026-12-04, paired, medians of 3 runs):
/// 2.26 ms reused against 2.66 ms fresh (a decode step: 1.05 ms); in a harness where the freed
/// memory went back to the kernel every step, 2.05 against 5.0 ms. On a freshly built cache the
/// reused buffer is cold and gains nothing (BM_merge_step: 3.73 against 3.71 ms). The cost: the
/// largest layer's keys stay allocated per thread that ran a step (16 MB here; 128 MB at 32k).
template <class Store>
const std::vector<std::vector<float>>& layer_keys_reused(const basic_merged_cache<Store>& cache, seq_id s, std::int32_t layer) {
  thread_local std::vector<std::vector<float>> keys;
  const std::int32_t H = cache.config().num_kv_heads, D = cache.config().head_dim;
  keys.resize(static_cast<std::size_t>(H));
  for (std::int32_t h = 0; h < H; ++h) {
    auto& kh = keys[static_cast<std::size_t>(h)];
    kh.resize(static_cast<std::size_t>(cache.length(s, layer, h)) * static_cast<std::size_t>(D));
    cache.cache().gather(s, layer, h, kh.data());
  }
  return keys;
}

}  // namespace similarity
}  // namespace merge
KVC_END_NAMESPACE
