// SPDX-License-Identifier: Apache-2.0
// Selection invariants, allocators, memory accounting, attention over the compressed cache, and
// errors that leave the cache unchanged.
#include <algorithm>
#include <numeric>
#include <random>
#include <set>

#include "evict_test_util.hpp"
#include "kvc_catch.hpp"

using namespace kvc::evict;

namespace {
std::vector<std::int32_t> snapshot_positions(const kvc::kv_cache<float>& c, kvc::seq_id s, int layers, int heads) {
  std::vector<std::int32_t> out;
  for (int l = 0; l < layers; ++l)
    for (int h = 0; h < heads; ++h) {
      const int n = c.length(s, l, h);
      out.push_back(n);
      out.insert(out.end(), c.positions(s, l, h), c.positions(s, l, h) + n);
    }
  return out;
}
}  // namespace

TEST_CASE("select_top: exact size, protection, sorted, deterministic ties, NaN last", "[evict][select]") {
  std::mt19937 g(1);
  for (int trial = 0; trial < 300; ++trial) {
    const int n = 1 + int(g() % 90);
    std::vector<float> s(n);
    for (auto& x : s) x = float(g() % 7);  // many ties
    if (n > 3) s[n / 2] = NAN;
    const int keep = int(g() % (n + 1));
    protection p{int(g() % 6), int(g() % 6)};
    std::vector<std::int32_t> a, b;
    select_top(s.data(), n, keep, p, a);
    select_top(s.data(), n, keep, p, b);
    REQUIRE(a == b);
    REQUIRE(int(a.size()) == keep);
    REQUIRE(std::is_sorted(a.begin(), a.end()));
    REQUIRE(std::adjacent_find(a.begin(), a.end()) == a.end());
    std::set<int> kept(a.begin(), a.end());
    const int sinks = std::min(p.sinks, n), recent = std::min(p.recent, n - sinks);
    if (keep >= sinks + recent) {
      for (int t = 0; t < sinks; ++t) REQUIRE(kept.count(t));
      for (int t = n - recent; t < n; ++t) REQUIRE(kept.count(t));
      // every kept unprotected token ranks at least as high as every evicted unprotected token
      for (int e = sinks; e < n - recent; ++e) {
        if (kept.count(e)) continue;
        for (int k : a) {
          if (k < sinks || k >= n - recent) continue;
          const float ks = std::isnan(s[k]) ? -INFINITY : s[k], es = std::isnan(s[e]) ? -INFINITY : s[e];
          REQUIRE((ks > es || (ks == es && k < e)));
        }
      }
    } else {
      for (int t = 0; t < std::min(keep, sinks); ++t) REQUIRE(kept.count(t));
    }
  }
}

TEST_CASE("GQA aggregation is mean or max over the group", "[evict][gqa]") {
  const float x[] = {1, 5, 2, 3, 1, 8};  // G = 2, n = 3
  float out[3];
  aggregate_group(x, 2, 3, 3, group_agg::mean, out);
  REQUIRE(out[0] == 2.0f);
  REQUIRE(out[1] == 3.0f);
  REQUIRE(out[2] == 5.0f);
  aggregate_group(x, 2, 3, 3, group_agg::max, out);
  REQUIRE(out[0] == 3.0f);
  REQUIRE(out[1] == 5.0f);
  REQUIRE(out[2] == 8.0f);
}

