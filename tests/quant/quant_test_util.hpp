// SPDX-License-Identifier: Apache-2.0
#pragma once
// Shared helpers of the quant tests: random inputs, key-like inputs and the dense reference.

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <kvc/attention/reference.hpp>
#include <kvc/view/engine.hpp>
#include <kvc/view/heads.hpp>

namespace qtest {

inline std::vector<float> randn(std::size_t n, std::uint32_t seed, float sd = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

/// Keys shaped like real ones: a few channels 10-50x larger than the rest ([n][H][D]).
inline std::vector<float> keylike(std::size_t n, int H, int D, std::uint32_t seed) {
  auto v = randn(n * H * D, seed);
  std::mt19937 rng(seed + 7);
  for (int h = 0; h < H; ++h) {
    int outl[4];
    float mag[4];
    for (int j = 0; j < 4; ++j) {
      outl[j] = static_cast<int>(rng() % D);
      mag[j] = 10.0f + static_cast<float>(rng() % 41);
    }
    for (std::size_t t = 0; t < n; ++t)
      for (int j = 0; j < 4; ++j) {
        float& x = v[(t * H + h) * D + outl[j]];
        x = mag[j] * (1.0f + 0.1f * x);  // large, mostly one sign, like Llama's outlier channels
      }
  }
  return v;
}

/// Dense double-precision reference over gathered float K/V per head ([n_h][D] each).
inline void reference_attention(const std::vector<std::vector<float>>& K, const std::vector<std::vector<float>>& V,
                                int D, const float* q, int num_q_heads, float* out, float scale = 0.0f,
                                float* lse = nullptr) {
  const int hkv = static_cast<int>(K.size());
  const int G = num_q_heads / hkv;
  const double sc = scale != 0.0f ? scale : 1.0 / std::sqrt(static_cast<double>(D));
  for (int h = 0; h < hkv; ++h) {
    const int n = static_cast<int>(K[h].size() / D);
    for (int g = 0; g < G; ++g) {
      const int qh = h * G + g;
      std::vector<double> s(n);
      double mx = -INFINITY;
      for (int t = 0; t < n; ++t) {
        double a = 0;
        for (int d = 0; d < D; ++d) a += double(q[qh * D + d]) * K[h][t * D + d];
        s[t] = a * sc;
        mx = std::max(mx, s[t]);
      }
      double sum = 0;
      for (int t = 0; t < n; ++t) sum += std::exp(s[t] - mx);
      for (int d = 0; d < D; ++d) {
        double a = 0;
        for (int t = 0; t < n; ++t) a += std::exp(s[t] - mx) * V[h][t * D + d];
        out[qh * D + d] = n ? float(a / sum) : 0.0f;
      }
      if (lse) lse[qh] = n ? float(mx + std::log(sum)) : -INFINITY;
    }
  }
}

/// max |a - b| / max |b|
inline double rel_err(const float* a, const float* b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    num = std::max(num, std::fabs(double(a[i]) - b[i]));
    den = std::max(den, std::fabs(double(b[i])));
  }
  return den > 0 ? num / den : num;
}

}  // namespace qtest
