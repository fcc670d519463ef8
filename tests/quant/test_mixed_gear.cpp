// SPDX-License-Identifier: Apache-2.0
// MiKV mixed precision (int8 / int2 per token) and GEAR (quantization + low rank + sparse outliers).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include <kvc/attention.hpp>
#include <kvc/cpu/mixed_precision_attention.hpp>
#include <kvc/cpu/quant_attention.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/mikv.hpp>
#include <kvc/store/mixed_precision_cache.hpp>

#include "kvc_catch.hpp"
#include "quant_test_util.hpp"

using namespace kvc::quant;

namespace {

using mixed = kvc::mixed_precision_cache<int8, int2>;

kvc::quant_cache_config mcfg(int H = 2, int D = 64, int P = 16, int pages = 512, int sinks = 4) {
  kvc::quant_cache_config c;
  c.num_layers = 2;
  c.num_kv_heads = H;
  c.head_dim = D;
  c.page_size = P;
  c.max_pages = pages;
  c.max_fp_pages = 32;
  c.sink_tokens = sinks;
  return c;
}

std::vector<float> halfs(std::size_t n, std::uint32_t seed, float sd = 1.0f) {
  auto v = qtest::randn(n, seed, sd);
  for (auto& x : v) x = float(kvc::half(x));
  return v;
}

/// Everything observable about one layer of a mixed cache.
struct msnap {
  std::vector<std::vector<float>> k, v;
  std::vector<std::vector<std::int32_t>> pos, low;
  std::size_t bytes, hb, lb;
  std::int64_t tokens;
  msnap(const mixed& c, kvc::seq_id s, int layer)
      : bytes(c.bytes_in_use()), hb(c.high_cache().bytes_in_use()), lb(c.low_cache().bytes_in_use()),
        tokens(c.tokens_held()) {
    const int H = c.config().num_kv_heads, D = c.config().head_dim;
    for (int h = 0; h < H; ++h) {
      const int L = c.length(s, layer, h);
      k.emplace_back(std::size_t(L) * D);
      v.emplace_back(std::size_t(L) * D);
      c.gather(s, layer, h, k.back().data(), v.back().data());
      pos.emplace_back(c.positions(s, layer, h), c.positions(s, layer, h) + L);
      low.push_back(c.low_indices(s, layer, h));
    }
  }
  bool operator==(const msnap& o) const {
    return k == o.k && v == o.v && pos == o.pos && low == o.low && bytes == o.bytes && hb == o.hb && lb == o.lb &&
           tokens == o.tokens;
  }
};

std::size_t round64(std::size_t b) { return (b + 63) / 64 * 64; }

}  // namespace

TEST_CASE("mikv: demoted tokens carry the low codec's error, kept ones the high codec's", "[quant][mikv]") {
  const int H = 2, D = 64, n = 200, sinks = 4;
  mixed c(mcfg(H, D, 16, 512, sinks));
  auto s = c.add_sequence();
  auto k = halfs(std::size_t(n) * H * D, 1), v = halfs(k.size(), 2, 3.0f);
  c.append(s, 0, k.data(), v.data(), 150);
  c.append(s, 0, k.data() + std::size_t(150) * H * D, v.data() + std::size_t(150) * H * D, 50);
  // demote every other quantized token of head 0, every third of head 1
  std::vector<std::vector<std::int32_t>> dem(H);
  for (int t = sinks; t < n; ++t) {
    if ((t % 2) == 0) dem[0].push_back(t);
    if ((t % 3) == 0) dem[1].push_back(t);
  }
  for (int h = 0; h < H; ++h) c.demote(s, 0, h, dem[h].data(), std::int32_t(dem[h].size()));
  for (int h = 0; h < H; ++h) {
    const auto r = c.regions(s, 0, h);
    REQUIRE(r.sink == sinks);
    REQUIRE(r.low == std::int32_t(dem[h].size()));
    REQUIRE(r.high == n - sinks - r.low);
    REQUIRE(r.residual == 0);
    std::vector<float> kk(std::size_t(n) * D), vv(kk.size());
    c.gather(s, 0, h, kk.data(), vv.data());
    double worst_high = 0, worst_low = 0;
    for (int t = 0; t < n; ++t) {
      REQUIRE(c.positions(s, 0, h)[t] == t);
      const bool low = std::find(dem[h].begin(), dem[h].end(), t) != dem[h].end();
      REQUIRE(c.is_low(s, 0, h, t) == low);
      for (int which = 0; which < 2; ++which) {
        const float* x = (which ? v.data() : k.data()) + (std::size_t(t) * H + h) * D;
        const float* y = (which ? vv.data() : kk.data()) + std::size_t(t) * D;
        double amax = 0, lo = x[0], hi = x[0];
        for (int d = 0; d < D; ++d) {
          amax = std::max(amax, std::fabs(double(x[d])));
          lo = std::min(lo, double(x[d]));
          hi = std::max(hi, double(x[d]));
        }
        const double b8 = amax / 127.0 * 0.5 * 1.002 + 1e-7;  // int8 symmetric: scale / 2 (scale rounded up to fp16)
        // int2 asymmetric over the decoded int8 row (range widened by the int8 error), + fp16 rounding
        const double b2 = b8 + ((hi - lo) + 2 * b8) / 3.0 * 0.5 * 1.002 + (amax + b8) * 1e-3 + 1e-6;
        for (int d = 0; d < D; ++d) {
          const double e = std::fabs(double(y[d]) - x[d]);
          if (t < sinks) {
            REQUIRE(e == 0.0);
          } else if (low) {
            REQUIRE(e <= b2);
            worst_low = std::max(worst_low, e / (hi - lo));
          } else {
            REQUIRE(e <= b8);
            worst_high = std::max(worst_high, e / amax);
          }
        }
      }
    }
    // the demoted tokens really are 2-bit: their error is far above anything int8 produces
    REQUIRE(worst_low > 0.05);
    REQUIRE(worst_high < 0.0041);
  }
  // the other layer is untouched
  REQUIRE(c.regions(s, 1, 0).low == 0);
}

