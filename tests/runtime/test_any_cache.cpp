// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <random>
#include <vector>

#include <kvc/parallel/thread_pool.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/quest_storage.hpp>

#include "kvc_catch.hpp"

// Storage headers register nothing by being included (runtime/make_cache.hpp): the storages this
// file builds by spec are registered here, in its own ISA configuration, before any test runs.
[[maybe_unused]] static const bool storages_registered = (kvc::runtime::register_quest_storage(), true);

TEST_CASE("any_cache built from a spec behaves as the concrete cache", "[runtime]") {
  kvc::cache_config cfg;
  cfg.num_layers = 2;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 16;
  cfg.page_size = 4;
  cfg.max_pages = 256;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  const int n = 37, hq = 4;
  std::vector<float> k(static_cast<size_t>(n) * 2 * 16), v(k.size()), q(hq * 16), o1(q.size()), o2(q.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  for (auto& x : q) x = nd(rng);
  for (const char* spec : {"fp32", "fp16", "bf16"}) {
    INFO(spec);
    auto any = kvc::runtime::make_cache(spec, cfg);
    CHECK(any->name() == spec);
    const auto s = any->add_sequence();
    any->append(s, 1, k.data(), v.data(), n);
    any->keep(s, 1, 0, std::vector<int>{1, 5, 30}.data(), 3);
    CHECK(any->length(s, 1, 0) == 3);
    CHECK(any->length(s, 1, 1) == n);
    CHECK(any->positions(s, 1, 0)[2] == 30);
    // Pages: head 0 keeps 3 tokens (1 page), head 1 keeps 37 (10 pages); nothing in layer 0.
    CHECK(any->bytes_in_use(0) == 0);
    CHECK(any->bytes_in_use() == any->bytes_in_use(1));
    CHECK(any->bytes_in_use(1) % 11 == 0);
    any->attention(s, 1, q.data(), hq, o1.data());
    std::vector<float> kd(static_cast<size_t>(n) * 16), vd(kd.size());
    any->gather(s, 1, 1, kd.data(), vd.data());
    // Head 1 (query heads 2 and 3) against a direct double computation over the gathered rows.
    for (int g = 2; g < 4; ++g) {
      std::vector<double> sc(n);
      double mx = -1e300, sum = 0;
      for (int t = 0; t < n; ++t) {
        double a = 0;
        for (int d = 0; d < 16; ++d) a += double(q[g * 16 + d]) * kd[t * 16 + d];
        sc[t] = a / 4.0;
        mx = std::max(mx, sc[t]);
      }
      for (int t = 0; t < n; ++t) sum += std::exp(sc[t] - mx);
      for (int d = 0; d < 16; ++d) {
        double a = 0;
        for (int t = 0; t < n; ++t) a += std::exp(sc[t] - mx) / sum * vd[t * 16 + d];
        CHECK(std::abs(o1[g * 16 + d] - a) <= 1e-5 * (1 + std::abs(a)));
      }
    }
    const auto f = any->fork(s);
    CHECK(any->length(f, 1, 0) == 3);
  }
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache("int3", cfg), Catch::Contains("unknown storage 'int3'"));
}

TEST_CASE("any_cache::attention_batch equals attention() per sequence, batched or not", "[runtime][batch]") {
  kvc::cache_config cfg;
  cfg.num_layers = 2;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 32;
  cfg.page_size = 16;
  cfg.max_pages = 1024;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  const int hq = 4, D = 32;
  kvc::thread_pool pool(2);
  // fp16 and bf16 run the batched kernel; quest (a read policy) runs attention() per sequence.
  for (const char* spec : {"fp16", "bf16", "quest(budget=64,dense=0)"}) {
    INFO(spec);
    auto any = kvc::runtime::make_cache(spec, cfg);
    std::vector<kvc::seq_id> seqs;
    for (int len : {300, 17, 1, 129}) {
      const auto s = any->add_sequence();
      std::vector<float> k(static_cast<size_t>(len) * 2 * D), v(k.size());
      for (auto& x : k) x = nd(rng);
      for (auto& x : v) x = nd(rng);
      any->append(s, 1, k.data(), v.data(), len);
      seqs.push_back(s);
    }
    seqs.push_back(seqs[0]);  // a sequence twice
    const int n = static_cast<int>(seqs.size());
    std::vector<float> q(static_cast<size_t>(n) * hq * D);
    for (auto& x : q) x = nd(rng);
    for (kvc::thread_pool* p : {static_cast<kvc::thread_pool*>(nullptr), &pool}) {
      std::vector<float> out(q.size(), NAN), lse(static_cast<size_t>(n) * hq, NAN);
      kvc::decode_options opt;
      opt.pool = p;
      opt.lse = lse.data();
      any->attention_batch(seqs.data(), n, 1, q.data(), hq, out.data(), opt);
      for (int b = 0; b < n; ++b) {
        std::vector<float> o1(static_cast<size_t>(hq) * D), l1(hq);
        kvc::decode_options one;
        one.lse = l1.data();
        any->attention(seqs[static_cast<size_t>(b)], 1, q.data() + b * hq * D, hq, o1.data(), one);
        for (int i = 0; i < hq * D; ++i)
          REQUIRE(std::fabs(out[static_cast<size_t>(b * hq * D + i)] - o1[static_cast<size_t>(i)]) <= 1e-5f);
        for (int g = 0; g < hq; ++g) REQUIRE(std::fabs(lse[static_cast<size_t>(b * hq + g)] - l1[static_cast<size_t>(g)]) <= 1e-5f);
      }
    }
    // Bad input: named, and nothing written.
    std::vector<float> out(q.size(), 7.0f);
    kvc::seq_id bad[] = {seqs[0], 12345};
    using Catch::Contains;
    REQUIRE_THROWS_WITH(any->attention_batch(bad, 2, 1, q.data(), hq, out.data()),
                        Contains("kvc::runtime::any_cache::attention_batch: seqs[1] = 12345 is not a live sequence"));
    std::vector<float> probs(4096);
    kvc::decode_options with_probs;
    with_probs.probs = probs.data();
    with_probs.probs_stride = 512;
    REQUIRE_THROWS_WITH(any->attention_batch(seqs.data(), n, 1, q.data(), hq, out.data(), with_probs),
                        Contains("expected neither"));
    REQUIRE_THROWS_WITH(any->attention_batch(seqs.data(), 0, 1, q.data(), hq, out.data()), Contains("n = 0"));
    for (float x : out) REQUIRE(x == 7.0f);
  }
}
