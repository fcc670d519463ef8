// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `nuq<Bits, Group, Residual>`: KVQuant's non-uniform datatypes for keys, on KIVI's layout. Keys
/// are quantized per channel over groups of Group tokens as in KIVI, but the 2^Bits levels are not
/// evenly spaced: each channel is normalised into [0, 1] by its minimum and range over the group
/// (binary16, rounded outwards), and the group's Group x head_dim normalised values choose the
/// record's 2^Bits levels by weighted k-means. Values are KIVI's (per token, groups of Group
/// channels, uniform): a codebook per one-token value record would cost 2^Bits bytes per token.
///
/// Key record: [Group rows of D*Bits/8 codes][range binary16 x D][minimum binary16 x D]
/// [2^Bits level bytes]; x^ = min + range * level[c] / 255, the levels sorted ascending.
///
/// How the levels are fitted (what differs from the paper, and why):
/// - KVQuant fits one datatype per layer offline, on calibration data, weighting each value by its
///   Fisher information (squared gradients). A cache has neither calibration data nor gradients,
///   so kvc fits the levels per record, on the values the record holds (the prompt's groups at
///   prefill, each later group as it fills), and weights each value by its channel's range
///   squared: the fit then minimises the squared error of the keys themselves, not of their
///   normalised forms.
/// - The levels are the exact optimum of the weighted 1-D k-means over a 256-bin histogram of the
///   normalised values (channel_nuq::fit), so only the binning and the levels' 8-bit storage
///   separate them from the optimum over the values themselves; tests/quant/test_nuq.cpp holds
///   them to that optimum, computed in double over the raw values.
/// Where it helps (docs/results.md, "KVQuant's non-uniform key levels at 4k", SmolLM2-135M): 2-bit
/// keys lose 7.8 +- 1.6% less perplexity than KIVI's uniform ones; at 3 bits, no difference.
/// \par Reference
/// Hooper et al., "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache
/// Quantization", arXiv:2401.18079 (NUQ datatypes, sensitivity-weighted k-means); the layout is
/// KIVI's (Liu et al., arXiv:2402.02750).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include <kvc/quant/codec.hpp>

KVC_BEGIN_NAMESPACE
namespace quant {
namespace detail {

/// Keys per channel over G tokens with a fitted codebook of 2^Bits levels per record.
template <int Bits, int G>
struct channel_nuq {
  static_assert(Bits == 2 || Bits == 3 || Bits == 4,
                "kvc::quant::nuq<Bits>: Bits must be 2, 3 or 4 (a codebook of 2^Bits levels; 8 bits is uniform enough)");
  static_assert(G >= 2, "kvc::quant::nuq<Bits, Group>: per-channel groups need at least 2 tokens");
  static constexpr int levels = 1 << Bits;
  /// Histogram bins of the fit: the levels are stored to 1/255, so finer bins change nothing kept.
  static constexpr int bins = 256;

  static std::size_t row_bytes(int D) noexcept { return static_cast<std::size_t>(D) * Bits / 8; }
  static std::size_t code_bytes(int D) noexcept { return row_bytes(D) * G; }
  static std::size_t record_bytes(int D) noexcept {
    return code_bytes(D) + static_cast<std::size_t>(D) * 4 + static_cast<std::size_t>(levels);
  }
  static void check(int D, const char* who) {
    KVC_EXPECTS(D > 0, who, ": head_dim = ", D, ", expected > 0");
    KVC_EXPECTS(D % pack_unit<Bits> == 0, who, ": head_dim = ", D, ", expected a multiple of ", pack_unit<Bits>,
                " for ", Bits, "-bit packing");
    KVC_EXPECTS(D <= 1024, who, ": head_dim = ", D, ", expected <= 1024");
  }
  static const half* ranges(const std::byte* rec, int D) noexcept { return reinterpret_cast<const half*>(rec + code_bytes(D)); }
  static const half* minima(const std::byte* rec, int D) noexcept { return ranges(rec, D) + D; }
  static const std::uint8_t* level_bytes(const std::byte* rec, int D) noexcept {
    return reinterpret_cast<const std::uint8_t*>(rec + code_bytes(D) + static_cast<std::size_t>(D) * 4);
  }