TEST_CASE("mikv: bytes from the pools fall by exactly the pages demotion frees", "[quant][mikv]") {
  const int H = 2, D = 128, P = 16, n = 512, sinks = 0;
  mixed c(mcfg(H, D, P, 1024, sinks));
  // page sizes follow from the record formats: int8 = D codes + 1 fp16 scale; int2 = D/4 codes + fp16 scale and zero
  const std::size_t hpb = c.high_cache().quant_pool().page_bytes(), lpb = c.low_cache().quant_pool().page_bytes();
  REQUIRE(hpb == round64(std::size_t(P) * 2 * (D + 2)));
  REQUIRE(lpb == round64(std::size_t(P) * 2 * (D / 4 + 4)));
  auto s = c.add_sequence();
  auto k = halfs(std::size_t(n) * H * D, 3), v = halfs(k.size(), 4);
  c.append(s, 0, k.data(), v.data(), n);
  const std::size_t before = c.bytes_in_use();
  REQUIRE(before == std::size_t(H) * (n / P) * hpb);
  // MiKV's default split: keep 20% high, demote 80% (head 0: a block-aligned 80%, head 1: a scattered 80%)
  const int n_low = n * 8 / 10 / P * P;  // 400 -> 400 (a multiple of P: whole pages move)
  std::vector<std::int32_t> d0(n_low), d1;
  std::iota(d0.begin(), d0.end(), 0);
  for (int t = 0; t < n && int(d1.size()) < n_low; ++t)
    if (t % 5 != 2) d1.push_back(t);
  REQUIRE(int(d1.size()) == n_low);
  c.demote(s, 0, 0, d0.data(), n_low);
  c.demote(s, 0, 1, d1.data(), n_low);
  const auto pages = [&](int tokens) { return std::size_t((tokens + P - 1) / P); };
  const std::size_t expected = std::size_t(H) * (pages(n - n_low) * hpb + pages(n_low) * lpb);
  REQUIRE(c.bytes_in_use() == expected);
  REQUIRE(c.bytes_in_use(0) == expected);
  REQUIRE(c.bytes_in_use(1) == 0);
  REQUIRE(c.stream_bytes(s, 0, 1) == expected / H);
  REQUIRE(before - c.bytes_in_use() == std::size_t(H) * (pages(n) - pages(n - n_low)) * hpb - std::size_t(H) * pages(n_low) * lpb);
  const double per_token_before = double(before) / (H * n), per_token_after = double(c.bytes_in_use()) / (H * n);
  WARN("mikv int8/int2 D=128 P=16: bytes per token per head before " << per_token_before << ", after demoting 80%: "
                                                                     << per_token_after << " (high page " << hpb
                                                                     << " B, low page " << lpb << " B)");
  REQUIRE(c.tokens_held() == std::int64_t(H) * n);
  // a second demotion inside partially filled pages: counted page by page
  std::vector<std::int32_t> more;
  for (int t = 0; t < n && int(more.size()) < 7; ++t)
    if (!c.is_low(s, 0, 0, t)) more.push_back(t);
  c.demote(s, 0, 0, more.data(), 7);
  REQUIRE(c.bytes_in_use() == pages(n - n_low - 7) * hpb + pages(n_low + 7) * lpb + pages(n - n_low) * hpb + pages(n_low) * lpb);
  // removing the sequence returns every page of both pools
  c.remove_sequence(s);
  REQUIRE(c.bytes_in_use() == 0);
}

