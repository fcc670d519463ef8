// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `gear<Bits, Group>`: GEAR's three-part approximation of K and V, one record per Group tokens:
///
///     X  ~=  Q(X_d)  +  A B^T  +  S          (X: Group x head_dim)
///
///  1. the largest-magnitude `outliers` fraction of the record's entries are taken out (X_d is X
///     with them clamped into the range of the others) and the rest is quantized per token,
///     asymmetric min/max, to Bits bits (Q);
///  2. the quantization residual R = X_d - Q(X_d) is approximated by a rank-`rank` product
///     A B^T (A: Group x r, B: head_dim x r, both binary16), the truncated SVD of R computed with
///     Eigen from the Group x Group Gram matrix R R^T (so nothing scales with head_dim^2);
///  3. the outlier entries store, as binary16 with a 16-bit index, the *additive* correction
///     S = X - Q(X_d) - A B^T at their positions, so the three parts simply add up.
///
/// Every part lives in the record, so the quant pool's bytes count codes, scales, zeros, both
/// low-rank factors and the sparse entries: record_bytes = Group * (D*Bits/8 + 4) + 2r(Group + D)
/// + 4 * ceil(outliers * Group * D). Works with kvc::quant_cache and the fused decode attention of
/// <kvc/cpu/quant_attention.hpp> (tiles are reconstructed in L1 scratch); `gear::scores` /
/// `gear::accumulate` evaluate q.(Q + A B^T + S) and p^T(Q + A B^T + S) of one record with the
/// low-rank term factored ((q.B) then A, and (A^T p) then B), and cpu::gear_decode_attention
/// (<kvc/cpu/gear_attention.hpp>) runs decode attention on them without reconstructing the
/// low-rank term per token.
///
/// Published defaults: 4-bit codes ("near-lossless 4-bit KV"), s = 2% outliers (GEAR's default),
/// rank 4 (GEAR sizes r as a few percent of min(n, d); 4 here per record), groups of 32 tokens
/// (GEAR's streaming buffer: tokens wait in full precision in the quant_cache's residual window
/// until a whole group is there).
/// Differences from the paper: GEAR quantizes the backbone KIVI/KCVT-style (per-channel keys);
/// here both K and V are per-token asymmetric. GEAR takes the top-r singular pairs by one step of
/// power iteration over the whole matrix; here the exact truncated SVD of each record's residual.
/// GEAR stores its outliers (the largest s/2 positive and s/2 negative entries) with int32
/// indices; here the s largest magnitudes with 16-bit indices into the record.
/// \par Reference
/// Kang et al., "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative
/// Inference of LLM", arXiv:2403.05527.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>

#include <vector>

#include <Eigen/Core>
#include <Eigen/Eigenvalues>

#include <kvc/numeric/half.hpp>
#include <kvc/quant/codec.hpp>

KVC_BEGIN_NAMESPACE
namespace quant {

/// \tparam Bits   2, 4 or 8 bits per code of the dense part
/// \tparam Group  tokens per record (2..64); quant_cache pages must hold whole groups
/// Threads: a stateless codec: any use from any thread; its caches follow quant_cache (docs/threading.md).
template <int Bits = 4, int Group = 32>
struct gear : codec_base {
  static_assert(Bits == 2 || Bits == 4 || Bits == 8, "kvc::quant::gear<Bits>: Bits must be 2, 4 or 8");
  static_assert(Group >= 2 && Group <= 64, "kvc::quant::gear<Bits, Group>: Group must be 2..64 tokens");
  using dense = detail::token_affine<Bits, scheme::asymmetric, 0>;
  static constexpr int bits = Bits;
  static constexpr int group_size = Group;
  /// Largest record (Group * head_dim entries) encode handles with stack buffers.
  static constexpr int max_entries = 8192;

  std::int32_t rank = 4;     ///< GEAR: r = 4
  float outliers = 0.02f;    ///< GEAR: s = 2% of the entries
  std::int32_t residual_tokens = 0;

  gear() = default;
  explicit gear(std::int32_t r, float s = 0.02f, std::int32_t residual = 0)
      : rank(r), outliers(s), residual_tokens(residual) {}

