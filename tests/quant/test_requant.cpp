// SPDX-License-Identifier: Apache-2.0
// Re-encoding decoded keys (channel_affine::repack): dyadic grids, exact for values already on
// them, and a decode-time eviction that no longer rounds surviving keys again at every step.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include <kvc/quant/kivi.hpp>
#include <kvc/store/quant_cache.hpp>

#include "cache_builders.hpp"
#include "float_formats.hpp"
#include "kvc_catch.hpp"

using kvc::half;

namespace {

constexpr int D = 64, G = 32;

/// Whether v is a binary16 value (tests/support's independent model of the format).
bool is_half(double v) {
  return kvc_test::binary16.decode(kvc_test::binary16.encode_nearest(v, false)) == v;
}

/// A group [G][D] of binary16 values: channel d around off[d] with spread sd[d] (0: constant).
std::vector<float> group(std::mt19937& rng, const std::vector<double>& off, const std::vector<double>& sd) {
  std::normal_distribution<double> nd;
  std::vector<float> x(std::size_t(G) * D);
  for (int t = 0; t < G; ++t)
    for (int d = 0; d < D; ++d) x[std::size_t(t) * D + d] = float(half(float(off[d] + sd[d] * nd(rng))));
  return x;
}

template <int Bits>
struct rec {
  using impl = kvc::quant::detail::channel_affine<Bits, G>;
  std::vector<std::byte> bytes = std::vector<std::byte>(impl::record_bytes(D));
  std::vector<float> dec = std::vector<float>(std::size_t(G) * D);
  double step(int d) const { return double(float(impl::scales(bytes.data(), D)[d])); }
  double zero(int d) const { return double(float(impl::zeros(bytes.data(), D)[d])); }
  void repack(const std::vector<float>& x) {
    impl::repack(x.data(), D, bytes.data());
    impl::decode(bytes.data(), D, dec.data());
  }
};

/// Whether some zero m s (m an integer, m s a binary16) puts lo..hi's nearest codes in 0..qmax.
bool spans(const std::vector<double>& xs, double s, int qmax) {
  double a = INFINITY, b = -INFINITY;
  for (double x : xs) {
    a = std::min(a, std::nearbyint(x / s));
    b = std::max(b, std::nearbyint(x / s));
  }
  for (double m = b - qmax; m <= a; ++m)
    if (is_half(m * s)) return true;
  return false;
}

template <int Bits>
void check_grid(const std::vector<float>& x, const rec<Bits>& r) {
  constexpr int qmax = (1 << Bits) - 1;
  for (int d = 0; d < D; ++d) {
    const double s = r.step(d), z = r.zero(d);
    int ex = 0;
    INFO("bits " << Bits << " channel " << d << " step " << s << " zero " << z);
    REQUIRE(std::frexp(s, &ex) == 0.5);           // a power of two
    REQUIRE(z / s == std::nearbyint(z / s));      // the zero on the grid
    std::vector<double> xs;
    for (int t = 0; t < G; ++t) {
      const double xv = x[std::size_t(t) * D + d], dv = r.dec[std::size_t(t) * D + d];
      REQUIRE(std::fabs(xv - dv) <= 0.5 * s);
      xs.push_back(xv);
    }
    // The smallest such grid: half the step does not span the group (binary16 steps end at 2^-24).
    if (s > std::ldexp(1.0, -24)) REQUIRE_FALSE(spans(xs, 0.5 * s, qmax));
  }
}

template <int Bits>
void grid_cases() {
  std::mt19937 rng(Bits * 101);
  std::uniform_real_distribution<double> u(-1, 1);
  for (int trial = 0; trial < 40; ++trial) {
    std::vector<double> off(D), sd(D);
    for (int d = 0; d < D; ++d) {
      const int kind = int(rng() % 5);
      off[d] = kind == 3 ? 900 * u(rng) : 4 * u(rng);                          // 3: large offset
      sd[d] = kind == 0 ? 0.0 : kind == 1 ? 1e-3 * std::fabs(u(rng)) : kind == 2 ? 40 * std::fabs(u(rng)) : 1.0;
    }
    const auto x = group(rng, off, sd);
    rec<Bits> r;
    r.repack(x);
    check_grid<Bits>(x, r);
    // Repacking what it decodes changes no value (the grid may get finer: the decoded range can
    // be narrower than the input's).
    rec<Bits> again;
    again.repack(r.dec);
    REQUIRE(again.dec == r.dec);
    for (int d = 0; d < D; ++d) REQUIRE(again.step(d) <= r.step(d));
  }
}

/// Two records, then a group of A's last G - k tokens and B's first k (a compaction's shift):
/// every value whose grid is as coarse as the new one or coarser comes back bit for bit.
template <int Bits>
void mix_cases() {
  std::mt19937 rng(Bits * 7 + 3);
  std::uniform_real_distribution<double> u(-1, 1);
  int exact_checked = 0;
  for (int trial = 0; trial < 40; ++trial) {
    std::vector<double> off(D), sa(D), sb(D);
    for (int d = 0; d < D; ++d) {
      off[d] = 3 * u(rng);
      sa[d] = 0.2 + std::fabs(u(rng));
      sb[d] = sa[d] * (0.5 + std::fabs(u(rng)));
    }
    rec<Bits> A, B;
    A.repack(group(rng, off, sa));
    B.repack(group(rng, off, sb));
    const int k = 1 + int(rng() % (G - 1));
    std::vector<float> mix(std::size_t(G) * D);
    std::memcpy(mix.data(), A.dec.data() + std::size_t(k) * D, sizeof(float) * std::size_t(G - k) * D);
    std::memcpy(mix.data() + std::size_t(G - k) * D, B.dec.data(), sizeof(float) * std::size_t(k) * D);
    rec<Bits> M;
    M.repack(mix);
    check_grid<Bits>(mix, M);
    for (int d = 0; d < D; ++d)
      for (int t = 0; t < G; ++t) {
        const double src_step = t < G - k ? A.step(d) : B.step(d);
        if (M.step(d) > src_step) continue;
        ++exact_checked;
        REQUIRE(M.dec[std::size_t(t) * D + d] == mix[std::size_t(t) * D + d]);
      }
  }
  REQUIRE(exact_checked > 40 * G * D / 4);  // most values sit on a fine enough grid
}

}  // namespace