namespace {

/// Fused mixed attention vs dense double attention over the gathered (dequantized) K/V.
double mixed_vs_reference(int hq, int hkv, int D, int n, std::uint32_t seed, kvc::thread_pool* pool, bool pre_rope,
                          double frac_low) {
  auto cfg = mcfg(hkv, D, 16, 2048, 3);
  cfg.pre_rope = pre_rope;
  mixed c(cfg);
  auto s = c.add_sequence();
  auto k = qtest::keylike(std::size_t(n), hkv, D, seed), v = qtest::randn(std::size_t(n) * hkv * D, seed + 1);
  c.append(s, 1, k.data(), v.data(), n * 3 / 4);
  std::mt19937 rng(seed);
  for (int h = 0; h < hkv; ++h) {  // demote a random frac_low of the quantized tokens
    const auto r = c.regions(s, 1, h);
    std::vector<std::uint8_t> mask(std::size_t(c.length(s, 1, h)), 1);
    for (int t = r.sink; t < r.sink + r.high; ++t) mask[std::size_t(t)] = (rng() % 1000) >= frac_low * 1000;
    c.apply_precision(s, 1, h, mask.data());
  }
  for (int t = n * 3 / 4; t < n; ++t)
    c.append(s, 1, k.data() + std::size_t(t) * hkv * D, v.data() + std::size_t(t) * hkv * D, 1);
  std::vector<std::vector<float>> K(hkv), V(hkv);
  for (int h = 0; h < hkv; ++h) {
    K[h].resize(std::size_t(n) * D);
    V[h].resize(K[h].size());
    c.gather(s, 1, h, K[h].data(), V[h].data());
  }
  auto q = qtest::randn(std::size_t(hq) * D, seed + 2, 2.0f);
  std::vector<float> ref(q.size()), out(q.size()), lse(hq), lse_ref(hq);
  qtest::reference_attention(K, V, D, q.data(), hq, ref.data(), 0.0f, lse_ref.data());
  std::vector<float> probs(std::size_t(hq) * n), gprobs(std::size_t(hkv) * n);
  kvc::decode_options o;
  o.pool = pool;
  o.lse = lse.data();
  o.probs = probs.data();
  o.group_probs = gprobs.data();
  o.probs_stride = n;
  kvc::cpu::decode_attention(c, s, 1, q.data(), hq, out.data(), o);
  const int G = hq / hkv;
  const double sc = 1.0 / std::sqrt(double(D));
  for (int qh = 0; qh < hq; ++qh) {
    REQUIRE(std::fabs(lse[qh] - lse_ref[qh]) < 1e-4 * (1 + std::fabs(lse_ref[qh])));
    const int h = qh / G;
    for (int t = 0; t < n; ++t) {  // probabilities in logical order
      double a = 0;
      for (int d = 0; d < D; ++d) a += double(q[std::size_t(qh) * D + d]) * K[h][std::size_t(t) * D + d];
      const double p = std::exp(a * sc - lse_ref[qh]);
      REQUIRE(std::fabs(probs[std::size_t(qh) * n + t] - p) < 1e-5);
    }
  }
  for (int h = 0; h < hkv; ++h)
    for (int t = 0; t < n; ++t) {
      double sum = 0;
      for (int g = 0; g < G; ++g) sum += probs[std::size_t(h * G + g) * n + t];
      REQUIRE(std::fabs(sum - gprobs[std::size_t(h) * n + t]) < 1e-5);
    }
  // The encodings as accessors: the views of both precisions read what gather() gives, element by
  // element, and the double reference over them is the dense reference.
  mixed::layer_buffer buf;
  const auto views = c.layer(s, 1, buf);
  for (int h = 0; h < hkv; ++h) {
    REQUIRE(views.keys(h).tokens() == n);
    int bad = 0;
    for (int t = 0; t < n; ++t)
      for (int d = 0; d < D; ++d)
        bad += views.keys(h)(t, 0, d) != K[h][std::size_t(t) * D + d] || views.values(h)(t, 0, d) != V[h][std::size_t(t) * D + d];
    CHECK(bad == 0);
  }
  if (n <= 40) {  // the reference decodes a row per element read
    std::vector<float> via_views(q.size());
    kvc::reference::decode_attention(views, q.data(), hq, via_views.data());
    CHECK(qtest::rel_err(via_views.data(), ref.data(), ref.size()) < 1e-6);
  }
  // the same without optional outputs
  std::vector<float> out2(q.size());
  kvc::decode_options o2;
  o2.pool = pool;
  kvc::cpu::decode_attention(c, s, 1, q.data(), hq, out2.data(), o2);
  REQUIRE(qtest::rel_err(out2.data(), out.data(), out.size()) < 1e-6);
  // Given the layer's views, the kernel dispatches on the store they name: the same call, bit for bit.
  std::vector<float> out3(q.size());
  kvc::cpu::decode_attention(views, q.data(), hq, out3.data(), o2);
  REQUIRE(out3 == out2);
  kvc::decode_attention(views, q.data(), hq, out3.data(), o2);  // and so does the front door
  REQUIRE(out3 == out2);
  return qtest::rel_err(out.data(), ref.data(), out.size());
}

}  // namespace

TEST_CASE("mikv: fused attention over both precisions matches the dense reference", "[quant][mikv][attention]") {
  kvc::thread_pool pool(2);
  std::uint32_t seed = 40;
  for (double frac : {0.0, 0.3, 0.8, 1.0})
    for (int n : {1, 5, 40, 300}) {
      INFO("frac " << frac << " n " << n);
      CHECK(mixed_vs_reference(4, 4, 64, n, seed++, nullptr, false, frac) < 1e-5);
      CHECK(mixed_vs_reference(8, 2, 64, n, seed++, &pool, false, frac) < 1e-5);
      CHECK(mixed_vs_reference(6, 2, 128, n, seed++, &pool, true, frac) < 1e-5);
    }
}

TEST_CASE("mikv: eviction (keep) spans both precisions and keeps bytes exact", "[quant][mikv]") {
  const int H = 2, D = 64, n = 100;
  mixed c(mcfg(H, D, 16, 256, 2));
  auto s = c.add_sequence();
  auto k = halfs(std::size_t(n) * H * D, 7), v = halfs(k.size(), 8);
  c.append(s, 0, k.data(), v.data(), n);
  std::vector<std::int32_t> d;
  for (int t = 2; t < n; t += 3) d.push_back(t);
  c.demote(s, 0, 0, d.data(), std::int32_t(d.size()));
  d.clear();
  for (int t = n - 1; t >= 2; t -= 2) d.push_back(t);  // demotion order != logical order
  std::reverse(d.begin(), d.end());
  c.demote(s, 0, 1, d.data(), std::int32_t(d.size()));
  const msnap before(c, s, 0);
  std::vector<std::vector<std::int32_t>> kept(H);
  for (int t = 0; t < n; ++t) {
    if (t % 4 != 1) kept[0].push_back(t);
    if (t % 7 != 3) kept[1].push_back(t);
  }
  c.keep_layer(s, 0, kept);
  const msnap after(c, s, 0);
  for (int h = 0; h < H; ++h) {
    REQUIRE(c.length(s, 0, h) == std::int32_t(kept[h].size()));
    for (std::size_t i = 0; i < kept[h].size(); ++i) {
      const std::size_t t = std::size_t(kept[h][i]);
      REQUIRE(after.pos[h][i] == before.pos[h][t]);
      REQUIRE((after.low[h][i] >= 0) == (before.low[h][t] >= 0));
      for (int e = 0; e < D; ++e) {  // per-token records move without re-encoding: bit-exact
        REQUIRE(after.k[h][i * D + e] == before.k[h][t * D + e]);
        REQUIRE(after.v[h][i * D + e] == before.v[h][t * D + e]);
      }
    }
    const auto r = c.regions(s, 0, h);
    std::size_t expect = 0;
    expect += std::size_t((r.high + 15) / 16) * c.high_cache().quant_pool().page_bytes();
    expect += std::size_t((r.low + 15) / 16) * c.low_cache().quant_pool().page_bytes();
    expect += r.sink > 0 ? c.high_cache().sink_pool()->page_bytes() : 0;
    REQUIRE(c.stream_bytes(s, 0, h) == expect);
  }
  // one head via keep(): the low and high stores of the other head are untouched
  const msnap mid(c, s, 0);
  std::vector<std::int32_t> one = {0, 1, 5, 6, 7, 30};
  c.keep(s, 0, 1, one.data(), 6);
  const msnap end(c, s, 0);
  REQUIRE(end.k[0] == mid.k[0]);
  REQUIRE(end.low[0] == mid.low[0]);
  REQUIRE(end.pos[1] == std::vector<std::int32_t>({mid.pos[1][0], mid.pos[1][1], mid.pos[1][5], mid.pos[1][6],
                                                   mid.pos[1][7], mid.pos[1][30]}));
}

