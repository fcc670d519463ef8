// SPDX-License-Identifier: Apache-2.0
// RoPE against an independent double formula: rotate-half and interleaved pairings, partial
// rotary dims, linear scaling and Llama 3's frequency scaling (the published apply_scaling of
// meta-llama/llama-models, Llama 3.1 defaults factor 8, low 1, high 4, original 8192);
// re-rotation p -> p + delta equals rotation at p + delta; norms are preserved; bad configs throw.

#include <cmath>
#include <cstdint>
#include <vector>

#include <kvc/attention/rope.hpp>
#include <kvc/numeric/half.hpp>

#include "fast_require.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

constexpr double pi = 3.14159265358979323846;

/// Llama 3's apply_scaling, transcribed from the reference implementation.
double llama3_scale(double freq, double factor, double low, double high, double old_ctx) {
  const double low_freq_wavelen = old_ctx / low;
  const double high_freq_wavelen = old_ctx / high;
  const double wavelen = 2 * pi / freq;
  if (wavelen < high_freq_wavelen) return freq;
  if (wavelen > low_freq_wavelen) return freq / factor;
  const double smooth = (old_ctx / wavelen - low) / (high - low);
  return (1 - smooth) * freq / factor + smooth * freq;
}

std::vector<double> ref_freqs(const kvc::rope_config& c) {
  const std::int32_t rot = c.rotary_dim ? c.rotary_dim : c.head_dim;
  std::vector<double> f;
  for (std::int32_t i = 0; i < rot / 2; ++i) {
    double x = 1.0 / std::pow(static_cast<double>(c.theta), (2.0 * i) / rot);
    if (c.scaling.type == kvc::rope_scaling::kind::linear) x /= c.scaling.factor;
    if (c.scaling.type == kvc::rope_scaling::kind::llama3)
      x = llama3_scale(x, c.scaling.factor, c.scaling.low_freq_factor, c.scaling.high_freq_factor,
                       c.scaling.original_max_position);
    f.push_back(x);
  }
  return f;
}

/// x rotated to position pos: the pair (a, b) becomes (a cos - b sin, a sin + b cos).
std::vector<double> ref_apply(const kvc::rope_config& c, const std::vector<float>& x, double pos) {
  const std::int32_t rot = c.rotary_dim ? c.rotary_dim : c.head_dim, half = rot / 2;
  const auto f = ref_freqs(c);
  std::vector<double> y(x.begin(), x.end());
  for (std::int32_t i = 0; i < half; ++i) {
    const std::int32_t a = c.style == kvc::rope_style::rotate_half ? i : 2 * i;
    const std::int32_t b = c.style == kvc::rope_style::rotate_half ? i + half : 2 * i + 1;
    const double th = pos * f[static_cast<std::size_t>(i)];
    y[static_cast<std::size_t>(a)] = x[static_cast<std::size_t>(a)] * std::cos(th) - x[static_cast<std::size_t>(b)] * std::sin(th);
    y[static_cast<std::size_t>(b)] = x[static_cast<std::size_t>(a)] * std::sin(th) + x[static_cast<std::size_t>(b)] * std::cos(th);
  }
  return y;
}

double norm(const std::vector<float>& x) {
  double s = 0;
  for (float v : x) s += static_cast<double>(v) * v;
  return std::sqrt(s);
}

std::vector<kvc::rope_config> configs() {
  std::vector<kvc::rope_config> cs;
  for (auto style : {kvc::rope_style::rotate_half, kvc::rope_style::interleaved}) {
    for (std::int32_t rot : {0, 32}) {
      for (int sc = 0; sc < 3; ++sc) {
        kvc::rope_config c;
        c.head_dim = 64;
        c.rotary_dim = rot;
        c.style = style;
        c.theta = sc == 2 ? 500000.0f : 10000.0f;
        if (sc == 1) {
          c.scaling.type = kvc::rope_scaling::kind::linear;
          c.scaling.factor = 4.0f;
        } else if (sc == 2) {  // Llama 3.1 defaults
          c.scaling.type = kvc::rope_scaling::kind::llama3;
          c.scaling.factor = 8.0f;
          c.scaling.low_freq_factor = 1.0f;
          c.scaling.high_freq_factor = 4.0f;
          c.scaling.original_max_position = 8192;
        }
        cs.push_back(c);
      }
    }
  }
  return cs;
}

}  // namespace