TEST_CASE("compress: exact budgets, pool bytes fall by exactly the emptied pages", "[evict][apply]") {
  for (int n : {1, 7, 8, 9, 64, 100}) {
    for (double r : {0.0, 0.1, 0.5, 0.75, 0.99}) {
      kt::filled f({}, n, 20 + n);
      compressor_options o;
      o.target = kvc::budget::ratio(r);
      compressor<knorm> c(knorm{}, o);
      const std::size_t before = f.cache.bytes_in_use();
      const std::size_t page_bytes = f.cache.pool().page_bytes();
      auto rep = c.compress(f.cache, f.seq, 1);
      const int keep = int(std::floor(n * (1 - r) + 1e-9));
      for (int h = 0; h < f.m.hkv; ++h) {
        REQUIRE(f.cache.length(f.seq, 1, h) == keep);
        const int32_t* p = f.cache.positions(f.seq, 1, h);
        REQUIRE(std::is_sorted(p, p + keep));
        for (int t = 0; t < std::min(4, keep); ++t) REQUIRE(p[t] == t);  // sinks kept
      }
      const std::size_t emptied = std::size_t(f.m.hkv) * (kt::pages_for(n, 8) - kt::pages_for(keep, 8));
      REQUIRE(before - f.cache.bytes_in_use() == emptied * page_bytes);
      REQUIRE(rep.bytes_released == emptied * page_bytes);
      REQUIRE(f.cache.length(f.seq, 0, 0) == n);  // other layers untouched
    }
  }
}

TEST_CASE("token budgets keep exactly that many; same result every run", "[evict][apply]") {
  std::vector<std::int32_t> first;
  for (int run = 0; run < 2; ++run) {
    kt::filled f({}, 77, 33);
    compressor_options o;
    o.target = kvc::budget::tokens(20);
    compressor<keydiff> c(keydiff{}, o);
    c.compress(f.cache, f.seq, 0);
    for (int h = 0; h < f.m.hkv; ++h) REQUIRE(f.cache.length(f.seq, 0, h) == 20);
    auto snap = snapshot_positions(f.cache, f.seq, 2, 2);
    if (run == 0) first = snap;
    else REQUIRE(snap == first);
  }
}

TEST_CASE("ada: head-adaptive lengths, safeguard, memory is the streams' own pages", "[evict][ada]") {
  kt::model m;
  m.hkv = 4;
  m.hq = 8;
  kt::filled f(m, 200, 40);
  // Make head 0 keys tiny (knorm scores them high) so ada gives head 0 far more tokens.
  for (int t = 0; t < f.n; ++t)
    for (int d = 0; d < m.d; ++d) f.k[0][(std::size_t(t) * m.hkv + 0) * m.d + d] *= 0.01f;
  kvc::kv_cache<float> cache(kt::filled::cfg(m, 4096));
  auto s = cache.add_sequence();
  cache.append(s, 0, f.k[0].data(), f.v[0].data(), f.n);
  compressor_options o;
  o.target = kvc::budget::ratio(0.75);  // 50 per head on average, 200 in total
  o.alloc = kvc::allocator::ada(0.2);
  o.num_q_heads = m.hq;
  compressor<knorm> c(knorm{}, o);
  c.compress(cache, s, 0);
  std::int64_t total = 0;
  std::size_t pages = 0;
  std::vector<int> lens;
  for (int h = 0; h < m.hkv; ++h) {
    const int L = cache.length(s, 0, h);
    lens.push_back(L);
    total += L;
    pages += kt::pages_for(L, m.page);
    REQUIRE(L >= 4 + int(std::floor(0.2 * 50)));  // sinks + safeguard
  }
  REQUIRE(total == 4 * 50);
  REQUIRE(lens[0] > 100);  // head 0 took most of the budget
  REQUIRE(*std::min_element(lens.begin(), lens.end()) < 50);
  // memory = sum of the streams' own pages, not longest x heads
  REQUIRE(cache.bytes_in_use(0) == pages * cache.pool().page_bytes());
  REQUIRE(pages < kt::pages_for(lens[0], m.page) * m.hkv);
}