TEST_CASE("mikv: failures leave the cache unchanged with clear messages", "[quant][mikv]") {
  const int H = 2, D = 64, n = 64;
  auto cfg = mcfg(H, D, 16, 64, 4);
  mixed c(cfg, /*low_max_pages=*/2);
  auto s = c.add_sequence();
  auto k = halfs(std::size_t(n) * H * D, 9), v = halfs(k.size(), 10);
  c.append(s, 0, k.data(), v.data(), n);
  std::vector<std::int32_t> d = {10, 11};
  c.demote(s, 0, 0, d.data(), 2);
  const msnap s0(c, s, 0);
  auto same = [&] { REQUIRE(msnap(c, s, 0) == s0); };
  std::vector<std::int32_t> sink = {2};
  REQUIRE_THROWS_WITH(c.demote(s, 0, 0, sink.data(), 1), Catch::Contains("token 2 is an attention sink"));
  same();
  std::vector<std::int32_t> again = {9, 10};
  REQUIRE_THROWS_WITH(c.demote(s, 0, 0, again.data(), 2), Catch::Contains("token 10 is already low precision"));
  same();
  std::vector<std::int32_t> order = {20, 20};
  REQUIRE_THROWS_WITH(c.demote(s, 0, 0, order.data(), 2), Catch::Contains("strictly increasing"));
  std::vector<std::int32_t> range = {20, 64};
  REQUIRE_THROWS_WITH(c.demote(s, 0, 1, range.data(), 2), Catch::Contains("token_indices[1] = 64, expected 0..63"));
  REQUIRE_THROWS_WITH(c.demote(s, 0, 2, range.data(), 1), Catch::Contains("head = 2"));
  REQUIRE_THROWS_WITH(c.demote(s, 2, 0, range.data(), 1), Catch::Contains("layer = 2"));
  REQUIRE_THROWS_WITH(c.demote(77, 0, 0, range.data(), 1), Catch::Contains("unknown sequence id 77"));
  same();
  // the low pool holds 2 pages (32 tokens): demoting 40 more tokens of head 1 runs out, nothing changes
  std::vector<std::int32_t> many(40);
  std::iota(many.begin(), many.end(), 8);
  REQUIRE_THROWS_AS(c.demote(s, 0, 1, many.data(), 40), kvc::out_of_memory);
  same();
  // a 0 in the mask on a sink is rejected before anything moves
  std::vector<std::uint8_t> mask(n, 1);
  mask[1] = 0;
  mask[30] = 0;
  REQUIRE_THROWS_WITH(c.apply_precision(s, 0, 1, mask.data()), Catch::Contains("attention sink"));
  same();
  std::vector<std::int32_t> bad_keep = {3, 2};
  REQUIRE_THROWS_WITH(c.keep(s, 0, 0, bad_keep.data(), 2), Catch::Contains("kept[1] = 2 after 3"));
  REQUIRE_THROWS_AS(c.keep_layer(s, 0, {{1, 2}, {5, 500}}), kvc::error);  // second head invalid: first unchanged
  same();
}