  /// The optimal levels of the weighted histogram (w, wu, wu2: weight, weighted sum and weighted
  /// sum of squares of the values in each bin) into c[levels], ascending: the exact 1-D weighted
  /// k-means over the bins (a bin goes whole to one level), by dynamic programming over runs of
  /// consecutive bins with the divide-and-conquer optimisation (the best split moves right with
  /// the run's end, as it does for any cost with the quadrangle inequality, which k-means' has):
  /// O(levels * bins * log bins) per record. Why not Lloyd's algorithm: from the uniform grid it
  /// stopped in local optima 3-4x above this on records whose few wide channels carry the weight
  /// (tests/quant/test_nuq.cpp).
  static void fit(const double* w, const double* wu, const double* wu2, double* c) noexcept {
    double W[bins + 1], S[bins + 1], Q[bins + 1];
    int n = 0;  // atoms: the bins that hold values
    W[0] = S[0] = Q[0] = 0;
    for (int b = 0; b < bins; ++b)
      if (w[b] > 0) {
        W[n + 1] = W[n] + w[b];
        S[n + 1] = S[n] + wu[b];
        Q[n + 1] = Q[n] + wu2[b];
        ++n;
      }
    if (n == 0) {
      for (int j = 0; j < levels; ++j) c[j] = static_cast<double>(j) / (levels - 1);
      return;
    }
    auto mean = [&](int a, int b) { return (S[b] - S[a]) / (W[b] - W[a]); };
    if (n <= levels) {  // a level per atom; the rest repeat the last
      for (int j = 0; j < levels; ++j) c[j] = mean(std::min(j, n - 1), std::min(j, n - 1) + 1);
      return;
    }
    auto cost = [&](int a, int b) {  // atoms [a, b)
      const double s = S[b] - S[a];
      return std::max(0.0, Q[b] - Q[a] - s * s / (W[b] - W[a]));
    };
    // dp[k][j]: the least cost of atoms [0, j) in k + 1 runs; from[k][j]: where its last run starts
    double dp[levels][bins + 1];
    std::int16_t from[levels][bins + 1];
    for (int j = 1; j <= n; ++j) dp[0][j] = cost(0, j), from[0][j] = 0;
    struct frame {
      int jlo, jhi, ilo, ihi;
    };
    for (int k = 1; k < levels; ++k) {
      frame stack[2 * 10 + 4];  // depth <= log2(bins) + 1 per side
      int top = 0;
      stack[top++] = {k + 1, n, k, n - 1};
      while (top > 0) {
        const frame f = stack[--top];
        if (f.jlo > f.jhi) continue;
        const int j = (f.jlo + f.jhi) / 2;
        double best = INFINITY;
        int arg = f.ilo;
        for (int i = f.ilo; i <= std::min(f.ihi, j - 1); ++i) {
          const double v = dp[k - 1][i] + cost(i, j);
          if (v < best) best = v, arg = i;
        }
        dp[k][j] = best;
        from[k][j] = static_cast<std::int16_t>(arg);
        stack[top++] = {f.jlo, j - 1, f.ilo, arg};
        stack[top++] = {j + 1, f.jhi, arg, f.ihi};
      }
    }
    int j = n;
    for (int k = levels - 1; k >= 0; --k) {
      const int i = k == 0 ? 0 : from[k][j];
      c[k] = mean(i, j);
      j = i;
    }
  }

  /// x: [G][D]. The levels are refitted to whatever the record holds, so the survivors of a
  /// compaction, re-encoded, get levels of their own.
  static void encode(const float* x, int D, std::byte* rec) noexcept {
    std::uint8_t* codes = reinterpret_cast<std::uint8_t*>(rec);
    std::memset(codes, 0, code_bytes(D));
    half* rh = reinterpret_cast<half*>(rec + code_bytes(D));
    half* mh = rh + D;
    std::uint8_t* lv = reinterpret_cast<std::uint8_t*>(rec + code_bytes(D) + static_cast<std::size_t>(D) * 4);
    float r[1024], z[1024], inv[1024];
    double w[bins] = {}, wu[bins] = {}, wu2[bins] = {};
    for (int d = 0; d < D; ++d) {
      float lo = x[d], hi = x[d];
      for (int t = 1; t < G; ++t) {
        lo = std::min(lo, x[static_cast<std::size_t>(t) * D + d]);
        hi = std::max(hi, x[static_cast<std::size_t>(t) * D + d]);
      }
      const half zh = half_down(lo), rg = half_up(hi - static_cast<float>(zh));
      std::memcpy(mh + d, &zh, 2);
      std::memcpy(rh + d, &rg, 2);
      z[d] = static_cast<float>(zh);
      r[d] = static_cast<float>(rg);
      inv[d] = r[d] > 0.0f ? 1.0f / r[d] : 0.0f;  // range 0: every value is the minimum
      const double wd = static_cast<double>(r[d]) * r[d];
      if (wd <= 0) continue;
      for (int t = 0; t < G; ++t) {
        const float u = std::min(std::max((x[static_cast<std::size_t>(t) * D + d] - z[d]) * inv[d], 0.0f), 1.0f);
        const int b = std::min(bins - 1, static_cast<int>(u * bins));
        w[b] += wd;
        wu[b] += wd * u;
        wu2[b] += wd * u * u;
      }
    }
    double c[levels];
    fit(w, wu, wu2, c);
    float lf[levels], mid[levels - 1];
    for (int j = 0; j < levels; ++j) lv[j] = static_cast<std::uint8_t>(std::lround(std::min(std::max(c[j], 0.0), 1.0) * 255.0));
    std::sort(lv, lv + levels);
    for (int j = 0; j < levels; ++j) lf[j] = static_cast<float>(lv[j]) / 255.0f;
    for (int j = 0; j + 1 < levels; ++j) mid[j] = 0.5f * (lf[j] + lf[j + 1]);
    for (int t = 0; t < G; ++t) {
      std::uint8_t* row = codes + row_bytes(D) * t;
      for (int d = 0; d < D; ++d) {
        if (inv[d] == 0.0f) continue;  // code 0; decode adds range 0
        const float u = (x[static_cast<std::size_t>(t) * D + d] - z[d]) * inv[d];
        unsigned k = 0;
        while (k + 1 < static_cast<unsigned>(levels) && u >= mid[k]) ++k;  // the nearest level (ties go up)
        or_code<Bits>(row, d, k);
      }
    }
  }

#if KVC_X86_DISPATCH
  /// decode_token's first D - D % 16 channels: the codes index a byte table of the levels
  /// (pshufb), then min + (range / 255) * level.
  KVC_TARGET_AVX2 static int decode_token_avx2(const std::uint8_t* row, int D, const half* r, const half* z,
                                               const std::uint8_t* lv, float* out) noexcept {
    alignas(16) std::uint8_t tb[16] = {};
    std::memcpy(tb, lv, levels);
    const __m128i table = _mm_load_si128(reinterpret_cast<const __m128i*>(tb));
    const __m256 k = _mm256_set1_ps(1.0f / 255.0f);
    int d = 0;
    for (; d + 16 <= D; d += 16) {
      const __m128i l = _mm_shuffle_epi8(table, unpack16<Bits>(row + d * Bits / 8));
      const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(l));
      const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(l, 8)));
      const __m256 r0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + d)));
      const __m256 r1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + d + 8)));
      const __m256 z0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + d)));
      const __m256 z1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + d + 8)));
      _mm256_storeu_ps(out + d, _mm256_fmadd_ps(f0, _mm256_mul_ps(r0, k), z0));
      _mm256_storeu_ps(out + d + 8, _mm256_fmadd_ps(f1, _mm256_mul_ps(r1, k), z1));
    }
    return d;
  }
