// SPDX-License-Identifier: Apache-2.0
#pragma once
// Shared fixtures of the eviction tests: a small float cache filled with random K/V, and the raw
// K/V/Q arrays the double-precision references read (never the code under test).

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <kvc/evict/evict.hpp>
#include <kvc/kvc.hpp>
#include <kvc/store/kv_cache.hpp>

namespace kt {

struct model {
  int layers = 2, hkv = 2, hq = 4, d = 16, page = 8;
  int G() const { return hq / hkv; }
};

/// Random normal data with a per-token scale so norms differ.
inline std::vector<float> randn(std::size_t n, std::uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> x(n);
  for (auto& v : x) v = nd(g);
  return x;
}

struct filled {
  model m;
  kvc::kv_cache<float> cache;
  kvc::seq_id seq;
  int n;
  // raw[layer]: [n][hkv][d]
  std::vector<std::vector<float>> k, v;
  filled(const model& mm, int tokens, std::uint64_t seed, int max_pages = 4096)
      : m(mm), cache(cfg(mm, max_pages)), seq(cache.add_sequence()), n(tokens) {
    for (int l = 0; l < m.layers; ++l) {
      k.push_back(randn(std::size_t(n) * m.hkv * m.d, seed * 31 + l));
      v.push_back(randn(std::size_t(n) * m.hkv * m.d, seed * 37 + l + 1000));
      // vary token scales so norm-based scorers have distinct scores
      for (int t = 0; t < n; ++t)
        for (int h = 0; h < m.hkv; ++h)
          for (int dd = 0; dd < m.d; ++dd) {
            const float s = 0.5f + float((t * 7 + h * 3) % 11) / 7.0f;
            k[l][(std::size_t(t) * m.hkv + h) * m.d + dd] *= s;
          }
      cache.append(seq, l, k[l].data(), v[l].data(), n);
    }
  }
  static kvc::cache_config cfg(const model& m, int max_pages) {
    kvc::cache_config c;
    c.num_layers = m.layers;
    c.num_kv_heads = m.hkv;
    c.head_dim = m.d;
    c.page_size = m.page;
    c.max_pages = max_pages;
    return c;
  }
  double K(int l, int t, int h, int dd) const { return k[l][(std::size_t(t) * m.hkv + h) * m.d + dd]; }
  double V(int l, int t, int h, int dd) const { return v[l][(std::size_t(t) * m.hkv + h) * m.d + dd]; }
  /// Scores of one layer from a scorer, through the library's gather.
  template <class S>
  kvc::evict::layer_scores run(const S& s, int layer, const kvc::evict::observations& obs = {}) const {
    kvc::evict::gathered_layer g;
    kvc::evict::gather_layer(cache, seq, layer, m.hq, kvc::evict::detail::reads_of(s), g);
    kvc::evict::layer_scores out;
    s.score(g.in, obs, out);
    kvc::evict::check_scores(g.in, out, "test");
    return out;
  }
};

inline std::size_t pages_for(std::int64_t tokens, int page) { return std::size_t((tokens + page - 1) / page); }

}  // namespace kt