TEST_CASE("pyramid, per-layer and head-label allocators", "[evict][alloc]") {
  kt::model m;
  m.layers = 4;
  kt::filled f(m, 300, 41);
  compressor_options o;
  o.target = kvc::budget::tokens(100);
  o.alloc = kvc::allocator::pyramid(20, 10);
  compressor<knorm> c(knorm{}, o);
  for (int l = 0; l < 4; ++l) c.after_prefill(f.cache, f.seq, l);
  // C = 100, w = 10: min = 90 / 20 = 4, max = 180 - 4 = 176, steps = 172 / 3 = 57
  for (int l = 0; l < 4; ++l) REQUIRE(f.cache.length(f.seq, l, 0) == 176 - 57 * l + 10);

  kt::filled g(m, 50, 42);
  compressor_options o2;
  o2.alloc = kvc::allocator::per_layer_budgets(
      {kvc::budget::ratio(0), kvc::budget::ratio(0.5), kvc::budget::tokens(10), kvc::budget::ratio(0.9)});
  compressor<knorm> c2(knorm{}, o2);
  for (int l = 0; l < 4; ++l) c2.after_prefill(g.cache, g.seq, l);
  REQUIRE(g.cache.length(g.seq, 0, 1) == 50);
  REQUIRE(g.cache.length(g.seq, 1, 1) == 25);
  REQUIRE(g.cache.length(g.seq, 2, 1) == 10);
  REQUIRE(g.cache.length(g.seq, 3, 1) == 5);

  kt::filled hl(m, 60, 43);
  compressor_options o3;
  o3.alloc = kvc::allocator::head_labels({1, 0, 0, 1, 1, 1, 0, 0}, 4, 8);
  compressor<streaming_llm> c3(streaming_llm{}, o3);
  for (int l = 0; l < 4; ++l) c3.after_prefill(hl.cache, hl.seq, l);
  REQUIRE(hl.cache.length(hl.seq, 0, 0) == 60);
  REQUIRE(hl.cache.length(hl.seq, 0, 1) == 12);
  const int32_t* p = hl.cache.positions(hl.seq, 0, 1);
  REQUIRE(p[3] == 3);
  REQUIRE(p[4] == 52);
  REQUIRE(hl.cache.length(hl.seq, 3, 1) == 12);
}

namespace {
/// The real-valued CAKE split above the floor, by bisection on the level λ of
/// x_l = min(cap, λ·P_l) with Σ x_l = rest (written apart from allocator::cake_keep's rounds of
/// water-filling). Layers without preference share equally what the others cannot hold.
std::vector<double> cake_reference(const std::vector<double>& P, double rest, double cap) {
  const std::size_t L = P.size();
  auto fill = [&](double lam, const std::vector<double>& w) {
    std::vector<double> x(L);
    for (std::size_t l = 0; l < L; ++l) x[l] = std::min(cap, lam * w[l]);
    return x;
  };
  auto sum = [](const std::vector<double>& x) { return std::accumulate(x.begin(), x.end(), 0.0); };
  std::vector<double> x(L, 0.0);
  if (rest <= 0) return x;
  // First the layers with preference; what they cannot hold goes equally to the others.
  std::vector<double> w(P);
  if (sum(fill(1e300, w)) < rest) {
    std::vector<double> full = fill(1e300, w), eq(L);
    for (std::size_t l = 0; l < L; ++l) eq[l] = P[l] > 0 ? 0.0 : 1.0;
    const double left = rest - sum(full);
    double lo = 0, hi = 1e12;
    for (int it = 0; it < 200; ++it) {
      const double mid = 0.5 * (lo + hi);
      (sum(fill(mid, eq)) < left ? lo : hi) = mid;
    }
    auto y = fill(hi, eq);
    for (std::size_t l = 0; l < L; ++l) x[l] = full[l] + y[l];
    return x;
  }
  double lo = 0, hi = 1;
  while (sum(fill(hi, w)) < rest) hi *= 2;
  for (int it = 0; it < 200; ++it) {
    const double mid = 0.5 * (lo + hi);
    (sum(fill(mid, w)) < rest ? lo : hi) = mid;
  }
  return fill(hi, w);
}
}  // namespace

