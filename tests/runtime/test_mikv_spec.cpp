// SPDX-License-Identifier: Apache-2.0
// The `mikv` storage spec (runtime/mikv_storage.hpp): MiKV mixed precision driven by the cache's
// own observed attention. References are computed here, in double, from the values the cache
// stores (gather() dequantizes them), and the precision choice is re-derived independently.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <kvc/runtime/make_cache.hpp>  // int8 (registered by kvc_test_storages), what mikv(high_ratio=1) must equal
#include <kvc/runtime/mikv_storage.hpp>

#include "cache_builders.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

// Storage headers register nothing by being included (runtime/make_cache.hpp): the storages this
// file builds by spec are registered here, in its own ISA configuration, before any test runs.
[[maybe_unused]] static const bool storages_registered = (kvc::runtime::register_mikv_storage(), true);

namespace {

using kvc::runtime::any_cache;

kvc::cache_config cfg(int layers, int H, int D, int P, int pages) { return kvc_test::cache_shape(layers, H, D, P, pages); }

/// Softmax attention of G query heads over one stream's dequantized K/V, in double.
struct ref_head {
  std::vector<double> out;    // [G][D]
  std::vector<double> probs;  // [G][L]
};
ref_head reference(const any_cache& c, kvc::seq_id s, int layer, int head, const float* q, int G) {
  const int D = c.config().head_dim, L = c.length(s, layer, head);
  std::vector<float> k(std::size_t(L) * D), v(k.size());
  c.gather(s, layer, head, k.data(), v.data());
  ref_head r;
  r.out.assign(std::size_t(G) * D, 0.0);
  r.probs.assign(std::size_t(G) * L, 0.0);
  const double scale = 1.0 / std::sqrt(double(D));
  for (int g = 0; g < G; ++g) {
    const float* qg = q + std::size_t(g) * D;
    std::vector<double> sc(static_cast<std::size_t>(L));
    double mx = -INFINITY;
    for (int t = 0; t < L; ++t) {
      double d = 0;
      for (int i = 0; i < D; ++i) d += double(qg[i]) * k[std::size_t(t) * D + i];
      sc[std::size_t(t)] = d * scale;
      mx = std::max(mx, sc[std::size_t(t)]);
    }
    double z = 0;
    for (double& x : sc) z += (x = std::exp(x - mx));
    for (int t = 0; t < L; ++t) {
      const double p = sc[std::size_t(t)] / z;
      r.probs[std::size_t(g) * L + t] = p;
      for (int i = 0; i < D; ++i) r.out[std::size_t(g) * D + i] += p * v[std::size_t(t) * D + i];
    }
  }
  return r;
}

template <class HQ, class LQ>
const kvc::runtime::mikv_cache<HQ, LQ>& as_mikv(const any_cache& c) {
  auto* m = dynamic_cast<const kvc::runtime::mikv_cache<HQ, LQ>*>(&c);
  REQUIRE(m != nullptr);
  return *m;
}

struct regs {
  int sink, high, low, residual;
};
/// f(the concrete mikv_cache) for whichever codec pair the spec built.
template <class F>
auto with_mikv(const any_cache& c, F f) {
  using namespace kvc::quant;
  if (auto* m = dynamic_cast<const kvc::runtime::mikv_cache<int8, int2>*>(&c)) return f(*m);
  if (auto* m = dynamic_cast<const kvc::runtime::mikv_cache<int8, int4>*>(&c)) return f(*m);
  auto* m = dynamic_cast<const kvc::runtime::mikv_cache<int4, int2>*>(&c);
  REQUIRE(m != nullptr);
  return f(*m);
}
regs regions(const any_cache& c, kvc::seq_id s, int layer, int head) {
  return with_mikv(c, [&](const auto& m) {
    const auto r = m.get().regions(s, layer, head);
    return regs{r.sink, r.high, r.low, r.residual};
  });
}
std::vector<float> importance(const any_cache& c, kvc::seq_id s, int layer, int head) {
  return with_mikv(c, [&](const auto& m) { return m.importance(s, layer, head); });
}

std::int32_t share(double ratio, std::int32_t n) { return std::int32_t(std::ceil(ratio * n * (1.0 - 1e-6))); }

}  // namespace