TEST_CASE("repack puts each key channel on the smallest dyadic grid that spans it", "[quant][requant]") {
  grid_cases<2>();
  grid_cases<3>();
  grid_cases<4>();
  grid_cases<8>();
}

TEST_CASE("a 2-bit group wider than binary16's steps can span falls back to the min/max grid", "[quant][requant]") {
  // A range of 120,000 needs a step of 2^16 at 2 bits; binary16's largest power of two is 2^15.
  using impl = kvc::quant::detail::channel_affine<2, G>;
  std::mt19937 rng(3);
  std::vector<float> x(std::size_t(G) * D);
  for (int t = 0; t < G; ++t)
    for (int d = 0; d < D; ++d) x[std::size_t(t) * D + d] = t == 0 ? -60000.0f : t == 1 ? 60000.0f : float(half(float(int(rng() % 3000) * 32 - 48000)));
  std::vector<std::byte> a(impl::record_bytes(D)), b(impl::record_bytes(D));
  impl::repack(x.data(), D, a.data());
  impl::encode(x.data(), D, b.data());
  REQUIRE(a == b);
  std::vector<float> dec(x.size());
  impl::decode(a.data(), D, dec.data());
  for (std::size_t i = 0; i < x.size(); ++i) REQUIRE(std::fabs(double(dec[i]) - x[i]) <= 0.5 * 120000.0 / 3 * (1 + 0x1p-10));
}

TEST_CASE("repack stores values already on its grid exactly", "[quant][requant]") {
  mix_cases<2>();
  mix_cases<3>();
  mix_cases<4>();
  mix_cases<8>();
}