// The project rule: a bad-input error names the public call (class included), the argument, the
// value and what was expected, and the call changes nothing (both layers, both pools).
TEST_CASE("mixed_precision_cache: errors name the public call, the argument and the value; nothing changes",
          "[quant][mikv][errors]") {
  const int H = 2, D = 64, n = 40;
  auto cfg = mcfg(H, D, 16, 64, 4);
  cfg.num_layers = 4;
  mixed c(cfg, /*low_max_pages=*/8);
  auto s = c.add_sequence();
  auto k = halfs(std::size_t(n) * H * D, 21), v = halfs(k.size(), 22);
  for (int l = 0; l < 4; ++l) c.append(s, l, k.data(), v.data(), n);
  std::vector<std::int32_t> d = {10, 11, 12};
  c.demote(s, 1, 0, d.data(), 3);
  auto snap = [&] {
    std::vector<msnap> all;
    for (int l = 0; l < 4; ++l) all.emplace_back(c, s, l);
    return all;
  };
  const auto before = snap();
  auto same = [&] { REQUIRE(snap() == before); };
  const std::vector<std::int32_t> kept = {0, 1, 2};
  // layer / head / sequence, through every public writer
  REQUIRE_THROWS_WITH(c.keep(s, 7, 0, kept.data(), 3),
                      Catch::Contains("kvc::mixed_precision_cache::keep: layer = 7, expected 0..3"));
  REQUIRE_THROWS_WITH(c.keep(s, 1, -1, kept.data(), 3),
                      Catch::Contains("kvc::mixed_precision_cache::keep: head = -1, expected 0..1"));
  REQUIRE_THROWS_WITH(c.keep_layer(s, 4, {kept, kept}),
                      Catch::Contains("kvc::mixed_precision_cache::keep_layer: layer = 4, expected 0..3"));
  REQUIRE_THROWS_WITH(c.keep_layer(42, 1, {kept, kept}),
                      Catch::Contains("kvc::mixed_precision_cache::keep_layer: unknown sequence id 42 (argument seq), "
                                      "expected a live sequence id: {0}"));
  REQUIRE_THROWS_WITH(c.append(s, 9, k.data(), v.data(), 1),
                      Catch::Contains("kvc::mixed_precision_cache::append: layer = 9, expected 0..3"));
  REQUIRE_THROWS_WITH(c.demote(s, 1, 5, d.data(), 1),
                      Catch::Contains("kvc::mixed_precision_cache::demote: head = 5, expected 0..1"));
  std::vector<std::uint8_t> mask(n, 1);
  REQUIRE_THROWS_WITH(c.apply_precision(s, -2, 0, mask.data()),
                      Catch::Contains("kvc::mixed_precision_cache::apply_precision: layer = -2, expected 0..3"));
  same();
  // counts and pointers
  REQUIRE_THROWS_WITH(c.keep(s, 1, 0, kept.data(), -3), Catch::Contains("kvc::mixed_precision_cache::keep: n = -3, expected >= 0"));
  REQUIRE_THROWS_WITH(c.keep(s, 1, 0, nullptr, 2), Catch::Contains("kvc::mixed_precision_cache::keep: kept is null with n = 2"));
  REQUIRE_THROWS_WITH(c.keep_layer(s, 1, {kept}),
                      Catch::Contains("kvc::mixed_precision_cache::keep_layer: kept.size() = 1, expected num_kv_heads = 2"));
  REQUIRE_THROWS_WITH(c.append(s, 1, k.data(), v.data(), -1),
                      Catch::Contains("kvc::mixed_precision_cache::append: n = -1, expected >= 0"));
  REQUIRE_THROWS_WITH(c.append(s, 1, nullptr, v.data(), 2),
                      Catch::Contains("kvc::mixed_precision_cache::append: k or v is null with n = 2"));
  REQUIRE_THROWS_WITH(c.demote(s, 1, 0, nullptr, 2), Catch::Contains("kvc::mixed_precision_cache::demote: token_indices is null with n = 2"));
  REQUIRE_THROWS_WITH(c.demote(s, 1, 0, d.data(), -1), Catch::Contains("kvc::mixed_precision_cache::demote: n = -1, expected >= 0"));
  REQUIRE_THROWS_WITH(c.apply_precision(s, 1, 0, nullptr),
                      Catch::Contains("kvc::mixed_precision_cache::apply_precision: high_mask is null for a stream of 40 tokens"));
  REQUIRE_THROWS_WITH(c.is_low(s, 1, 0, 40), Catch::Contains("kvc::mixed_precision_cache::is_low: t = 40, expected 0..39"));
  same();
  // indices: the head, the argument, the value and the expectation, under the call actually made
  const std::vector<std::int32_t> late = {0, 45};
  REQUIRE_THROWS_WITH(c.keep(s, 1, 1, late.data(), 2),
                      Catch::Contains("kvc::mixed_precision_cache::keep: head 1: kept[1] = 45, expected 0..39"));
  REQUIRE_THROWS_WITH(c.keep_layer(s, 1, {kept, late}),
                      Catch::Contains("kvc::mixed_precision_cache::keep_layer: head 1: kept[1] = 45, expected 0..39"));
  mask[11] = 0;  // already low: skipped; a sink is not
  mask[0] = 0;
  REQUIRE_THROWS_WITH(c.apply_precision(s, 1, 0, mask.data()),
                      Catch::Contains("kvc::mixed_precision_cache::apply_precision: head 0: token 0 is an attention sink"));
  same();
  // non-finite input is reported by this call, not by the high store inside it
  auto bad = k;
  bad[5] = std::nanf("");
  REQUIRE_THROWS_WITH(c.append(s, 2, bad.data(), v.data(), 1),
                      Catch::Contains("kvc::mixed_precision_cache::append: k[5] = nan, expected a finite value"));
  same();
  // constructor arguments, including those the two stores check
  auto zero = cfg;
  zero.num_kv_heads = 0;
  REQUIRE_THROWS_WITH(mixed(zero), Catch::Contains("kvc::mixed_precision_cache::mixed_precision_cache: cache_config.num_kv_heads = 0, expected > 0"));
  REQUIRE_THROWS_WITH(mixed(cfg, -1), Catch::Contains("kvc::mixed_precision_cache::mixed_precision_cache: low_max_pages = -1, expected >= 0"));
  auto odd = cfg;
  odd.page_size = 12;
  REQUIRE_THROWS_WITH(mixed(odd), Catch::Contains("kvc::mixed_precision_cache::mixed_precision_cache: cache_config.page_size = 12, expected a power of two"));
  // the policy and the attention overload
  kvc::mikv_policy pol;
  pol.recent_ratio = -0.5f;
  std::vector<float> scores(n, 1.0f);
  REQUIRE_THROWS_WITH(pol.high_mask(c, s, 1, 0, scores.data()),
                      Catch::Contains("kvc::mikv_policy::high_mask: mikv_policy.recent_ratio = -0.5, expected 0..1"));
  pol.recent_ratio = 0.5f;
  REQUIRE_THROWS_WITH(pol.high_mask(c, s, 1, 0, nullptr),
                      Catch::Contains("kvc::mikv_policy::high_mask: scores is null for a stream of 40 tokens"));
  scores[20] = INFINITY;
  REQUIRE_THROWS_WITH(pol.high_mask(c, s, 1, 0, scores.data()),
                      Catch::Contains("kvc::mikv_policy::high_mask: scores[20] = inf, expected finite"));
  REQUIRE_THROWS_WITH(pol.apply(c, s, 1, 0, scores.data()), Catch::Contains("kvc::mikv_policy::high_mask: scores[20] = inf"));
  std::vector<float> q(std::size_t(3) * D, 0.1f), out(q.size());
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(c, s, 1, q.data(), 3, out.data()),
                      Catch::Contains("kvc::cpu::decode_attention: num_q_heads = 3, expected a positive multiple of "
                                      "num_kv_heads = 2"));
  same();
}