TEST_CASE("mikv spec: attention equals a double reference over the stored values, importance is its sum",
          "[runtime][mikv]") {
  struct shape {
    int H, G, D, P;
    double ratio;
    const char* spec;
  };
  const shape shapes[] = {
      {1, 1, 32, 16, 0.3, "mikv(hbits=8,lbits=2,high_ratio=0.3)"},
      {3, 3, 64, 16, 0.2, "mikv(hbits=8,lbits=2,high_ratio=0.2)"},
      {2, 4, 128, 8, 0.5, "mikv(hbits=8,lbits=4,high_ratio=0.5,recent_ratio=0.25)"},
      {2, 2, 64, 32, 0.25, "mikv(hbits=4,lbits=2,high_ratio=0.25,sinks=3)"},
      {3, 2, 16, 4, 0.1, "mikv(lbits=4,high_ratio=0.1,recent_ratio=1,sinks=1)"},
  };
  int case_no = 0;
  for (const shape& sh : shapes) {
    INFO(sh.spec << " H=" << sh.H << " G=" << sh.G << " D=" << sh.D << " P=" << sh.P);
    kvc_test::rng rng(100 + case_no++);
    const int layers = 2, layer = 1, HQ = sh.H * sh.G;
    auto c = kvc::runtime::make_cache(sh.spec, cfg(layers, sh.H, sh.D, sh.P, 4096));
    CHECK(c->name() == sh.spec);
    const auto s = c->add_sequence();
    std::vector<std::vector<double>> imp(static_cast<std::size_t>(sh.H));  // reference importance
    int total = 0;
    double worst_out = 0, worst_p = 0, worst_imp = 0;
    while (total < 160) {
      const int n = rng.integer(1, 23);
      auto k = rng.normals(std::size_t(n) * sh.H * sh.D), v = rng.normals(k.size(), 2.0f);
      c->append(s, layer, k.data(), v.data(), n);
      total += n;
      for (auto& x : imp) x.resize(std::size_t(total), 0.0);
      for (int step = 0; step < 2; ++step) {
        auto q = rng.normals(std::size_t(HQ) * sh.D, 1.5f);
        std::vector<float> out(q.size()), probs(std::size_t(HQ) * total);
        kvc::decode_options o;
        if (step == 1) {  // the caller's probabilities, or none (the cache then uses its own buffer)
          o.probs = probs.data();
          o.probs_stride = total;
        }
        c->attention(s, layer, q.data(), HQ, out.data(), o);
        for (int h = 0; h < sh.H; ++h) {
          const ref_head r = reference(*c, s, layer, h, q.data() + std::size_t(h) * sh.G * sh.D, sh.G);
          for (int g = 0; g < sh.G; ++g) {
            for (int i = 0; i < sh.D; ++i)
              worst_out = std::max(worst_out, std::abs(out[(std::size_t(h) * sh.G + g) * sh.D + i] -
                                                       r.out[std::size_t(g) * sh.D + i]));
            for (int t = 0; t < total; ++t) {
              const double p = r.probs[std::size_t(g) * total + t];
              imp[std::size_t(h)][std::size_t(t)] += p;
              if (step == 1)
                worst_p = std::max(worst_p, std::abs(probs[(std::size_t(h) * sh.G + g) * total + t] - p));
            }
          }
        }
      }
    }
    for (int h = 0; h < sh.H; ++h) {
      const std::vector<float> got = importance(*c, s, layer, h);
      REQUIRE(got.size() == std::size_t(total));
      for (int t = 0; t < total; ++t)
        worst_imp = std::max(worst_imp, std::abs(got[std::size_t(t)] - imp[std::size_t(h)][std::size_t(t)]) /
                                            (1.0 + imp[std::size_t(h)][std::size_t(t)]));
      CHECK(c->length(s, layer, h) == total);
      CHECK(c->length(s, 0, h) == 0);
    }
    CHECK(worst_out < 2e-4);
    CHECK(worst_p < 2e-6);
    CHECK(worst_imp < 1e-5);
    // Not vacuous: both precisions hold tokens and the high ones fit the budget.
    for (int h = 0; h < sh.H; ++h) {
      const regs r = regions(*c, s, layer, h);
      CHECK(r.low > 0);
      CHECK(r.high > 0);
      CHECK(r.sink + r.high + r.residual == std::max(share(sh.ratio, total), r.sink));
    }
  }
}

