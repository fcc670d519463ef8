// SPDX-License-Identifier: Apache-2.0
// Phases: chunked prefill within budget + one chunk, 10,000 decode steps within budget, re-rotation,
// the runtime scorer, lazy layers and CAKE preferences.
#include <algorithm>

#include "cache_builders.hpp"
#include "evict_test_util.hpp"
#include "kvc_catch.hpp"

using namespace kvc::evict;

namespace {
kvc::cache_config small_cfg(int layers, int hkv, int d, int page, int max_pages) {
  return kvc_test::cache_shape(layers, hkv, d, page, max_pages);
}
}  // namespace

TEST_CASE("chunked prefill: peak memory stays within budget + one chunk", "[evict][chunked]") {
  const int L = 2, H = 2, Hq = 4, D = 16, P = 8, chunk = 32, total = 512;
  kvc::kv_cache<float> cache(small_cfg(L, H, D, P, 4096));
  auto s = cache.add_sequence();
  compressor_options o;
  o.target = kvc::budget::ratio(0.75);
  o.num_q_heads = Hq;
  snapkv_params sp;
  sp.window = 8;
  compressor<snapkv> c(snapkv(sp), o);
  std::size_t peak = 0;
  for (int start = 0; start < total; start += chunk) {
    for (int l = 0; l < L; ++l) {
      auto k = kt::randn(std::size_t(chunk) * H * D, 1000 + start + l), v = kt::randn(k.size(), 2000 + start + l);
      auto q = kt::randn(std::size_t(chunk) * Hq * D, 3000 + start + l);
      const int before_seen = cache.seen(s, l);
      cache.append(s, l, k.data(), v.data(), chunk);
      peak = std::max(peak, cache.bytes_in_use());
      for (int h = 0; h < H; ++h) REQUIRE(cache.length(s, l, h) <= int(0.25 * before_seen) + chunk);
      query_window w{q.data(), nullptr, chunk, Hq, D};
      observations obs;
      obs.window = &w;
      c.after_chunk(cache, s, l, obs);
      for (int h = 0; h < H; ++h) {
        REQUIRE(cache.length(s, l, h) == int(0.25 * cache.seen(s, l)));
        // the chunk's last `window` tokens (the window) are kept
        const int32_t* p = cache.positions(s, l, h);
        REQUIRE(p[cache.length(s, l, h) - 1] == cache.seen(s, l) - 1);
      }
    }
  }
  const std::size_t page_bytes = cache.pool().page_bytes();
  REQUIRE(peak <= std::size_t(L) * H * kt::pages_for(total / 4 + chunk, P) * page_bytes);
  REQUIRE(cache.bytes_in_use() == std::size_t(L) * H * kt::pages_for(total / 4, P) * page_bytes);
}

TEST_CASE("decode: 10,000 steps of h2o stay within budget; the observer stays aligned", "[evict][decode]") {
  const int L = 1, H = 2, Hq = 4, D = 8, P = 8, budget_tokens = 64, slack = 16;
  kvc::kv_cache<float> cache(small_cfg(L, H, D, P, 256));
  auto s = cache.add_sequence();
  attention_observer ob;
  compressor_options o;
  o.target = kvc::budget::tokens(budget_tokens);
  o.num_q_heads = Hq;
  o.interval = 32;
  o.slack = slack;
  compressor<h2o> c(h2o(h2o_params{16, 4}), o);
  const std::size_t limit = std::size_t(H) * kt::pages_for(budget_tokens + slack, P) * cache.pool().page_bytes();
  std::mt19937_64 g(5);
  std::normal_distribution<float> nd;
  std::vector<float> k(std::size_t(H) * D), v(k.size()), q(std::size_t(Hq) * D), out(q.size());
  std::vector<float> probs(std::size_t(Hq) * (budget_tokens + slack + 1));
  int compressions = 0;
  for (int step = 0; step < 10000; ++step) {
    for (auto& x : k) x = nd(g);
    for (auto& x : v) x = nd(g);
    for (auto& x : q) x = nd(g);
    cache.append(s, 0, k.data(), v.data(), 1);
    const int n = cache.length(s, 0, 0);
    if (n > budget_tokens + slack + 1) FAIL("step " << step << ": " << n << " tokens");
    kvc::decode_options opt;
    opt.probs = probs.data();
    opt.probs_stride = budget_tokens + slack + 1;
    if (step % 16 == 0) {  // real attention probabilities now and then ...
      kvc::cpu::decode_attention(cache, s, 0, q.data(), Hq, out.data(), opt);
    } else {  // ... and cheap random distributions in between, to keep the test fast under ASan
      for (int qh = 0; qh < Hq; ++qh) {
        float* r = probs.data() + std::size_t(qh) * opt.probs_stride;
        float z = 0;
        for (int t = 0; t < n; ++t) z += (r[t] = std::exp(nd(g)));
        for (int t = 0; t < n; ++t) r[t] /= z;
      }
    }
    ob.observe(cache, s, 0, probs.data(), Hq, opt.probs_stride);
    observations obs;
    obs.attention = &ob;
    compressions += c.after_decode_step(cache, s, 0, obs).compressed;
    bool ok = cache.bytes_in_use() <= limit;
    for (int h = 0; h < H; ++h)
      ok = ok && ob.find(s, 0, h)->sum.size() == std::size_t(cache.length(s, 0, h)) &&
           cache.length(s, 0, h) <= budget_tokens + slack;
    if (!ok) FAIL("step " << step << ": over budget or observer out of sync");
  }
  REQUIRE(cache.seen(s, 0) == 10000);
  REQUIRE(compressions > 100);
  // the protected sinks survived 10,000 steps
  for (int h = 0; h < H; ++h)
    for (int t = 0; t < 4; ++t) REQUIRE(cache.positions(s, 0, h)[t] == t);
}