TEST_CASE("mikv: a failed demotion rolls the low store back (copy-on-write out of high pages)", "[quant][mikv]") {
  const int H = 1, D = 64, P = 16, n = 64;
  mixed c(mcfg(H, D, P, /*pages=*/n / P, 0));  // the high pool is exactly full
  auto s = c.add_sequence();
  auto k = halfs(std::size_t(n) * H * D, 11), v = halfs(k.size(), 12);
  c.append(s, 0, k.data(), v.data(), n);
  const auto f = c.fork(s);  // the fork shares every high page
  const msnap s0(c, s, 0), f0(c, f, 0);
  std::vector<std::int32_t> d = {3, 40};
  // the low store takes the tokens first; compacting the shared high pages then needs copies the pool lacks
  REQUIRE_THROWS_AS(c.demote(f, 0, 0, d.data(), 2), kvc::out_of_memory);
  REQUIRE(msnap(c, s, 0) == s0);
  REQUIRE(msnap(c, f, 0) == f0);
  REQUIRE(c.low_cache().bytes_in_use() == 0);
  // after the parent goes, the fork's pages are its own and the same demotion succeeds
  c.remove_sequence(s);
  c.demote(f, 0, 0, d.data(), 2);
  REQUIRE(c.regions(f, 0, 0).low == 2);
  REQUIRE(c.is_low(f, 0, 0, 40));
}

TEST_CASE("mikv: fork then demote leaves the parent intact", "[quant][mikv]") {
  const int H = 2, D = 64, n = 80;
  mixed c(mcfg(H, D, 16, 256, 2));
  auto s = c.add_sequence();
  auto k = halfs(std::size_t(n) * H * D, 13), v = halfs(k.size(), 14);
  c.append(s, 0, k.data(), v.data(), n);
  std::vector<std::int32_t> d = {5, 6, 7};
  c.demote(s, 0, 0, d.data(), 3);
  const msnap p0(c, s, 0);
  const auto f = c.fork(s);
  std::vector<std::int32_t> d2 = {8, 20, 70};
  c.demote(f, 0, 0, d2.data(), 3);
  c.demote(f, 0, 1, d2.data(), 3);
  const msnap p1(c, s, 0);
  REQUIRE(p1.k == p0.k);
  REQUIRE(p1.v == p0.v);
  REQUIRE(p1.low == p0.low);
  REQUIRE(c.regions(f, 0, 0).low == 6);
  REQUIRE(c.regions(s, 0, 0).low == 3);
}

TEST_CASE("mikv_policy: sinks, recent tokens and heavy hitters stay high, up to the ratio", "[quant][mikv]") {
  const int H = 1, D = 64, n = 200, sinks = 4;
  mixed c(mcfg(H, D, 16, 256, sinks));
  auto s = c.add_sequence();
  auto k = halfs(std::size_t(n) * H * D, 15), v = halfs(k.size(), 16);
  c.append(s, 0, k.data(), v.data(), n);
  auto scores = qtest::randn(n, 17);
  kvc::mikv_policy pol;  // published defaults: 20% high, half recent
  REQUIRE(pol.high_ratio == 0.2f);
  const auto mask = pol.high_mask(c, s, 0, 0, scores.data());
  const int budget = 40, recent = 20;
  REQUIRE(std::count(mask.begin(), mask.end(), 1) == budget);
  for (int t = 0; t < sinks; ++t) REQUIRE(mask[t] == 1);
  for (int t = n - recent; t < n; ++t) REQUIRE(mask[t] == 1);
  // the remaining 16 are the best-scoring of tokens [sinks, n - recent)
  std::vector<int> mid(n - recent - sinks);
  std::iota(mid.begin(), mid.end(), sinks);
  std::sort(mid.begin(), mid.end(), [&](int a, int b) { return scores[a] > scores[b]; });
  for (int i = 0; i < (int)mid.size(); ++i) REQUIRE(mask[mid[i]] == (i < budget - recent - sinks ? 1 : 0));
  const std::int32_t moved = pol.apply(c, s, 0, 0, scores.data());
  REQUIRE(moved == n - budget);
  REQUIRE(c.regions(s, 0, 0).low == n - budget);
  // applying again demotes nothing new (already-low tokens stay low, the budget is spent)
  REQUIRE(pol.apply(c, s, 0, 0, scores.data()) == 0);
  kvc::mikv_policy bad;
  bad.high_ratio = 1.5f;
  REQUIRE_THROWS_WITH(bad.high_mask(c, s, 0, 0, scores.data()), Catch::Contains("high_ratio = 1.5"));
}

// ============================== GEAR ==============================

#include <kvc/cpu/gear_attention.hpp>
#include <kvc/quant/gear.hpp>

namespace {

/// G x D records of low-rank-plus-noise data with a few large spikes (KV-like outliers).
std::vector<float> lowrank_data(int n_tokens, int D, int true_rank, std::uint32_t seed, float noise = 0.05f) {
  auto U = qtest::randn(std::size_t(n_tokens) * true_rank, seed);
  auto W = qtest::randn(std::size_t(true_rank) * D, seed + 1);
  auto E = qtest::randn(std::size_t(n_tokens) * D, seed + 2, noise);
  std::vector<float> x(std::size_t(n_tokens) * D);
  std::mt19937 rng(seed + 3);
  for (int t = 0; t < n_tokens; ++t)
    for (int d = 0; d < D; ++d) {
      double s = E[std::size_t(t) * D + d];
      for (int c = 0; c < true_rank; ++c) s += double(U[std::size_t(t) * true_rank + c]) * W[std::size_t(c) * D + d];
      x[std::size_t(t) * D + d] = float(s);
    }
  for (int i = 0; i < n_tokens * D / 100; ++i) x[rng() % x.size()] *= 12.0f;  // 1% spikes
  return x;
}

template <class Q>
double frob_error(const Q& q, const std::vector<float>& x, int D, std::vector<float>* dec_out = nullptr) {
  const int u = Q::tokens_per_record(role::key);
  std::vector<std::byte> rec(q.record_bytes(role::key, D));
  std::vector<float> dec(std::size_t(u) * D);
  double e = 0;
  const int n = int(x.size() / D);
  if (dec_out) dec_out->resize(x.size());
  for (int t0 = 0; t0 < n; t0 += u) {
    q.template encode<role::key>(x.data() + std::size_t(t0) * D, D, rec.data());
    q.template decode<role::key>(rec.data(), D, dec.data());
    for (std::size_t i = 0; i < dec.size(); ++i) {
      const double d = double(dec[i]) - x[std::size_t(t0) * D + i];
      e += d * d;
      if (dec_out) (*dec_out)[std::size_t(t0) * D + i] = dec[i];
    }
    for (int t = 0; t < u; ++t) {  // decode_token agrees with decode
      std::vector<float> row(D);
      q.template decode_token<role::key>(rec.data(), D, t, row.data());
      for (int d = 0; d < D; ++d) REQUIRE(row[d] == dec[std::size_t(t) * D + d]);
    }
  }
  return std::sqrt(e);
}

}  // namespace