TEST_CASE("mikv spec: the high-precision tokens are exactly the newest and the top accumulated attention",
          "[runtime][mikv]") {
  // An independent re-derivation of every demotion: after each append, of the tokens still high,
  // the sinks, the newest ceil(recent_ratio * budget) and then the highest reference importance
  // stay, up to budget = ceil(high_ratio * length). Demoted tokens never come back.
  struct setup {
    int H, G, D, sinks;
    double high, recent;
  };
  const setup setups[] = {{3, 3, 64, 0, 0.2, 0.5}, {2, 2, 32, 4, 0.35, 0.3}, {1, 4, 64, 2, 0.5, 0.0}};
  int case_no = 0;
  for (const setup& su : setups) {
    const std::string spec = "mikv(hbits=8,lbits=2,high_ratio=" + std::to_string(su.high) +
                             ",recent_ratio=" + std::to_string(su.recent) + ",sinks=" + std::to_string(su.sinks) + ")";
    INFO(spec);
    kvc_test::rng rng(200 + case_no++);
    auto c = kvc::runtime::make_cache(spec, cfg(1, su.H, su.D, 16, 4096));
    const auto& m = as_mikv<kvc::quant::int8, kvc::quant::int2>(*c);
    const auto s = c->add_sequence();
    const int HQ = su.H * su.G;
    std::vector<std::vector<double>> imp(static_cast<std::size_t>(su.H));
    std::vector<std::vector<char>> high(static_cast<std::size_t>(su.H));
    int total = 0, demotions = 0, checked = 0;
    for (int round = 0; round < 40; ++round) {
      const int n = rng.integer(1, 12);
      auto k = rng.normals(std::size_t(n) * su.H * su.D), v = rng.normals(k.size());
      c->append(s, 0, k.data(), v.data(), n);
      total += n;
      for (int h = 0; h < su.H; ++h) {
        auto& hi = high[std::size_t(h)];
        auto& im = imp[std::size_t(h)];
        hi.resize(std::size_t(total), 1);
        im.resize(std::size_t(total), 0.0);
        const int budget = share(su.high, total);
        std::vector<int> cand;
        int used = 0, nhigh = 0;
        for (int t = 0; t < total; ++t) {
          if (!hi[std::size_t(t)]) continue;
          ++nhigh;
          if (t < su.sinks) ++used;
          else cand.push_back(t);
        }
        std::vector<char> expect = hi;
        double threshold = INFINITY;  // importance of the weakest heavy hitter kept
        if (nhigh > budget) {
          for (int t : cand) expect[std::size_t(t)] = 0;
          const int recent = std::min({share(su.recent, budget), budget - used, int(cand.size())});
          for (int i = 0; i < std::max(recent, 0); ++i) expect[std::size_t(cand[cand.size() - 1 - i])] = 1;
          cand.resize(cand.size() - std::size_t(std::max(recent, 0)));
          std::stable_sort(cand.begin(), cand.end(), [&](int a, int b) { return im[std::size_t(a)] > im[std::size_t(b)]; });
          const int take = std::max(0, std::min(budget - used - std::max(recent, 0), int(cand.size())));
          for (int i = 0; i < take; ++i) expect[std::size_t(cand[std::size_t(i)])] = 1;
          if (take > 0) threshold = im[std::size_t(cand[std::size_t(take - 1)])];
          if (take < int(cand.size()) && take > 0)
            INFO("gap at the budget's edge " << threshold - im[std::size_t(cand[std::size_t(take)])]);
        }
        for (int t = 0; t < total; ++t) {
          const bool got_high = !m.get().is_low(s, 0, h, t);
          if (got_high != bool(expect[std::size_t(t)])) {
            // Only a float/double near-tie at the budget's edge may differ.
            INFO("head " << h << " token " << t << " importance " << im[std::size_t(t)] << " threshold " << threshold);
            CHECK(std::abs(im[std::size_t(t)] - threshold) <= 1e-5 * (1.0 + threshold));
          }
          demotions += hi[std::size_t(t)] && !got_high;
          hi[std::size_t(t)] = got_high;
          ++checked;
        }
        int now_high = 0;
        for (char x : hi) now_high += x;
        CHECK(now_high <= std::max(budget, std::min(su.sinks, total)));
      }
      auto q = rng.normals(std::size_t(HQ) * su.D, 2.0f);
      std::vector<float> out(q.size());
      c->attention(s, 0, q.data(), HQ, out.data());
      for (int h = 0; h < su.H; ++h) {
        const ref_head r = reference(*c, s, 0, h, q.data() + std::size_t(h) * su.G * su.D, su.G);
        for (int g = 0; g < su.G; ++g)
          for (int t = 0; t < total; ++t) imp[std::size_t(h)][std::size_t(t)] += r.probs[std::size_t(g) * total + t];
      }
    }
    CHECK(demotions > total / 3);  // the check above ran on real decisions
    CHECK(checked > 0);
  }
}