TEST_CASE("decode: a ratio of the tokens seen", "[evict][decode]") {
  kvc::kv_cache<float> cache(small_cfg(1, 2, 8, 4, 1024));
  auto s = cache.add_sequence();
  compressor_options o;
  o.target = kvc::budget::ratio(0.5);
  o.interval = 10;
  compressor<knorm> c(knorm{}, o);
  for (int step = 0; step < 400; ++step) {
    auto k = kt::randn(16, 100 + step), v = kt::randn(16, 900 + step);
    cache.append(s, 0, k.data(), v.data(), 1);
    c.after_decode_step(cache, s, 0);
    REQUIRE(cache.length(s, 0, 0) <= cache.seen(s, 0) / 2 + 10);
  }
  REQUIRE(cache.length(s, 0, 0) == 200);  // step 400 is a multiple of the interval
}

TEST_CASE("decode: a fork compresses on its source's steps (compressor::fork)", "[evict][decode][fork]") {
  // interval 10 with slack 20: compression is due on every 10th step of a layer, or when a stream
  // runs 20 tokens past its target. A fork taken between two due steps must keep its source's
  // count, or it compresses on other steps and holds another number of tokens (beam search).
  for (const bool fork_counters : {true, false}) {
    kvc::kv_cache<float> cache(small_cfg(2, 2, 8, 4, 4096));
    const auto a = cache.add_sequence();
    compressor_options o;
    o.target = kvc::budget::ratio(0.5);
    o.interval = 10;
    o.slack = 20;
    compressor<knorm> c(knorm{}, o);
    auto step = [&](kvc::seq_id s, int i) {
      for (int layer = 0; layer < 2; ++layer) {
        auto k = kt::randn(16, 100 + i), v = kt::randn(16, 900 + i);
        cache.append(s, layer, k.data(), v.data(), 1);
        c.after_decode_step(cache, s, layer);
      }
    };
    for (int i = 0; i < 237; ++i) step(a, i);
    const auto b = cache.fork(a);
    if (fork_counters) c.fork(a, b);
    int differ = 0;
    for (int i = 237; i < 300; ++i) {
      step(a, i);
      step(b, i);
      for (int layer = 0; layer < 2; ++layer)
        for (int h = 0; h < 2; ++h) {
          const int n = cache.length(a, layer, h);
          differ += n != cache.length(b, layer, h) ||
                    !std::equal(cache.positions(a, layer, h), cache.positions(a, layer, h) + n, cache.positions(b, layer, h));
        }
    }
    INFO("compressor::fork called: " << fork_counters);
    CHECK((differ == 0) == fork_counters);  // without the counters the fork falls out of step
  }
  compressor<knorm> c(knorm{}, compressor_options{});
  kvc::kv_cache<float> cache(small_cfg(1, 1, 8, 4, 64));
  const auto s = cache.add_sequence();
  auto k = kt::randn(8, 1), v = kt::randn(8, 2);
  cache.append(s, 0, k.data(), v.data(), 1);
  c.after_decode_step(cache, s, 0);
  const auto t = cache.fork(s);
  REQUIRE_THROWS_WITH(c.fork(s, s), Catch::Contains("kvc::evict::compressor::fork: from = to = 0, expected two different"));
  c.fork(s, t);
  REQUIRE_THROWS_WITH(c.fork(s, t), Catch::Contains("kvc::evict::compressor::fork: to = 1, expected a sequence with no "
                                                    "decode step counters yet"));
}