namespace {

/// rms over surviving keys of |k - k_orig| / channel spread, after a stream of L tokens appended
/// in chunks of C with (evict) half the tokens seen dropped at random after every chunk (the
/// newest 64 always kept), against the same positions encoded once (no eviction).
template <int Bits>
std::pair<double, double> stream_errors(int L, int C) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  std::vector<double> off(D), amp(D);
  for (int d = 0; d < D; ++d) {
    off[d] = 2 * nd(rng);
    amp[d] = std::exp(0.7 * nd(rng));
  }
  std::vector<float> K(std::size_t(L) * D), V(std::size_t(L) * D);
  for (int t = 0; t < L; ++t)
    for (int d = 0; d < D; ++d) {
      K[std::size_t(t) * D + d] = float(half(float(off[d] + amp[d] * nd(rng))));
      V[std::size_t(t) * D + d] = float(half(nd(rng)));
    }
  std::vector<std::vector<double>> err(2);  // [no evict, evict] per position, -1: evicted
  for (int evict = 0; evict < 2; ++evict) {
    auto c = kvc_test::shape_as<kvc::quant_cache_config>(kvc_test::cache_shape(1, 1, D, 32, 4096));
    c.max_fp_pages = 8;
    kvc::quant_cache<kvc::quant::kivi<Bits>> qc(c);
    const auto s = qc.add_sequence();
    std::mt19937 pick(5);
    for (int t0 = 0; t0 < L; t0 += C) {
      qc.append(s, 0, K.data() + std::size_t(t0) * D, V.data() + std::size_t(t0) * D, C);
      const int n = qc.length(s, 0, 0), budget = (t0 + C + 1) / 2;
      if (!evict || n <= budget) continue;
      const int win = std::min(64, budget);
      std::vector<int> idx(std::size_t(n - win));
      for (int i = 0; i < n - win; ++i) idx[std::size_t(i)] = i;
      std::shuffle(idx.begin(), idx.end(), pick);
      idx.resize(std::size_t(budget - win));
      for (int i = n - win; i < n; ++i) idx.push_back(i);
      std::sort(idx.begin(), idx.end());
      qc.keep(s, 0, 0, idx.data(), int(idx.size()));
    }
    const int n = qc.length(s, 0, 0);
    std::vector<float> k(std::size_t(n) * D);
    qc.gather(s, 0, 0, k.data(), nullptr);
    err[std::size_t(evict)].assign(std::size_t(L), -1.0);
    for (int i = 0; i < n; ++i) {
      const int p = qc.positions(s, 0, 0)[i];
      double e = 0;
      for (int d = 0; d < D; ++d) {
        const double x = (double(k[std::size_t(i) * D + d]) - K[std::size_t(p) * D + d]) / amp[d];
        e += x * x;
      }
      err[std::size_t(evict)][std::size_t(p)] = e;
    }
  }
  double once = 0, evicted = 0;
  int n = 0;
  for (int p = 0; p < L; ++p)
    if (err[1][std::size_t(p)] >= 0) {
      once += err[0][std::size_t(p)];
      evicted += err[1][std::size_t(p)];
      ++n;
    }
  REQUIRE(n == (L + 1) / 2);
  return {std::sqrt(once / (double(n) * D)), std::sqrt(evicted / (double(n) * D))};
}

}  // namespace

TEST_CASE("decode-time eviction does not round surviving KIVI keys again at every step", "[quant][requant]") {
  // 2,048 tokens, 128 compactions. Measured 2026-12-05 (this file's settings): the keys that
  // survive end with 1.95x the rms error of one encoding with repack, 3.88x when compaction
  // re-encoded with min/max grids (encode). The bound sits between.
  const auto [once, evicted] = stream_errors<4>(2048, 16);
  INFO("rms error of one encoding " << once << ", after eviction " << evicted);
  REQUIRE(once > 0);
  REQUIRE(evicted / once < 2.5);
}