#endif

  /// Token i of the record into out[D].
  static void decode_token(const std::byte* rec, int D, int i, float* out) noexcept {
    const std::uint8_t* row = reinterpret_cast<const std::uint8_t*>(rec) + row_bytes(D) * i;
    const half* r = ranges(rec, D);
    const half* z = minima(rec, D);
    const std::uint8_t* lv = level_bytes(rec, D);
    int d = 0;
#if KVC_X86_DISPATCH
    if (kvc::detail::cpu_has_avx2_fma_f16c()) d = decode_token_avx2(row, D, r, z, lv, out);
#endif
    for (; d < D; ++d) {
      half rh, zh;
      std::memcpy(&rh, r + d, 2);
      std::memcpy(&zh, z + d, 2);
      out[d] = static_cast<float>(lv[unpack_code<Bits>(row, d)]) * (static_cast<float>(rh) * (1.0f / 255.0f)) +
               static_cast<float>(zh);
    }
  }
  static void decode(const std::byte* rec, int D, float* out) noexcept {
    for (int t = 0; t < G; ++t) decode_token(rec, D, t, out + static_cast<std::size_t>(t) * D);
  }
};

}  // namespace detail

/// \tparam Bits      2, 3 or 4 (KVQuant evaluates nuq2, nuq3 and nuq4)
/// \tparam Group     tokens per key group and channels per value group (a multiple of 8; of 16 at 3 bits)
/// \tparam Residual  full-precision window in tokens, a multiple of Group; a runtime value may
///                   replace it through the `residual_tokens` member
template <int Bits, int Group = 32, int Residual = 128>
struct nuq : detail::grouped_key_codec<detail::channel_nuq<Bits, Group>,
                                       detail::token_affine<Bits, scheme::asymmetric, Group>, Group, Residual> {
  static_assert(Group >= 8 && Group % 8 == 0, "kvc::quant::nuq<Bits, Group>: Group must be a multiple of 8");
  static_assert(Bits != 3 || Group % 16 == 0,
                "kvc::quant::nuq<3, Group>: Group must be a multiple of 16 (3-bit codes are packed in blocks of 16 channels)");
  static_assert(Residual >= 0 && Residual % Group == 0,
                "kvc::quant::nuq<Bits, Group, Residual>: Residual must be a multiple of Group");
  static constexpr int bits = Bits;

  nuq() = default;
  explicit nuq(std::int32_t residual) {
    this->residual_tokens = residual;
    check(Group);
  }

  void check(int D) const { this->check_as(D, "kvc::quant::nuq"); }
  static const char* name() noexcept { return Bits == 2 ? "nuq2" : Bits == 3 ? "nuq3" : "nuq4"; }
};

}  // namespace quant
KVC_END_NAMESPACE