TEST_CASE("gear: quantization + low rank + outliers beats the plain quantizer", "[quant][gear]") {
  const int D = 128, n = 256;
  for (std::uint32_t seed : {1u, 2u, 3u}) {
    const auto x = lowrank_data(n, D, 4, seed * 10);
    const double plain4 = frob_error(intn<4, scheme::asymmetric>{}, x, D);
    const double plain2 = frob_error(intn<2, scheme::asymmetric>{}, x, D);
    const double g4 = frob_error(gear<4, 32>{}, x, D);
    const double g2 = frob_error(gear<2, 32>{}, x, D);
    INFO("seed " << seed << ": int4 " << plain4 << " gear4 " << g4 << " int2 " << plain2 << " gear2 " << g2);
    CHECK(g4 < 0.7 * plain4);
    CHECK(g2 < 0.7 * plain2);
    // each part helps: no low rank, no outliers
    CHECK(g4 < frob_error(gear<4, 32>(0, 0.02f), x, D));
    CHECK(g4 < frob_error(gear<4, 32>(4, 0.0f), x, D));
    if (seed == 1)
      WARN("GEAR reconstruction (Frobenius, 256x128 low-rank+noise+1% spikes): int4 " << plain4 << " -> gear4 " << g4
                                                                                     << ", int2 " << plain2 << " -> gear2 " << g2);
  }
}

TEST_CASE("gear: with rank 0 and no outliers it is exactly the per-token quantizer", "[quant][gear]") {
  const int D = 64;
  const auto x = lowrank_data(64, D, 3, 77);
  std::vector<float> a, b;
  frob_error(gear<4, 16>(0, 0.0f), x, D, &a);
  frob_error(intn<4, scheme::asymmetric>{}, x, D, &b);
  REQUIRE(a == b);
}

TEST_CASE("gear: outlier entries are exact to fp16, the rest within the codec's bound + low rank", "[quant][gear]") {
  const int D = 64, G = 32;
  const auto x = lowrank_data(G, D, 4, 91);
  gear<4, G> q;
  std::vector<std::byte> rec(q.record_bytes(role::key, D));
  q.encode<role::key>(x.data(), D, rec.data());
  std::vector<float> dec(std::size_t(G) * D);
  q.decode<role::key>(rec.data(), D, dec.data());
  const int k = q.capacity(D);
  REQUIRE(k == int(std::ceil(0.02 * G * D)));
  std::vector<int> order(x.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return std::fabs(x[a]) > std::fabs(x[b]); });
  for (int i = 0; i < k; ++i) {  // the k largest magnitudes: the correction makes them exact up to its fp16 rounding
    const int j = order[i];
    CHECK(std::fabs(dec[j] - x[j]) <= 1e-3 * std::fabs(x[j]) + 1e-3);
  }
}

TEST_CASE("gear: bytes in the pool count codes, scales, both factors and the outliers", "[quant][gear]") {
  const int H = 2, D = 128, P = 64, G = 32, r = 4, n = 1000;
  using Q = gear<4, G>;
  const Q q;  // published defaults
  REQUIRE(q.rank == 4);
  REQUIRE(q.outliers == 0.02f);
  const std::size_t rec = std::size_t(G) * (D / 2 + 4) + std::size_t(2 * r) * (G + D) + 4 * std::size_t(std::ceil(0.02 * G * D));
  REQUIRE(q.record_bytes(role::key, D) == rec);
  kvc::quant_cache_config c;
  c.num_layers = 1;
  c.num_kv_heads = H;
  c.head_dim = D;
  c.page_size = P;
  c.max_pages = 256;
  c.max_fp_pages = 8;
  kvc::quant_cache<Q, Q> cache(c);
  REQUIRE(cache.quant_pool().page_bytes() == round64(2 * (P / G) * rec));
  auto s = cache.add_sequence();
  auto k = lowrank_data(n * H, D, 4, 5), v = lowrank_data(n * H, D, 4, 6);
  cache.append(s, 0, k.data(), v.data(), n);
  const int nq = n / G * G, nres = n - nq;
  REQUIRE(cache.regions(s, 0, 0).quantized == nq);
  REQUIRE(cache.regions(s, 0, 0).residual == nres);
  const std::size_t expect = std::size_t(H) * (std::size_t((nq + P - 1) / P) * cache.quant_pool().page_bytes() +
                                              cache.residual_pool()->page_bytes());
  REQUIRE(cache.bytes_in_use() == expect);
  WARN("gear<4,32> r=4 s=2% D=128: " << double(2 * rec) / G << " bytes per token per head in records (K+V; fp16: "
                                     << 4 * D << "), " << double(cache.bytes_in_use()) / (H * n)
                                     << " measured from the pools for " << n << " tokens (incl. the fp16 group buffer)");
}