TEST_CASE("mikv spec: bytes in use are the pools' pages of both precisions and fall with demotion",
          "[runtime][mikv]") {
  kvc_test::rng rng(300);
  const int L = 2, H = 3, D = 64, P = 16, n = 200;
  const auto c8 = cfg(L, H, D, P, 4096);
  auto k = rng.normals(std::size_t(n) * H * D), v = rng.normals(k.size());
  auto all_high = kvc::runtime::make_cache("mikv(high_ratio=1)", c8);
  auto int8 = kvc::runtime::make_cache("int8", c8);
  auto mixed = kvc::runtime::make_cache("mikv(high_ratio=0.25,sinks=4)", c8);
  const auto& m = as_mikv<kvc::quant::int8, kvc::quant::int2>(*mixed).get();
  const std::size_t hpb = m.high_cache().quant_pool().page_bytes(), lpb = m.low_cache().quant_pool().page_bytes();
  REQUIRE(m.high_cache().sink_pool() != nullptr);
  const std::size_t spb = m.high_cache().sink_pool()->page_bytes();  // one fp16 sink page per stream
  CHECK(lpb < hpb);  // the point of demoting: a 2-bit page holds the same tokens in fewer bytes
  for (auto* c : {all_high.get(), int8.get(), mixed.get()}) c->add_sequence();
  std::size_t last = 0;
  for (int start = 0; start < n; start += 40) {
    for (auto* c : {all_high.get(), int8.get(), mixed.get()})
      c->append(0, 1, k.data() + std::size_t(start) * H * D, v.data() + std::size_t(start) * H * D, 40);
    // high_ratio = 1 never demotes: the same pages as the plain int8 storage.
    CHECK(all_high->bytes_in_use() == int8->bytes_in_use());
    // The mixed cache's bytes are its streams' pages, priced by the pools.
    std::size_t expect = 0;
    for (int h = 0; h < H; ++h) {
      const auto r = m.regions(0, 1, h);
      CHECK(r.sink == 4);
      CHECK(r.residual == 0);
      CHECK(r.sink + r.high == share(0.25, start + 40));
      CHECK(r.low == start + 40 - r.sink - r.high);
      expect += std::size_t((r.high + P - 1) / P) * hpb + std::size_t((r.low + P - 1) / P) * lpb + spb;
    }
    CHECK(mixed->bytes_in_use() == expect);
    CHECK(mixed->bytes_in_use(1) == mixed->bytes_in_use());
    CHECK(mixed->bytes_in_use(0) == 0);
    CHECK(mixed->bytes_in_use() < int8->bytes_in_use());
    CHECK(mixed->bytes_in_use() > last);
    last = mixed->bytes_in_use();
  }
  // Evicting frees pages of both precisions, and the importance follows the kept tokens.
  const auto& mc = as_mikv<kvc::quant::int8, kvc::quant::int2>(*mixed);
  std::vector<float> q(std::size_t(H) * 3 * D, 0.5f), out(q.size());
  mixed->attention(0, 1, q.data(), H * 3, out.data());
  std::vector<std::vector<std::int32_t>> kept(H);
  std::vector<std::vector<float>> before(H);
  for (int h = 0; h < H; ++h) {
    kept[std::size_t(h)] = rng.subset(n, 50 + 20 * h);
    before[std::size_t(h)] = mc.importance(0, 1, h);
  }
  const std::size_t b0 = mixed->bytes_in_use();
  mixed->keep_layer(0, 1, kept);
  CHECK(mixed->bytes_in_use() < b0);
  for (int h = 0; h < H; ++h) {
    const auto after = mc.importance(0, 1, h);
    REQUIRE(after.size() == kept[std::size_t(h)].size());
    for (std::size_t i = 0; i < after.size(); ++i)
      CHECK(after[i] == before[std::size_t(h)][std::size_t(kept[std::size_t(h)][i])]);
  }
  mixed->remove_sequence(0);
  CHECK(mixed->bytes_in_use() == 0);
}