  static constexpr int tokens_per_record(role) noexcept { return Group; }
  /// Sparse entries per record.
  int capacity(int D) const noexcept {
    return static_cast<int>(std::ceil(static_cast<double>(outliers) * Group * D - 1e-9));
  }
  static std::size_t dense_bytes(int D) noexcept { return dense::record_bytes(D) * Group; }
  std::size_t a_offset(int D) const noexcept { return dense_bytes(D); }
  std::size_t b_offset(int D) const noexcept { return a_offset(D) + static_cast<std::size_t>(Group) * rank * 2; }
  std::size_t s_offset(int D) const noexcept { return b_offset(D) + static_cast<std::size_t>(D) * rank * 2; }
  std::size_t record_bytes(role, int D) const noexcept {
    return s_offset(D) + static_cast<std::size_t>(capacity(D)) * 4;
  }
  std::int32_t residual() const noexcept { return residual_tokens; }
  void check(int D) const {
    KVC_EXPECTS(rank >= 0 && rank <= Group, "kvc::quant::gear: rank = ", rank, ", expected 0..", Group,
                " (the group size; GEAR uses 4)");
    KVC_EXPECTS(outliers >= 0.0f && outliers <= 0.5f, "kvc::quant::gear: outliers = ", outliers,
                ", expected 0..0.5 (GEAR uses 0.02)");
    KVC_EXPECTS(residual_tokens >= 0 && residual_tokens % Group == 0, "kvc::quant::gear: residual = ", residual_tokens,
                ", expected a non-negative multiple of the group size ", Group);
    KVC_EXPECTS(static_cast<long>(Group) * D <= max_entries, "kvc::quant::gear: head_dim = ", D, ", expected Group * head_dim <= ",
                max_entries, " (Group = ", Group, ")");
    dense::check(D, "kvc::quant::gear");
  }

  // ---- record access ---------------------------------------------------------------------

  const half* factor_a(const std::byte* rec, int D) const noexcept {
    return reinterpret_cast<const half*>(rec + a_offset(D));
  }
  const half* factor_b(const std::byte* rec, int D) const noexcept {
    return reinterpret_cast<const half*>(rec + b_offset(D));
  }
  /// Sparse entry i: flat index (token * D + channel) and value.
  void sparse(const std::byte* rec, int D, int i, std::uint16_t& idx, float& val) const noexcept {
    const std::byte* sp = rec + s_offset(D) + 4 * static_cast<std::size_t>(i);
    half h;
    std::memcpy(&idx, sp, 2);
    std::memcpy(&h, sp + 2, 2);
    val = static_cast<float>(h);
  }

  // ---- codec -------------------------------------------------------------------------------

  /// x: [Group][D], model domain.
  template <role R>
  void encode(const float* x, int D, std::byte* rec) const noexcept {
    const int n = Group * D, k = capacity(D), r = rank;
    if (n > max_entries) std::abort();  // check() bounds it
    float xd[max_entries], deq[max_entries];
    std::uint16_t idx[max_entries];
    // 1. outliers: the k largest magnitudes (ties: the lower index)
    std::iota(idx, idx + n, std::uint16_t{0});
    if (k > 0)
      std::partial_sort(idx, idx + k, idx + n, [&](std::uint16_t a, std::uint16_t b) {
        return std::fabs(x[a]) > std::fabs(x[b]) || (std::fabs(x[a]) == std::fabs(x[b]) && a < b);
      });
    std::memcpy(xd, x, sizeof(float) * static_cast<std::size_t>(n));
    if (k > 0 && k < n) {
      float lo = INFINITY, hi = -INFINITY;
      for (int i = k; i < n; ++i) {
        lo = std::min(lo, x[idx[i]]);
        hi = std::max(hi, x[idx[i]]);
      }
      for (int i = 0; i < k; ++i) xd[idx[i]] = std::min(std::max(xd[idx[i]], lo), hi);
    }
    // 2. per-token quantization of the dense part
    const std::size_t rb = dense::record_bytes(D);
    for (int t = 0; t < Group; ++t) {
      dense::encode(xd + static_cast<std::size_t>(t) * D, D, rec + rb * t);
      dense::decode(rec + rb * t, D, deq + static_cast<std::size_t>(t) * D);
    }
    // 3. rank-r approximation of the residual R = X_d - Q(X_d) from the Gram matrix R R^T
    half* A = reinterpret_cast<half*>(rec + a_offset(D));
    half* B = reinterpret_cast<half*>(rec + b_offset(D));
    if (r > 0) {
      using gram_t = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, 0, Group, Group>;
      gram_t M(Group, Group);
      for (int i = 0; i < Group; ++i)
        for (int j = 0; j <= i; ++j) {
          double s = 0;
          for (int d = 0; d < D; ++d) {
            const std::size_t a = static_cast<std::size_t>(i) * D + d, b = static_cast<std::size_t>(j) * D + d;
            s += static_cast<double>(xd[a] - deq[a]) * static_cast<double>(xd[b] - deq[b]);
          }
          M(i, j) = M(j, i) = s;
        }
      Eigen::SelfAdjointEigenSolver<gram_t> es(M);  // ascending eigenvalues
      for (int c = 0; c < r; ++c) {
        const int col = Group - 1 - c;
        float u[Group];
        for (int i = 0; i < Group; ++i) {
          u[i] = static_cast<float>(es.eigenvectors()(i, col));
          A[static_cast<std::size_t>(i) * r + c] = half(u[i]);
        }
        // B[:, c] = R^T u, with u as stored (binary16), so A B^T is the projection onto the stored A
        for (int d = 0; d < D; ++d) {
          double s = 0;
          for (int i = 0; i < Group; ++i) {
            const std::size_t a = static_cast<std::size_t>(i) * D + d;
            s += static_cast<double>(static_cast<float>(A[static_cast<std::size_t>(i) * r + c])) * (xd[a] - deq[a]);
          }
          B[static_cast<std::size_t>(d) * r + c] = half(static_cast<float>(s));
        }
      }
    }
    // 4. sparse additive corrections at the outliers: S = X - (Q + A B^T), exactly as decode sums
    std::byte* sp = rec + s_offset(D);
    for (int i = 0; i < k; ++i) {
      const int t = idx[i] / D, d = idx[i] % D;
      const float approx = deq[idx[i]] + low_rank_entry(A, B, r, t, d);
      const half h(x[idx[i]] - approx);
      std::memcpy(sp + 4 * i, &idx[i], 2);
      std::memcpy(sp + 4 * i + 2, &h, 2);
    }
  }