TEST_CASE("re-rotation moves kept keys to contiguous positions (StreamingLLM)", "[evict][rerotate]") {
  const int D = 16, n = 40;
  kvc::rope_config rc;
  rc.head_dim = D;
  kvc::rope r(rc);
  kvc::kv_cache<float> cache(small_cfg(1, 1, D, 8, 64));
  auto s = cache.add_sequence();
  auto pre = kt::randn(std::size_t(n) * D, 77);
  auto k = pre;
  for (int t = 0; t < n; ++t) r.apply(k.data() + std::size_t(t) * D, t);
  auto v = kt::randn(k.size(), 78);
  cache.append(s, 0, k.data(), v.data(), n);
  compressor_options o;
  o.target = kvc::budget::tokens(12);
  o.rerotate = &r;
  compressor<streaming_llm> c(streaming_llm{}, o);
  c.after_prefill(cache, s, 0);
  REQUIRE(cache.length(s, 0, 0) == 12);
  std::vector<float> got(std::size_t(12) * D);
  cache.gather(s, 0, 0, got.data());
  const int old_pos[12] = {0, 1, 2, 3, 32, 33, 34, 35, 36, 37, 38, 39};
  for (int i = 0; i < 12; ++i) {
    REQUIRE(cache.positions(s, 0, 0)[i] == i);
    std::vector<float> want(pre.begin() + std::ptrdiff_t(old_pos[i]) * D, pre.begin() + std::ptrdiff_t(old_pos[i] + 1) * D);
    r.apply(want.data(), i);
    for (int d = 0; d < D; ++d) REQUIRE(got[std::size_t(i) * D + d] == Approx(want[d]).margin(1e-4));
  }
}

TEST_CASE("any_scorer: one runtime type, same result as the typed compressor", "[evict][any]") {
  kt::filled a({}, 60, 90), b({}, 60, 90);
  compressor_options o;
  o.target = kvc::budget::ratio(0.5);
  o.num_q_heads = 4;
  compressor<keydiff> typed(keydiff{}, o);
  compressor<any_scorer> erased(any_scorer(keydiff{}), o);
  typed.compress(a.cache, a.seq, 0);
  erased.compress(b.cache, b.seq, 0);
  for (int h = 0; h < 2; ++h)
    REQUIRE(std::equal(a.cache.positions(a.seq, 0, h), a.cache.positions(a.seq, 0, h) + 30, b.cache.positions(b.seq, 0, h)));
  REQUIRE(any_scorer(snapkv{}).what() == observes::query_window);
  REQUIRE(any_scorer(h2o{}).what() == observes::attention);
  REQUIRE(any_scorer(expected_attention{}).what() == observes::query_stats);
  REQUIRE(any_scorer(knorm{}).what() == observes::nothing);
  REQUIRE(any_scorer(pyramidkv{}).preferred_allocator().type == kvc::allocator::kind::pyramid);
  REQUIRE(std::string(any_scorer(chunkkv<knorm>{}).scorer_name()) == "chunkkv");
  REQUIRE(any_scorer(h2o{}).runtime_reads() == reads_nothing);
}

TEST_CASE("expected attention and q-stats at decode; leverage, lagkv, curdkv compress", "[evict][smoke]") {
  kt::filled f({}, 300, 91);
  kvc::rope_config rc;
  rc.head_dim = 16;
  kvc::rope r(rc);
  query_stats_accumulator acc(4, 16);
  auto q = kt::randn(std::size_t(50) * 4 * 16, 92);
  acc.add(q.data(), 50);
  auto qs = acc.view(&r);
  observations obs;
  obs.stats = &qs;
  compressor_options o;
  o.target = kvc::budget::ratio(0.8);
  o.num_q_heads = 4;
  compressor<expected_attention>(expected_attention{}, o).compress(f.cache, f.seq, 0, obs);
  REQUIRE(f.cache.length(f.seq, 0, 1) == 60);
  lagkv_params lp;
  lp.lag = 32;
  compressor<lagkv>(lagkv(lp), o).compress(f.cache, f.seq, 1);
  REQUIRE(f.cache.length(f.seq, 1, 0) == 60);
  kt::filled g({}, 200, 93);
  compressor<leverage>(leverage{}, o).compress(g.cache, g.seq, 0);
  compressor<curdkv>(curdkv{}, o).compress(g.cache, g.seq, 1);
  REQUIRE(g.cache.length(g.seq, 0, 0) == 40);
  REQUIRE(g.cache.length(g.seq, 1, 0) == 40);
}