TEST_CASE("mikv spec: a failing append leaves the cache unchanged", "[runtime][mikv]") {
  // Three pages per pool: the low pool fills first, so the append succeeds in the high store and
  // the demotion it needs does not fit.
  kvc_test::rng rng(400);
  const int D = 32;
  auto c = kvc::runtime::make_cache("mikv(high_ratio=0.25)", cfg(1, 1, D, 16, 3));
  const auto& m = as_mikv<kvc::quant::int8, kvc::quant::int2>(*c);
  const auto s = c->add_sequence();
  bool failed = false;
  for (int round = 0; round < 30 && !failed; ++round) {
    auto k = rng.normals(std::size_t(8) * D), v = rng.normals(k.size());
    std::vector<float> q(std::size_t(2) * D, 0.3f), out(q.size());
    const int L0 = c->length(s, 0, 0);
    std::vector<float> k0(std::size_t(L0) * D), v0(k0.size());
    c->gather(s, 0, 0, k0.data(), v0.data());
    const auto low0 = m.get().low_indices(s, 0, 0);
    const auto imp0 = m.importance(s, 0, 0);
    const std::size_t b0 = c->bytes_in_use();
    try {
      c->append(s, 0, k.data(), v.data(), 8);
    } catch (const kvc::out_of_memory& e) {
      failed = true;
      CHECK_THAT(e.what(), Catch::Matchers::Contains("kvc::runtime::mikv_cache::append: layer 0: ") &&
                               Catch::Matchers::Contains("low-precision pages") &&
                               Catch::Matchers::Contains("(the cache is unchanged)") &&
                               Catch::Matchers::Contains("kvc::page_pool::reserve: "));
      CHECK(m.get().low_cache().quant_pool().reserved_pages() == 0);
      REQUIRE(c->length(s, 0, 0) == L0);
      std::vector<float> k1(k0.size()), v1(k0.size());
      c->gather(s, 0, 0, k1.data(), v1.data());
      CHECK(k1 == k0);
      CHECK(v1 == v0);
      CHECK(m.get().low_indices(s, 0, 0) == low0);
      CHECK(m.importance(s, 0, 0) == imp0);
      CHECK(c->bytes_in_use() == b0);
      CHECK(c->seen(s, 0) == L0);
      break;
    }
    c->attention(s, 0, q.data(), 2, out.data());
  }
  CHECK(failed);
  CHECK_THROWS_WITH(c->fork(s), Catch::Matchers::Contains("cannot share pages"));
  // Errors name the public call, the argument and the value, and change nothing.
  const std::size_t b1 = c->bytes_in_use();
  const int L1 = c->length(s, 0, 0);
  const std::vector<std::vector<std::int32_t>> kept = {{0}};
  CHECK_THROWS_WITH(c->keep_layer(s + 7, 0, kept),
                    Catch::Matchers::Contains("kvc::runtime::mikv_cache::keep_layer: unknown sequence id " +
                                              std::to_string(s + 7) + " (argument seq), expected a live sequence id: {" +
                                              std::to_string(s) + "}"));
  CHECK_THROWS_WITH(c->keep_layer(s, 3, kept),
                    Catch::Matchers::Contains("kvc::mixed_precision_cache::keep_layer: layer = 3, expected 0..0"));
  const std::int32_t bad[] = {L1 + 4};
  CHECK_THROWS_WITH(c->keep(s, 0, 0, bad, 1),
                    Catch::Matchers::Contains("kvc::mixed_precision_cache::keep: head 0: kept[0] = " +
                                              std::to_string(L1 + 4) + ", expected 0.." + std::to_string(L1 - 1)));
  CHECK(c->length(s, 0, 0) == L1);
  CHECK(c->bytes_in_use() == b1);
}