TEST_CASE("cake: every layer keeps the floor, the total is exact, shares follow the preferences", "[evict][alloc][cake]") {
  std::mt19937_64 g(7);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int trial = 0; trial < 2000; ++trial) {
    const int L = 1 + int(g() % 30);
    std::vector<double> P(static_cast<std::size_t>(L));
    for (auto& p : P) {
      const int kind = int(g() % 6);
      p = kind == 0 ? 0.0 : kind == 1 ? 100.0 * u(g) : u(g) * u(g);  // zeros, dominant layers, spread
    }
    const int length = 1 + int(g() % 800);
    const int base = int(g() % (length + 1));
    const int min_keep = int(g() % 100);
    INFO("trial " << trial << " L " << L << " length " << length << " base " << base << " min_keep " << min_keep);
    const auto a = kvc::allocator::cake(P, min_keep);
    const auto keep = a.cake_keep(base, length);
    REQUIRE(keep.size() == P.size());
    const double total_p = std::accumulate(P.begin(), P.end(), 0.0);
    std::int64_t total = 0;
    for (int k : keep) total += k;
    REQUIRE(total == std::int64_t(L) * base);  // exact
    const int f = std::min(min_keep, base);
    if (total_p <= 0) {
      for (int k : keep) REQUIRE(k == base);  // no preference: uniform
      continue;
    }
    const auto x = cake_reference(P, double(L) * (base - f), double(length - f));
    for (int l = 0; l < L; ++l) {
      INFO("layer " << l << " P " << P[l] << " keep " << keep[l] << " want about " << f + x[l]);
      REQUIRE(keep[l] >= f);       // the floor
      REQUIRE(keep[l] <= length);  // never more than the layer holds
      REQUIRE(std::abs(keep[l] - (f + x[l])) < 1.0 + 1e-6);
    }
    // Through keep_for: layers that earlier compressions left at different lengths use the split
    // of the tokens seen, capped at what they hold.
    const auto b = kvc::budget::tokens(base);
    for (int l = 0; l < L; ++l) {
      const int held = 1 + int(g() % length);
      REQUIRE(a.keep_for(b, held, l, L, length) == std::min(held, keep[l]));
    }
  }
  // The floor applies to a ratio budget too, and a floor above the uniform budget is the budget.
  const auto a = kvc::allocator::cake({1.0, 0.0, 0.0, 0.0}, 40);
  // base 200, floor 40: layer 0 would take all 640 above the floors but holds 400; the 280 it
  // cannot take go equally to layers 1..3 (93 each, the one left over to the lowest layer).
  REQUIRE(a.keep_for(kvc::budget::ratio(0.5), 400, 0, 4) == 400);
  REQUIRE(a.keep_for(kvc::budget::ratio(0.5), 400, 1, 4) == 40 + 94);
  REQUIRE(a.keep_for(kvc::budget::ratio(0.5), 400, 2, 4) == 40 + 93);
  REQUIRE(a.keep_for(kvc::budget::ratio(0.5), 400, 3, 4) == 40 + 93);
  REQUIRE(a.keep_for(kvc::budget::ratio(0.95), 400, 1, 4) == 20);  // base 20 < floor 40: uniform
  REQUIRE_THROWS_WITH(kvc::allocator::cake({1.0}, -1), Catch::Contains("min_keep = -1") && Catch::Contains(">= 0"));
}

TEST_CASE("attention over the compressed cache equals the dense reference over the kept tokens", "[evict][attention]") {
  kt::model m;
  kt::filled f(m, 90, 50);
  compressor_options o;
  o.target = kvc::budget::ratio(0.6);
  o.alloc = kvc::allocator::ada();
  o.num_q_heads = m.hq;
  compressor<knorm> c(knorm{}, o);
  c.compress(f.cache, f.seq, 1);
  auto q = kt::randn(std::size_t(m.hq) * m.d, 51);
  std::vector<float> out(std::size_t(m.hq) * m.d);
  kvc::cpu::decode_attention(f.cache, f.seq, 1, q.data(), m.hq, out.data());
  for (int qh = 0; qh < m.hq; ++qh) {
    const int h = qh / m.G();
    const int n = f.cache.length(f.seq, 1, h);
    const int32_t* pos = f.cache.positions(f.seq, 1, h);  // original positions index the raw arrays
    std::vector<double> s(n);
    double mx = -1e300;
    for (int i = 0; i < n; ++i) {
      double a = 0;
      for (int d = 0; d < m.d; ++d) a += double(q[std::size_t(qh) * m.d + d]) * f.K(1, pos[i], h, d);
      s[i] = a / std::sqrt(double(m.d));
      mx = std::max(mx, s[i]);
    }
    double z = 0;
    for (double& x : s) z += (x = std::exp(x - mx));
    for (int d = 0; d < m.d; ++d) {
      double acc = 0;
      for (int i = 0; i < n; ++i) acc += s[i] / z * f.V(1, pos[i], h, d);
      REQUIRE(out[std::size_t(qh) * m.d + d] == Approx(acc).margin(1e-5));
    }
  }
}