TEST_CASE("rope: frequencies follow the published formulas (none, linear, llama3)", "[rope]") {
  for (const auto& c : configs()) {
    const kvc::rope rp(c);
    const auto f = ref_freqs(c);
    for (std::size_t i = 0; i < f.size(); ++i)
      REQUIRE(std::fabs(rp.inv_freq(static_cast<std::int32_t>(i)) - f[i]) <= 1e-12 * f[i]);
  }
  // Llama 3.1: the three regimes all occur with theta 500000 and 128 dims.
  kvc::rope_config c;
  c.head_dim = 128;
  c.theta = 500000.0f;
  c.scaling.type = kvc::rope_scaling::kind::llama3;
  c.scaling.factor = 8.0f;
  const kvc::rope rp(c);
  int kept = 0, divided = 0, smoothed = 0;
  for (std::int32_t i = 0; i < 64; ++i) {
    const double f = std::pow(500000.0, -2.0 * i / 128), w = 2 * pi / f;
    const double g = rp.inv_freq(i);
    if (w < 8192 / 4.0) {
      REQUIRE(g == Approx(f).epsilon(1e-12));
      ++kept;
    } else if (w > 8192 / 1.0) {
      REQUIRE(g == Approx(f / 8).epsilon(1e-12));
      ++divided;
    } else {
      REQUIRE(g > f / 8);
      REQUIRE(g < f);
      ++smoothed;
    }
  }
  REQUIRE(kept > 0);
  REQUIRE(divided > 0);
  REQUIRE(smoothed > 0);
}

TEST_CASE("rope: apply, rerotate and norms against the double formula", "[rope]") {
  kvc_test::rng r(70);
  for (const auto& c : configs()) {
    const kvc::rope rp(c);
    INFO("style=" << static_cast<int>(c.style) << " rotary_dim=" << c.rotary_dim
                  << " scaling=" << static_cast<int>(c.scaling.type));
    for (int it = 0; it < 40; ++it) {
      const auto x = r.normals(64);
      const double pos = it < 5 ? it : r.integer(0, 200000);
      auto y = x;
      rp.apply(y.data(), pos);
      const auto want = ref_apply(c, x, pos);
      for (std::size_t d = 0; d < 64; ++d) KVC_REQUIRE(std::fabs(y[d] - want[d]) <= 1e-6 * (1 + std::fabs(want[d])), "pos=" << pos << " d=" << d);
      const std::int32_t rot = c.rotary_dim ? c.rotary_dim : 64;
      for (std::int32_t d = rot; d < 64; ++d) REQUIRE(y[static_cast<std::size_t>(d)] == x[static_cast<std::size_t>(d)]);
      REQUIRE(norm(y) == Approx(norm(x)).epsilon(1e-6));
      // Re-rotation by delta (either sign) equals rotation at pos + delta.
      const double delta = r.integer(-5000, 5000);
      rp.rerotate(y.data(), delta);
      const auto want2 = ref_apply(c, x, pos + delta);
      for (std::size_t d = 0; d < 64; ++d)
        KVC_REQUIRE(std::fabs(y[d] - want2[d]) <= 4e-6 * (1 + std::fabs(want2[d])), "pos=" << pos << " delta=" << delta);
    }
  }
  // apply_heads rotates each head the same way; half storage rounds the same rotation.
  kvc::rope_config c;
  c.head_dim = 16;
  const kvc::rope rp(c);
  const auto x = r.normals(3 * 16);
  auto y = x;
  rp.apply_heads(y.data(), 3, 17.0);
  for (std::int32_t h = 0; h < 3; ++h) {
    const std::vector<float> xh(x.begin() + h * 16, x.begin() + h * 16 + 16);
    const auto want = ref_apply(c, xh, 17.0);
    for (std::int32_t d = 0; d < 16; ++d) REQUIRE(y[static_cast<std::size_t>(h * 16 + d)] == Approx(want[static_cast<std::size_t>(d)]).margin(1e-6));
  }
  std::vector<kvc::half> hx;
  for (std::int32_t d = 0; d < 16; ++d) hx.push_back(kvc::half(x[static_cast<std::size_t>(d)]));
  std::vector<float> hxf(hx.begin(), hx.end());
  rp.apply(hx.data(), 9.0);
  const auto want = ref_apply(c, hxf, 9.0);
  for (std::int32_t d = 0; d < 16; ++d)
    REQUIRE(static_cast<float>(hx[static_cast<std::size_t>(d)]) == Approx(want[static_cast<std::size_t>(d)]).epsilon(1e-3).margin(1e-3));
}