TEST_CASE("mikv spec: bad parameters name the parameter, the value and the expectation", "[runtime][mikv]") {
  const auto c = cfg(1, 1, 32, 16, 64);
  using Catch::Matchers::Contains;
  auto bad = [&](const std::string& spec, const std::string& what) {
    INFO(spec);
    CHECK_THROWS_WITH(kvc::runtime::make_cache(spec, c), Contains(what));
  };
  bad("mikv(hbits=3)", "hbits = 3, expected 8 or 4");
  bad("mikv(lbits=8)", "lbits = 8, expected 4 or 2 and fewer than hbits = 8");
  bad("mikv(hbits=4,lbits=4)", "lbits = 4, expected 4 or 2 and fewer than hbits = 4");
  bad("mikv(high_ratio=1.5)", "high_ratio = 1.5, expected 0..1");
  bad("mikv(high_ratio=-0.1)", "high_ratio = -0.1, expected 0..1");
  bad("mikv(recent_ratio=2)", "recent_ratio = 2, expected 0..1");
  bad("mikv(ratio=0.2)", "ratio is not a mikv argument, expected high_ratio");
  bad("mikv(sinks=-1)", "sinks = -1, expected >= 0");
  bad("mikv(pre_rope=2)", "pre_rope = 2, expected 0 or 1");
  bad("mikv(pre_rope=1)", "pre_rope = 1, expected the model's RoPE");
  bad("mikv(bits=2)", "has no argument 'bits'");
  // With the model's RoPE, pre-RoPE keys are accepted and reported to the engine.
  kvc::rope_config rc;
  rc.head_dim = 32;
  kvc::runtime::storage_options o;
  o.rope = &rc;
  CHECK(kvc::runtime::make_cache("mikv(pre_rope=1)", c, o)->pre_rope_keys());
  CHECK_FALSE(kvc::runtime::make_cache("mikv", c)->pre_rope_keys());
}

