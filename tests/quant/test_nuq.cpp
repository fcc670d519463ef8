// SPDX-License-Identifier: Apache-2.0
// nuq (KVQuant's non-uniform levels on KIVI's key layout) against independent readings: the record
// read byte by byte from the documented layout (page_reader.hpp), every code the nearest of the
// stored levels, and the fitted levels against the uniform grid and against the exact optimum of
// the same weighted 1-D k-means, computed in double by dynamic programming.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/quant/nuq.hpp>

#include "kvc_catch.hpp"
#include "page_reader.hpp"
#include "quant_test_util.hpp"

namespace {

using kvc::quant::role;

/// One key record of G tokens x D channels: each channel a normal with its own offset and spread
/// (a few channels 20x wider, like real keys' outlier channels), or heavy-tailed.
std::vector<float> record_values(int G, int D, std::uint32_t seed, bool heavy) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::student_t_distribution<float> td(3.0f);
  std::vector<float> x(static_cast<std::size_t>(G) * D);
  for (int d = 0; d < D; ++d) {
    const float off = 2.0f * nd(rng), sd = (d % 13 == 5 ? 20.0f : 1.0f) * (0.5f + std::fabs(nd(rng)));
    for (int t = 0; t < G; ++t) x[static_cast<std::size_t>(t) * D + d] = off + sd * (heavy ? td(rng) : nd(rng));
  }
  return x;
}

struct record_read {
  std::vector<double> lo, range, level;  // per channel; the 2^b levels as fractions in [0, 1]
};

/// The record's minima, ranges and levels, read from the bytes as the layout documents them.
record_read read_record(const std::byte* rec, int D, int bits, int G) {
  record_read r;
  const std::byte* rg = rec + static_cast<std::size_t>(G) * D * bits / 8;
  for (int d = 0; d < D; ++d) {
    r.range.push_back(qpages::h16_at(rg + 2 * d));
    r.lo.push_back(qpages::h16_at(rg + 2 * (D + d)));
  }
  for (int j = 0; j < (1 << bits); ++j) r.level.push_back(std::to_integer<unsigned>(rg[4 * D + j]) / 255.0);
  return r;
}

/// sum over the record of range_d^2 (u - nearest level)^2, u = (x - lo_d) / range_d: the weighted
/// objective the fit minimises (the squared error of the keys, in key units).
double objective(const std::vector<float>& x, int G, int D, const record_read& r, const std::vector<double>& levels) {
  double j = 0;
  for (int t = 0; t < G; ++t)
    for (int d = 0; d < D; ++d) {
      if (r.range[d] == 0) continue;
      const double u = (x[static_cast<std::size_t>(t) * D + d] - r.lo[d]) / r.range[d];
      double best = INFINITY;
      for (double l : levels) best = std::min(best, (u - l) * (u - l));
      j += r.range[d] * r.range[d] * best;
    }
  return j;
}

/// The exact minimum of the weighted 1-D k-means objective with k levels (any real levels): dynamic
/// programming over the sorted values, a cluster being a run of consecutive values.
double optimum(const std::vector<float>& x, int G, int D, const record_read& r, int k) {
  std::vector<std::pair<double, double>> uw;  // (u, weight)
  for (int t = 0; t < G; ++t)
    for (int d = 0; d < D; ++d)
      if (r.range[d] > 0)
        uw.emplace_back((x[static_cast<std::size_t>(t) * D + d] - r.lo[d]) / r.range[d], r.range[d] * r.range[d]);
  std::sort(uw.begin(), uw.end());
  const std::size_t n = uw.size();
  std::vector<double> W(n + 1, 0), S(n + 1, 0), Q(n + 1, 0);
  for (std::size_t i = 0; i < n; ++i) {
    W[i + 1] = W[i] + uw[i].second;
    S[i + 1] = S[i] + uw[i].second * uw[i].first;
    Q[i + 1] = Q[i] + uw[i].second * uw[i].first * uw[i].first;
  }
  auto cost = [&](std::size_t a, std::size_t b) {  // values [a, b)
    const double w = W[b] - W[a], s = S[b] - S[a];
    return std::max(0.0, Q[b] - Q[a] - s * s / w);
  };
  std::vector<double> prev(n + 1), cur(n + 1);
  for (std::size_t j = 1; j <= n; ++j) prev[j] = cost(0, j);
  for (int c = 2; c <= k; ++c) {
    cur[0] = 0;
    for (std::size_t j = 1; j <= n; ++j) {
      double best = prev[j];  // fewer clusters than c
      for (std::size_t i = 1; i < j; ++i) best = std::min(best, prev[i] + cost(i, j));
      cur[j] = best;
    }
    std::swap(prev, cur);
  }
  return prev[n];
}