TEST_CASE("bad budgets and unknown heads: clear kvc::error, cache unchanged", "[evict][errors]") {
  kt::filled f({}, 30, 60);
  const auto snap = snapshot_positions(f.cache, f.seq, 2, 2);
  const std::size_t bytes = f.cache.bytes_in_use();
  REQUIRE_THROWS_WITH(kvc::budget::ratio(1.0), Catch::Contains("ratio = 1") && Catch::Contains("[0, 1)"));
  REQUIRE_THROWS_WITH(kvc::budget::ratio(-0.1), Catch::Contains("ratio = -0.1"));
  REQUIRE_THROWS_WITH(kvc::budget::tokens(-5), Catch::Contains("tokens = -5") && Catch::Contains(">= 0"));
  {
    compressor_options o;
    o.target = kvc::budget::tokens(31);
    compressor<knorm> c(knorm{}, o);
    REQUIRE_THROWS_WITH(c.compress(f.cache, f.seq, 0),
                        Catch::Contains("tokens = 31") && Catch::Contains("longest stream") && Catch::Contains("30"));
  }
  {
    compressor_options o;
    o.target = kvc::budget{kvc::budget::kind::ratio, 1.5};  // built without the checked factory
    REQUIRE_THROWS_WITH(compressor<knorm>(knorm{}, o), Catch::Contains("1.5") && Catch::Contains("[0, 1)"));
  }
  {
    compressor_options o;
    o.alloc = kvc::allocator::head_labels({1, 0, 1});  // 3 labels for 2 layers x 2 heads
    compressor<knorm> c(knorm{}, o);
    REQUIRE_THROWS_WITH(c.compress(f.cache, f.seq, 0),
                        Catch::Contains("head labels: 3") && Catch::Contains("num_layers * num_kv_heads = 4"));
  }
  {
    compressor_options o;
    o.alloc = kvc::allocator::per_layer_budgets({kvc::budget::ratio(0.5)});
    compressor<knorm> c(knorm{}, o);
    REQUIRE_THROWS_WITH(c.compress(f.cache, f.seq, 1), Catch::Contains("per_layer budgets: 1") &&
                                                           Catch::Contains("num_layers = 2"));
  }
  {
    compressor<knorm> c;
    REQUIRE_THROWS_WITH(c.compress(f.cache, f.seq, 5), Catch::Contains("layer = 5"));
    REQUIRE_THROWS_WITH(c.compress(f.cache, 99, 0), Catch::Contains("unknown sequence id 99"));
    compressor_options o;
    o.num_q_heads = 3;
    compressor<knorm> c2(knorm{}, o);
    REQUIRE_THROWS_WITH(c2.compress(f.cache, f.seq, 0), Catch::Contains("num_q_heads = 3"));
  }
  // apply_layer with a bad selection is rejected by keep_layer, all heads or none
  layer_selection bad = {{0, 1, 2}, {2, 1}};
  REQUIRE_THROWS_AS(apply_layer(f.cache, f.seq, 0, bad), kvc::error);
  REQUIRE(snapshot_positions(f.cache, f.seq, 2, 2) == snap);
  REQUIRE(f.cache.bytes_in_use() == bytes);
}