TEST_CASE("any_cache::prefill_attention: every cache_adapter storage against a double causal reference; mikv refuses",
          "[runtime][prefill]") {
  const std::int32_t H = 2, D = 32, G = 2, n = 70;
  std::mt19937 rng(17);
  std::normal_distribution<float> nd;
  std::vector<float> k(static_cast<std::size_t>(n) * H * D), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  // Queries at the last position (it sees every token: decode attention's answer), an early one
  // and one in the middle.
  const std::vector<std::int32_t> qpos{n - 1, 4, 40};
  const std::int32_t nq = static_cast<std::int32_t>(qpos.size()), hq = H * G;
  std::vector<float> q(static_cast<std::size_t>(nq) * hq * D);
  for (auto& x : q) x = nd(rng);
  for (const char* spec : {"fp32", "fp16", "int8", "kivi(bits=2,group=32,residual=32)", "int4(pre_rope=1)"}) {
    INFO(spec);
    kvc::runtime::storage_options so;
    kvc::rope_config rc;
    rc.head_dim = D;
    so.rope = &rc;
    auto c = kvc::runtime::make_cache(spec, kvc_test::cache_shape(1, H, D, 16, 256), so);
    REQUIRE(c->has_prefill_attention());
    const auto s = c->add_sequence();
    c->append(s, 0, k.data(), v.data(), n);
    std::vector<float> out(q.size()), dec(static_cast<std::size_t>(hq) * D);
    c->prefill_attention(s, 0, q.data(), nq, qpos.data(), hq, out.data());
    c->attention(s, 0, q.data(), hq, dec.data());
    for (std::size_t i = 0; i < dec.size(); ++i) CHECK(std::fabs(out[i] - dec[i]) <= 1e-5f * (1 + std::fabs(dec[i])));
    for (std::int32_t h = 0; h < H; ++h) {
      std::vector<float> kd(static_cast<std::size_t>(n) * D), vd(kd.size());
      c->gather(s, 0, h, kd.data(), vd.data());
      for (std::int32_t i = 0; i < nq; ++i)
        for (std::int32_t g = 0; g < G; ++g) {
          const float* qv = q.data() + (static_cast<std::size_t>(i) * hq + h * G + g) * D;
          const std::int32_t m = qpos[static_cast<std::size_t>(i)] + 1;  // tokens 0..pos (positions = indices)
          std::vector<double> sc(static_cast<std::size_t>(m));
          double mx = -1e300, sum = 0;
          for (std::int32_t t = 0; t < m; ++t) {
            double a = 0;
            for (std::int32_t d = 0; d < D; ++d) a += double(qv[d]) * kd[static_cast<std::size_t>(t) * D + d];
            sc[static_cast<std::size_t>(t)] = a / std::sqrt(double(D));
            mx = std::max(mx, sc[static_cast<std::size_t>(t)]);
          }
          for (double x : sc) sum += std::exp(x - mx);
          for (std::int32_t d = 0; d < D; ++d) {
            double a = 0;
            for (std::int32_t t = 0; t < m; ++t)
              a += std::exp(sc[static_cast<std::size_t>(t)] - mx) / sum * vd[static_cast<std::size_t>(t) * D + d];
            CHECK(std::fabs(out[(static_cast<std::size_t>(i) * hq + h * G + g) * D + d] - a) <= 2e-5 * (1 + std::fabs(a)));
          }
        }
    }
  }
  auto m = kvc::runtime::make_cache("mikv", kvc_test::cache_shape(1, H, D, 16, 256));
  CHECK_FALSE(m->has_prefill_attention());
  const auto s = m->add_sequence();
  m->append(s, 0, k.data(), v.data(), n);
  std::vector<float> out(q.size());
  REQUIRE_THROWS_WITH(m->prefill_attention(s, 0, q.data(), nq, qpos.data(), hq, out.data()),
                      Catch::Contains("kvc::runtime::any_cache::prefill_attention: storage 'mikv") &&
                          Catch::Contains("has no prefill attention"));
}