TEST_CASE("rope: apply_rows (angles stepped along runs of positions) against the double formula", "[rope]") {
  // Runs of consecutive positions longer than the 256-row reset, gaps of every size, a run that
  // starts past 100,000 (where a stepped angle must still match), a repeated position, and a
  // stride wider than a row.
  kvc_test::rng r(71);
  for (const auto& c : configs()) {
    const kvc::rope rp(c);
    INFO("style=" << static_cast<int>(c.style) << " rotary_dim=" << c.rotary_dim
                  << " scaling=" << static_cast<int>(c.scaling.type));
    std::vector<std::int32_t> pos;
    std::int32_t p = r.integer(0, 3);
    while (pos.size() < 700) {
      const std::int32_t run = r.coin(0.2) ? r.integer(200, 400) : r.integer(1, 30);
      for (std::int32_t k = 0; k < run; ++k) pos.push_back(p++);
      p += r.coin(0.1) ? 100000 : r.coin(0.1) ? -1 : r.integer(1, 50);
    }
    const std::int32_t n = static_cast<std::int32_t>(pos.size());
    const std::size_t stride = 70;
    const auto x = r.normals(static_cast<std::size_t>(n) * stride);
    auto y = x;
    rp.apply_rows(y.data(), n, stride, pos.data());
    for (std::int32_t t = 0; t < n; ++t) {
      const std::vector<float> xt(x.begin() + t * stride, x.begin() + t * stride + 64);
      const auto want = ref_apply(c, xt, pos[static_cast<std::size_t>(t)]);
      for (std::size_t d = 0; d < 64; ++d)
        KVC_REQUIRE(std::fabs(y[t * stride + d] - want[d]) <= 1e-6 * (1 + std::fabs(want[d])),
                    "row " << t << " pos=" << pos[static_cast<std::size_t>(t)] << " d=" << d);
      for (std::size_t d = 64; d < stride; ++d) REQUIRE(y[t * stride + d] == x[t * stride + d]);  // past the row
    }
  }
  // More than 512 pairs (head_dim 1100): no stepping, every angle afresh, still the formula.
  kvc::rope_config wide;
  wide.head_dim = 1100;
  const kvc::rope rw(wide);
  std::vector<std::int32_t> pos(20);
  for (std::int32_t t = 0; t < 20; ++t) pos[static_cast<std::size_t>(t)] = 7 + t;
  const auto x = r.normals(20 * 1100);
  auto y = x;
  rw.apply_rows(y.data(), 20, 1100, pos.data());
  for (std::int32_t t = 0; t < 20; ++t) {
    const std::vector<float> xt(x.begin() + t * 1100, x.begin() + (t + 1) * 1100);
    const auto want = ref_apply(wide, xt, pos[static_cast<std::size_t>(t)]);
    for (std::size_t d = 0; d < 1100; ++d)
      KVC_REQUIRE(std::fabs(y[static_cast<std::size_t>(t) * 1100 + d] - want[d]) <= 1e-6 * (1 + std::fabs(want[d])),
                  "head_dim 1100 row " << t << " d=" << d);
  }
}

TEST_CASE("rope: bad configurations throw and name the field", "[rope][errors]") {
  auto make = [](auto edit) {
    kvc::rope_config c;
    c.head_dim = 64;
    edit(c);
    return kvc::rope(c);
  };
  REQUIRE_THROWS_WITH(make([](auto& c) { c.head_dim = 0; }), Catch::Contains("head_dim = 0"));
  REQUIRE_THROWS_WITH(make([](auto& c) { c.rotary_dim = 33; }), Catch::Contains("rotary_dim = 33"));
  REQUIRE_THROWS_WITH(make([](auto& c) { c.rotary_dim = 128; }), Catch::Contains("rotary_dim = 128"));
  REQUIRE_THROWS_WITH(make([](auto& c) { c.rotary_dim = -2; }), Catch::Contains("rotary_dim = -2"));
  REQUIRE_THROWS_WITH(make([](auto& c) { c.theta = 0.0f; }), Catch::Contains("theta = 0"));
  REQUIRE_THROWS_AS(make([](auto& c) { c.theta = NAN; }), kvc::error);
  REQUIRE_THROWS_WITH(make([](auto& c) {
                        c.scaling.type = kvc::rope_scaling::kind::linear;
                        c.scaling.factor = 0.0f;
                      }),
                      Catch::Contains("scaling.factor = 0"));
  REQUIRE_THROWS_WITH(make([](auto& c) {
                        c.scaling.type = kvc::rope_scaling::kind::llama3;
                        c.scaling.low_freq_factor = 4.0f;
                        c.scaling.high_freq_factor = 4.0f;
                      }),
                      Catch::Contains("high_freq_factor = 4"));
}