template <int Bits, int G>
void check_records(int D, std::uint32_t seed, bool heavy, double* worst_vs_opt, double* worst_vs_uniform,
                   bool with_optimum) {
  using Q = kvc::quant::nuq<Bits, G, 0>;
  const Q q{};
  Q::key_impl::check(D, "test_nuq");  // (values: groups of G channels, not tested here)
  const auto x = record_values(G, D, seed, heavy);
  std::vector<std::byte> rec(q.record_bytes(role::key, D));
  q.template encode<role::key>(x.data(), D, rec.data());
  const record_read r = read_record(rec.data(), D, Bits, G);

  // the range brackets every value (binary16 rounded outwards), the levels ascend
  for (int d = 0; d < D; ++d)
    for (int t = 0; t < G; ++t) {
      const double v = x[static_cast<std::size_t>(t) * D + d];
      REQUIRE(r.lo[d] <= v);
      REQUIRE(r.lo[d] + r.range[d] >= v);
    }
  REQUIRE(std::is_sorted(r.level.begin(), r.level.end()));

  // decode == the independent reading; each value's level is the nearest stored one
  std::vector<float> dec(x.size()), one(static_cast<std::size_t>(D));
  q.template decode<role::key>(rec.data(), D, dec.data());
  double big = 0;
  for (float v : x) big = std::max(big, double(std::fabs(v)));
  std::vector<double> ref(static_cast<std::size_t>(D));
  for (int t = 0; t < G; ++t) {
    qpages::channel_nuq_read(rec.data(), D, Bits, G, t, ref.data());
    q.template decode_token<role::key>(rec.data(), D, t, one.data());
    for (int d = 0; d < D; ++d) {
      const std::size_t i = static_cast<std::size_t>(t) * D + d;
      INFO("token " << t << " channel " << d);
      REQUIRE(std::fabs(dec[i] - ref[d]) <= 1e-6 * big);
      REQUIRE(one[d] == dec[i]);
      double nearest = INFINITY;
      for (double l : r.level) nearest = std::min(nearest, std::fabs(x[i] - (r.lo[d] + r.range[d] * l)));
      REQUIRE(std::fabs(x[i] - ref[d]) <= nearest + 1e-6 * (r.range[d] + std::fabs(r.lo[d])));
    }
  }

  std::vector<double> uniform;
  for (int j = 0; j < (1 << Bits); ++j) uniform.push_back(double(j) / ((1 << Bits) - 1));
  const double jn = objective(x, G, D, r, r.level), ju = objective(x, G, D, r, uniform);
  *worst_vs_uniform = std::max(*worst_vs_uniform, jn / ju);
  if (with_optimum) {
    const double jo = optimum(x, G, D, r, 1 << Bits);
    REQUIRE(jo <= jn * (1 + 1e-9));  // nothing beats the optimum: a check of the checker
    *worst_vs_opt = std::max(*worst_vs_opt, jn / jo);
  }
}

}  // namespace

TEST_CASE("nuq key records: layout, nearest levels, and the fit against the uniform grid and the optimum", "[quant][codec][nuq]") {
  // Measured when written (gcc 12, x86-64; worst record of each width): fitted / optimal 1.0009
  // (2-bit), 1.0044 (3-bit), 1.046 (4-bit: 16 levels on 256 values, where the 1/256 bins and
  // 1/255 levels show); fitted / uniform 0.83, 0.78, 0.62. The bounds leave room for rounding.
  double opt2 = 0, uni2 = 0, opt3 = 0, uni3 = 0, opt4 = 0, uni4 = 0;
  std::uint32_t seed = 1;
  for (bool heavy : {false, true}) {
    for (int D : {16, 64}) {
      check_records<2, 32>(D, seed++, heavy, &opt2, &uni2, true);
      check_records<3, 16>(D, seed++, heavy, &opt3, &uni3, true);
      check_records<3, 64>(D, seed++, heavy, &opt3, &uni3, D == 16);
      check_records<4, 32>(D, seed++, heavy, &opt4, &uni4, D == 16);
    }
    check_records<2, 8>(128, seed++, heavy, &opt2, &uni2, false);
    check_records<3, 32>(128, seed++, heavy, &opt3, &uni3, false);
  }
  INFO("fitted / optimal: 2-bit " << opt2 << ", 3-bit " << opt3 << ", 4-bit " << opt4 << "; fitted / uniform: 2-bit "
                                  << uni2 << ", 3-bit " << uni3 << ", 4-bit " << uni4);
  CHECK(opt2 < 1.02);
  CHECK(opt3 < 1.02);
  CHECK(opt4 < 1.10);
  CHECK(uni2 < 0.9);
  CHECK(uni3 < 0.85);
  CHECK(uni4 < 0.7);
}

TEST_CASE("nuq: a constant channel decodes to its value, a constant record to its values", "[quant][codec][nuq]") {
  using Q = kvc::quant::nuq<3, 16, 0>;
  const int D = 32, G = 16;
  auto x = record_values(G, D, 99, false);
  for (int t = 0; t < G; ++t) x[static_cast<std::size_t>(t) * D + 7] = 0.375f;  // exact in binary16
  std::vector<std::byte> rec(Q{}.record_bytes(role::key, D));
  Q{}.encode<role::key>(x.data(), D, rec.data());
  std::vector<float> dec(x.size());
  Q{}.decode<role::key>(rec.data(), D, dec.data());
  for (int t = 0; t < G; ++t) CHECK(dec[static_cast<std::size_t>(t) * D + 7] == 0.375f);
  std::vector<float> flat(x.size(), -2.5f);
  Q{}.encode<role::key>(flat.data(), D, rec.data());
  Q{}.decode<role::key>(rec.data(), D, dec.data());
  CHECK(std::all_of(dec.begin(), dec.end(), [](float v) { return v == -2.5f; }));
}

TEST_CASE("nuq: record sizes and bad configurations", "[quant][codec][nuq]") {
  using kvc::quant::nuq;
  // [G rows of D*b/8 codes][range, minimum: binary16 x D][2^b levels]; values as KIVI's
  CHECK((nuq<3, 64>{}.record_bytes(role::key, 64)) == 64u * 24 + 256 + 8);
  CHECK((nuq<2>{}.record_bytes(role::key, 128)) == 32u * 32 + 512 + 4);
  CHECK((nuq<4, 16>{}.record_bytes(role::value, 64)) == 32u + 4 * 4);
  CHECK_THROWS_WITH(nuq<3>{}.check(40), Catch::Contains("head_dim = 40") &&
                                            Catch::Contains("multiple of 16"));
  CHECK_THROWS_WITH(nuq<2>(48).check(64), Catch::Contains("residual = 48") &&
                                              Catch::Contains("multiple of the group size 32"));
}