TEST_CASE("any_cache::chunk_tokens: runs of a chunk appended and attended together equal token-by-token decode",
          "[runtime][prefill]") {
  // The engine prefills in runs of chunk_tokens(); each query must see what appending and
  // attending token by token shows it. KIVI and GEAR re-encode a group when their residual window
  // overflows, so a whole chunk appended at once shows recent tokens quantized: the control below
  // checks that this test notices that.
  const std::int32_t H = 2, D = 32, G = 2, hq = H * G, n = 150;
  std::mt19937 rng(29);
  std::normal_distribution<float> nd;
  std::vector<float> k(static_cast<std::size_t>(n) * H * D), v(k.size()), q(static_cast<std::size_t>(n) * hq * D);
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  for (auto& x : q) x = nd(rng);
  std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
  for (std::int32_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = i;
  const std::size_t row = static_cast<std::size_t>(hq) * D, kv_row = static_cast<std::size_t>(H) * D;
  const std::int32_t cut = 77;  // both caches drop every fifth token of each head here
  auto drop = [&](kvc::runtime::any_cache& c, kvc::seq_id s) {
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h)
      for (std::int32_t i = 0; i < c.length(s, 0, h); ++i)
        if ((i + h) % 5 != 0) kept[static_cast<std::size_t>(h)].push_back(i);
    c.keep_layer(s, 0, kept);
  };
  struct cs {
    const char* spec;
    bool reencodes;  // whether a whole chunk appended at once must differ (the control)
  };
  for (const cs& x : {cs{"fp16", false}, cs{"int8", false}, cs{"kivi(bits=2,residual=32)", true},
                      cs{"kivi(bits=4,residual=32,sinks=3)", true}, cs{"gear(bits=4)", true}}) {
    INFO(x.spec);
    const auto shape = kvc_test::cache_shape(1, H, D, 16, 512);
    auto a = kvc::runtime::make_cache(x.spec, shape), b = kvc::runtime::make_cache(x.spec, shape);
    const auto sa = a->add_sequence(), sb = b->add_sequence();
    std::vector<float> out_a(static_cast<std::size_t>(n) * row), out_b(out_a.size());
    for (std::int32_t t = 0; t < n; ++t) {  // reference: token by token, decode attention
      if (t == cut) drop(*a, sa);
      a->append(sa, 0, k.data() + t * kv_row, v.data() + t * kv_row, 1, &pos[static_cast<std::size_t>(t)]);
      a->attention(sa, 0, q.data() + t * row, hq, out_a.data() + t * row);
    }
    std::int32_t longest_run = 0;
    for (std::int32_t t0 = 0; t0 < n;) {  // engine chunks of random length, split into runs
      if (t0 == cut) drop(*b, sb);
      const std::int32_t chunk_end = std::min({n, t0 + std::uniform_int_distribution<std::int32_t>(1, 60)(rng),
                                               t0 < cut ? cut : n});
      while (t0 < chunk_end) {
        const std::int32_t r = b->chunk_tokens(sb, 0, chunk_end - t0);
        REQUIRE(r >= 1);
        REQUIRE(r <= chunk_end - t0);
        longest_run = std::max(longest_run, r);
        b->append(sb, 0, k.data() + t0 * kv_row, v.data() + t0 * kv_row, r, &pos[static_cast<std::size_t>(t0)]);
        b->prefill_attention(sb, 0, q.data() + t0 * row, r, &pos[static_cast<std::size_t>(t0)], hq,
                             out_b.data() + t0 * row);
        t0 += r;
      }
    }
    CHECK(longest_run >= 8);  // runs are longer than one token: the chunked path is used
    for (std::size_t i = 0; i < out_a.size(); ++i)
      REQUIRE(std::fabs(out_a[i] - out_b[i]) <= 2e-5f * (1 + std::fabs(out_a[i])));
    for (std::int32_t h = 0; h < H; ++h) {  // the same stored state, bit for bit
      const std::int32_t len = a->length(sa, 0, h);
      REQUIRE(b->length(sb, 0, h) == len);
      std::vector<float> ka(static_cast<std::size_t>(len) * D), va(ka.size()), kb(ka.size()), vb(ka.size());
      a->gather(sa, 0, h, ka.data(), va.data());
      b->gather(sb, 0, h, kb.data(), vb.data());
      CHECK(ka == kb);
      CHECK(va == vb);
    }
    // Control: the first 76 tokens (before the cut) appended as one call, then attended together.
    auto c = kvc::runtime::make_cache(x.spec, shape);
    const auto sc = c->add_sequence();
    const std::int32_t m = 76;
    c->append(sc, 0, k.data(), v.data(), m, pos.data());
    std::vector<float> out_c(static_cast<std::size_t>(m) * row);
    c->prefill_attention(sc, 0, q.data(), m, pos.data(), hq, out_c.data());
    float worst = 0;
    for (std::size_t i = 0; i < out_c.size(); ++i) worst = std::max(worst, std::fabs(out_c[i] - out_a[i]));
    if (x.reencodes) CHECK(worst > 1e-3f);
    else CHECK(worst <= 1e-4f);
    CHECK(c->chunk_tokens(sc, 0, 0) == 0);
  }
  auto m = kvc::runtime::make_cache("mikv", kvc_test::cache_shape(1, H, D, 16, 256));
  CHECK(m->chunk_tokens(m->add_sequence(), 0, 40) == 1);  // the default: token by token
}