namespace {

double gear_attention_vs_reference(int hq, int hkv, int D, int n, std::uint32_t seed, kvc::thread_pool* pool) {
  using Q = gear<4, 32>;
  kvc::quant_cache_config c;
  c.num_layers = 1;
  c.num_kv_heads = hkv;
  c.head_dim = D;
  c.page_size = 64;
  c.max_pages = 1024;
  c.max_fp_pages = 16;
  c.sink_tokens = n % 2 ? 3 : 0;
  kvc::quant_cache<Q, Q> cache(c);
  auto s = cache.add_sequence();
  auto k = qtest::keylike(std::size_t(n), hkv, D, seed), v = qtest::randn(std::size_t(n) * hkv * D, seed + 1);
  cache.append(s, 0, k.data(), v.data(), n * 2 / 3);
  for (int t = n * 2 / 3; t < n; ++t)
    cache.append(s, 0, k.data() + std::size_t(t) * hkv * D, v.data() + std::size_t(t) * hkv * D, 1);
  std::vector<std::vector<float>> K(hkv), V(hkv);
  for (int h = 0; h < hkv; ++h) {
    K[h].resize(std::size_t(n) * D);
    V[h].resize(K[h].size());
    cache.gather(s, 0, h, K[h].data(), V[h].data());
  }
  auto q = qtest::randn(std::size_t(hq) * D, seed + 2, 2.0f);
  std::vector<float> ref(q.size()), out(q.size());
  qtest::reference_attention(K, V, D, q.data(), hq, ref.data());
  kvc::decode_options o;
  o.pool = pool;
  kvc::cpu::decode_attention(cache, s, 0, q.data(), hq, out.data(), o);
  double err = qtest::rel_err(out.data(), ref.data(), out.size());
  // the factored kernel: q.(Q + A B^T + S) with (q.B) A^T, and B (A^T p) for the values
  std::vector<float> out_f(q.size()), lse(hq), lse_ref(hq), probs(std::size_t(hq) * n), gprobs(std::size_t(hkv) * n);
  qtest::reference_attention(K, V, D, q.data(), hq, ref.data(), 0.0f, lse_ref.data());
  kvc::decode_options of;
  of.pool = pool;
  of.lse = lse.data();
  of.probs = probs.data();
  of.group_probs = gprobs.data();
  of.probs_stride = n;
  kvc::cpu::gear_decode_attention(cache, s, 0, q.data(), hq, out_f.data(), of);
  err = std::max(err, qtest::rel_err(out_f.data(), ref.data(), out.size()));
  const int G = hq / hkv;
  for (int qh = 0; qh < hq; ++qh) {
    REQUIRE(std::fabs(lse[qh] - lse_ref[qh]) < 1e-4 * (1 + std::fabs(lse_ref[qh])));
    for (int t = 0; t < n; ++t) {
      double a = 0;
      for (int d = 0; d < D; ++d) a += double(q[std::size_t(qh) * D + d]) * K[qh / G][std::size_t(t) * D + d];
      REQUIRE(std::fabs(probs[std::size_t(qh) * n + t] - std::exp(a / std::sqrt(double(D)) - lse_ref[qh])) < 1e-5);
    }
  }
  for (int h = 0; h < hkv; ++h)
    for (int t = 0; t < n; ++t) {
      double sum = 0;
      for (int g = 0; g < G; ++g) sum += probs[std::size_t(h * G + g) * n + t];
      REQUIRE(std::fabs(sum - gprobs[std::size_t(h) * n + t]) < 1e-5);
    }
  return err;
}

}  // namespace

TEST_CASE("gear: fused and factored attention equal reconstruct-to-fp32 + reference", "[quant][gear][attention]") {
  kvc::thread_pool pool(2);
  std::uint32_t seed = 300;
  for (int n : {1, 31, 32, 100, 333}) {
    INFO("n " << n);
    CHECK(gear_attention_vs_reference(4, 4, 64, n, seed++, nullptr) < 1e-5);
    CHECK(gear_attention_vs_reference(8, 2, 128, n, seed++, &pool) < 1e-5);
  }
}

TEST_CASE("gear: factored scores and value accumulation equal the reconstruction", "[quant][gear][attention]") {
  const int D = 128, G = 32;
  gear<4, G> q;
  const auto x = lowrank_data(G, D, 4, 123);
  std::vector<std::byte> rec(q.record_bytes(role::key, D));
  q.encode<role::key>(x.data(), D, rec.data());
  std::vector<float> dec(std::size_t(G) * D);
  q.decode<role::key>(rec.data(), D, dec.data());
  auto qv = qtest::randn(D, 5);
  auto p = qtest::randn(G, 6);
  std::vector<float> s(G), acc(D, 0.0f);
  q.scores(rec.data(), D, qv.data(), s.data());
  q.accumulate(rec.data(), D, p.data(), acc.data());
  std::vector<float> s_ref(G), acc_ref(D);
  for (int t = 0; t < G; ++t) {
    double a = 0;
    for (int d = 0; d < D; ++d) a += double(qv[d]) * dec[std::size_t(t) * D + d];
    s_ref[t] = float(a);
  }
  for (int d = 0; d < D; ++d) {
    double a = 0;
    for (int t = 0; t < G; ++t) a += double(p[t]) * dec[std::size_t(t) * D + d];
    acc_ref[d] = float(a);
  }
  CHECK(qtest::rel_err(s.data(), s_ref.data(), G) < 1e-5);
  CHECK(qtest::rel_err(acc.data(), acc_ref.data(), D) < 1e-5);
}

TEST_CASE("gear: bad parameters are rejected with clear messages", "[quant][gear]") {
  kvc::quant_cache_config c;
  c.num_kv_heads = 1;
  c.head_dim = 128;
  c.page_size = 32;
  REQUIRE_THROWS_WITH((kvc::quant_cache<gear<4, 32>, gear<4, 32>>(c, gear<4, 32>(33), gear<4, 32>())),
                      Catch::Contains("rank = 33"));
  REQUIRE_THROWS_WITH((kvc::quant_cache<gear<4, 32>, gear<4, 32>>(c, gear<4, 32>(4, 0.7f), gear<4, 32>())),
                      Catch::Contains("outliers = 0.7"));
  c.head_dim = 512;
  REQUIRE_THROWS_WITH((kvc::quant_cache<gear<4, 32>, gear<4, 32>>(c)), Catch::Contains("head_dim = 512"));
  c.head_dim = 128;
  c.page_size = 16;
  REQUIRE_THROWS_WITH((kvc::quant_cache<gear<4, 32>, gear<4, 32>>(c)), Catch::Contains("page_size = 16"));
}
