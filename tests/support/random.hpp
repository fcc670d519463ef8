// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Seeded random inputs for kvc's tests. Every test builds its own generator from a fixed seed
/// (plus KVC_TEST_SEED from the environment, when set), so a failure reproduces exactly.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

namespace kvc_test {

/// The base seed: KVC_TEST_SEED when set, else a constant.
inline std::uint64_t base_seed() {
  static const std::uint64_t s = [] {
    const char* e = std::getenv("KVC_TEST_SEED");
    return e ? static_cast<std::uint64_t>(std::strtoull(e, nullptr, 10)) : std::uint64_t{20240607};
  }();
  return s;
}

class rng {
 public:
  explicit rng(std::uint64_t salt) : g_(base_seed() * 0x9E3779B97F4A7C15ull + salt) {}

  /// Uniform integer in [lo, hi].
  std::int32_t integer(std::int32_t lo, std::int32_t hi) {
    return std::uniform_int_distribution<std::int32_t>(lo, hi)(g_);
  }
  std::uint32_t bits32() { return static_cast<std::uint32_t>(g_()); }
  bool coin(double p = 0.5) { return std::bernoulli_distribution(p)(g_); }
  /// Uniform float in [lo, hi).
  float uniform(float lo = -1.0f, float hi = 1.0f) { return std::uniform_real_distribution<float>(lo, hi)(g_); }
  float normal(float sigma = 1.0f) { return std::normal_distribution<float>(0.0f, sigma)(g_); }

  std::vector<float> normals(std::size_t n, float sigma = 1.0f) {
    std::vector<float> v(n);
    for (auto& x : v) x = normal(sigma);
    return v;
  }
  /// A random permutation of 0..n-1.
  std::vector<std::int32_t> permutation(std::int32_t n) {
    std::vector<std::int32_t> p(static_cast<std::size_t>(n));
    std::iota(p.begin(), p.end(), 0);
    std::shuffle(p.begin(), p.end(), g_);
    return p;
  }
  /// A sorted random subset of 0..n-1 with k elements.
  std::vector<std::int32_t> subset(std::int32_t n, std::int32_t k) {
    auto p = permutation(n);
    p.resize(static_cast<std::size_t>(k));
    std::sort(p.begin(), p.end());
    return p;
  }
  std::mt19937_64& engine() { return g_; }

 private:
  std::mt19937_64 g_;
};

}  // namespace kvc_test