  template <role R>
  void decode(const std::byte* rec, int D, float* out) const noexcept {
    for (int t = 0; t < Group; ++t) decode_token<R>(rec, D, t, out + static_cast<std::size_t>(t) * D);
  }

  template <role R>
  void decode_token(const std::byte* rec, int D, int t, float* out) const noexcept {
    dense::decode(rec + dense::record_bytes(D) * t, D, out);
    const half* A = factor_a(rec, D);
    const half* B = factor_b(rec, D);
    for (int d = 0; d < D; ++d) out[d] += low_rank_entry(A, B, rank, t, d);
    for (int i = 0; i < capacity(D); ++i) {
      std::uint16_t j;
      float v;
      sparse(rec, D, i, j, v);
      if (j / D == t) out[j % D] += v;
    }
  }

  /// (A B^T)[t][d] with the factors as stored; the one summation order encode and decode share.
  static float low_rank_entry(const half* A, const half* B, int r, int t, int d) noexcept {
    float s = 0.0f;
    for (int c = 0; c < r; ++c)
      s += static_cast<float>(A[static_cast<std::size_t>(t) * r + c]) * static_cast<float>(B[static_cast<std::size_t>(d) * r + c]);
    return s;
  }

  // ---- factored attention primitives ------------------------------------------------------

  /// scores[t] = q . X^_t for the record's Group tokens, with the low-rank term as (q.B) A^T:
  /// D*Group (dense) + D*r + Group*r (low rank) + one term per sparse entry.
  void scores(const std::byte* rec, int D, const float* q, float* scores_out) const noexcept {
    float row[1024];
    const std::size_t rb = dense::record_bytes(D);
    for (int t = 0; t < Group; ++t) {
      dense::decode(rec + rb * t, D, row);
      float s = 0.0f;
      for (int d = 0; d < D; ++d) s += q[d] * row[d];
      scores_out[t] = s;
    }
    const half* A = factor_a(rec, D);
    const half* B = factor_b(rec, D);
    float qb[Group];
    for (int c = 0; c < rank; ++c) {
      float s = 0.0f;
      for (int d = 0; d < D; ++d) s += q[d] * static_cast<float>(B[static_cast<std::size_t>(d) * rank + c]);
      qb[c] = s;
    }
    for (int t = 0; t < Group; ++t) {
      float s = 0.0f;
      for (int c = 0; c < rank; ++c) s += static_cast<float>(A[static_cast<std::size_t>(t) * rank + c]) * qb[c];
      scores_out[t] += s;
    }
    for (int i = 0; i < capacity(D); ++i) {
      std::uint16_t j;
      float v;
      sparse(rec, D, i, j, v);
      scores_out[j / D] += q[j % D] * v;
    }
  }

  /// acc[d] += sum_t p[t] X^_t[d] for the record's tokens, with the low-rank term as B (A^T p).
  void accumulate(const std::byte* rec, int D, const float* p, float* acc) const noexcept {
    float row[1024];
    const std::size_t rb = dense::record_bytes(D);
    for (int t = 0; t < Group; ++t) {
      if (p[t] == 0.0f) continue;
      dense::decode(rec + rb * t, D, row);
      for (int d = 0; d < D; ++d) acc[d] += p[t] * row[d];
    }
    const half* A = factor_a(rec, D);
    const half* B = factor_b(rec, D);
    float ap[Group];
    for (int c = 0; c < rank; ++c) {
      float s = 0.0f;
      for (int t = 0; t < Group; ++t) s += static_cast<float>(A[static_cast<std::size_t>(t) * rank + c]) * p[t];
      ap[c] = s;
    }
    for (int d = 0; d < D; ++d) {
      float s = 0.0f;
      for (int c = 0; c < rank; ++c) s += static_cast<float>(B[static_cast<std::size_t>(d) * rank + c]) * ap[c];
      acc[d] += s;
    }
    for (int i = 0; i < capacity(D); ++i) {
      std::uint16_t j;
      float v;
      sparse(rec, D, i, j, v);
      acc[j % D] += p[j / D] * v;
    }
  }

  static const char* name() noexcept { return Bits == 2 ? "gear2" : Bits == 4 ? "gear4" : "gear8"; }
};

}  // namespace quant
KVC_END_NAMESPACE