TEST_CASE("simlayerkv compresses lazy layers only; cake preferences scale layer budgets", "[evict][layers]") {
  kt::filled f({}, 100, 94);
  auto q = kt::randn(std::size_t(4) * 4 * 16, 95);
  query_window w{q.data(), nullptr, 4, 4, 16};
  observations obs;
  obs.window = &w;
  compressor_options o;
  o.num_q_heads = 4;
  simlayerkv_params sp;
  sp.n_recent = 10;
  sp.lazy_threshold = 0.0f;  // every layer is lazy
  compressor<simlayerkv>(simlayerkv(sp), o).after_prefill(f.cache, f.seq, 0, obs);
  REQUIRE(f.cache.length(f.seq, 0, 0) == 14);
  sp.lazy_threshold = 1.0f;  // kvpress default: off
  compressor<simlayerkv>(simlayerkv(sp), o).after_prefill(f.cache, f.seq, 1, obs);
  REQUIRE(f.cache.length(f.seq, 1, 0) == 100);

  kt::filled g({}, 100, 96);
  std::vector<double> pref;
  for (int l = 0; l < 2; ++l) {
    gathered_layer gl;
    gather_layer(g.cache, g.seq, l, 4, reads_keys, gl);
    pref.push_back(cake_preference(gl.in, w));
    REQUIRE(pref.back() > 0);
  }
  o.target = kvc::budget::ratio(0.5);
  o.alloc = kvc::allocator::cake(pref);
  compressor<knorm> c(knorm{}, o);
  for (int l = 0; l < 2; ++l) c.after_prefill(g.cache, g.seq, l);
  // Two layers of 100 tokens at ratio 0.5: 100 tokens in all, split by preference (a share above
  // 100 is capped and the rest goes to the other layer), every head of a layer alike.
  const double x0 = std::min(100.0, 100.0 * pref[0] / (pref[0] + pref[1]));
  const int k0 = g.cache.length(g.seq, 0, 0), k1 = g.cache.length(g.seq, 1, 0);
  REQUIRE(k0 + k1 == 100);
  REQUIRE(std::abs(k0 - x0) < 1.0);
  REQUIRE(g.cache.length(g.seq, 0, 1) == k0);
  REQUIRE(g.cache.length(g.seq, 1, 1) == k1);
}

TEST_CASE("plan hands out the scorer's scores and seen_budget the phases' budget", "[evict][plan]") {
  // knorm scores token t by -|k_t| (kvc/evict/knorm.hpp); the reference norm is computed here in
  // double from the keys the cache stores.
  const int H = 3, D = 12;
  kvc::kv_cache<float> cache(small_cfg(1, H, D, 4, 512));
  auto s = cache.add_sequence();
  const int n = 57;
  auto k = kt::randn(std::size_t(n) * H * D, 4242), v = kt::randn(k.size(), 4243);
  cache.append(s, 0, k.data(), v.data(), n);
  compressor_options o;
  o.target = kvc::budget::ratio(0.75);
  compressor<knorm> c(knorm{}, o);
  layer_scores sc;
  const layer_selection sel = c.plan(cache, s, 0, {}, o.target, &sc);
  REQUIRE(sc.size() == std::size_t(H));
  for (int h = 0; h < H; ++h) {
    REQUIRE(sc[std::size_t(h)].size() == std::size_t(n));
    std::vector<float> kh(std::size_t(n) * D);
    cache.gather(s, 0, h, kh.data());
    for (int t = 0; t < n; ++t) {
      double q = 0;
      for (int d = 0; d < D; ++d) q += double(kh[std::size_t(t) * D + d]) * kh[std::size_t(t) * D + d];
      REQUIRE(std::fabs(sc[std::size_t(h)][std::size_t(t)] + std::sqrt(q)) <= 1e-5 * (1 + std::sqrt(q)));
    }
    // The selection is what plan without the scores gives.
    REQUIRE(sel[std::size_t(h)] == c.plan(cache, s, 0, {}, o.target)[std::size_t(h)]);
  }
  // A ratio applies to the tokens seen: 57 seen, 25% kept.
  REQUIRE(c.seen_budget(cache, s, 0).type == kvc::budget::kind::tokens);
  REQUIRE(c.seen_budget(cache, s, 0).value == kvc::budget::ratio(0.75).keep_count(n));
  compressor_options ot;
  ot.target = kvc::budget::tokens(9);
  REQUIRE(compressor<knorm>(knorm{}, ot).seen_budget(cache, s, 0).value == 9);
}
