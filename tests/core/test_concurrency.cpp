// SPDX-License-Identifier: Apache-2.0
// The threading contract of docs/threading.md under real concurrent workloads, built alone under
// ThreadSanitizer by scripts/test (label tsan):
//  - different sequences of one cache (plain, quantized, mixed precision through any_cache)
//    appended to, compacted and attended from different threads, forked siblings included, with
//    one thread_pool shared by every thread's attention calls;
//  - one compressor per thread, each on its own sequences of one shared kv_cache.
// The oracle is the same workload run serially on a fresh cache: concurrency must change nothing,
// bit for bit, and no page may be lost (bytes_in_use() is 0 once every sequence is removed).

#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <kvc/cpu/decode_attention.hpp>
#include <kvc/evict/compressor.hpp>
#include <kvc/evict/knorm.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/store/kv_cache.hpp>

#include "cache_builders.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

constexpr std::int32_t kLayers = 2, kHeads = 2, kDim = 32, kQHeads = 4;
constexpr std::int32_t kSeqs = 6, kThreads = 3, kSteps = 24, kPrefix = 40;

kvc::cache_config config() {
  return kvc_test::cache_shape(kLayers, kHeads, kDim, 8, 4096);
}

/// Deterministic K/V/Q rows for (sequence slot, step, layer): each slot has its own stream.
std::vector<float> rows(std::uint64_t seed, std::int32_t n) {
  kvc_test::rng r(seed);
  std::vector<float> x(static_cast<std::size_t>(n));
  for (auto& v : x) v = static_cast<float>(r.normal());
  return x;
}

/// One sequence's life after setup: decode steps (append one token per layer, attend), with a
/// compaction of every layer every 8 steps. Returns every attention output, in order.
std::vector<float> decode_life(kvc::runtime::any_cache& c, kvc::seq_id s, std::int32_t slot, kvc::thread_pool* pool) {
  std::vector<float> outs;
  kvc::decode_options opt;
  opt.pool = pool;
  for (std::int32_t step = 0; step < kSteps; ++step) {
    for (std::int32_t l = 0; l < kLayers; ++l) {
      const std::uint64_t base = 1000003u * static_cast<std::uint64_t>(slot) + 1009u * step + 17u * l;
      const auto k = rows(base + 1, kHeads * kDim), v = rows(base + 2, kHeads * kDim), q = rows(base + 3, kQHeads * kDim);
      c.append(s, l, k.data(), v.data(), 1);
      std::vector<float> out(static_cast<std::size_t>(kQHeads) * kDim);
      c.attention(s, l, q.data(), kQHeads, out.data(), opt);
      outs.insert(outs.end(), out.begin(), out.end());
      if (step % 8 == 7) {  // drop every third token of each stream (a fixed, slot-specific pattern)
        std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(kHeads));
        for (std::int32_t h = 0; h < kHeads; ++h)
          for (std::int32_t t = 0; t < c.length(s, l, h); ++t)
            if ((t + slot + h) % 3 != 0) kept[static_cast<std::size_t>(h)].push_back(t);
        c.keep_layer(s, l, kept);
      }
    }
  }
  return outs;
}

/// Exclusive setup: kSeqs sequences, half of them forks of a prefilled parent (their prefix
/// pages are shared, so the threads' first writes copy on write concurrently). Storages that
/// cannot fork (mikv) get kSeqs independent sequences.
std::vector<kvc::seq_id> setup(kvc::runtime::any_cache& c, bool forks) {
  std::vector<kvc::seq_id> ids;
  for (std::int32_t i = 0; i < (forks ? kSeqs / 2 : kSeqs); ++i) {
    const kvc::seq_id s = c.add_sequence();
    for (std::int32_t l = 0; l < kLayers; ++l) {
      const auto k = rows(77u * i + l, kPrefix * kHeads * kDim), v = rows(91u * i + l, kPrefix * kHeads * kDim);
      c.append(s, l, k.data(), v.data(), kPrefix);
    }
    ids.push_back(s);
  }
  if (forks)
    for (std::int32_t i = 0; i < kSeqs / 2; ++i) ids.push_back(c.fork(ids[static_cast<std::size_t>(i)]));
  return ids;
}

void check_storage(const std::string& spec, bool forks = true) {
  INFO("storage " << spec);
  kvc::thread_pool pool(2);  // shared by every thread's attention calls
  // Serial oracle.
  auto ref_cache = kvc::runtime::make_cache(spec, config());
  const auto ref_ids = setup(*ref_cache, forks);
  std::vector<std::vector<float>> expect;
  for (std::int32_t i = 0; i < kSeqs; ++i)
    expect.push_back(decode_life(*ref_cache, ref_ids[static_cast<std::size_t>(i)], i, &pool));
  // The same lives, kThreads at a time.
  auto cache = kvc::runtime::make_cache(spec, config());
  const auto ids = setup(*cache, forks);
  std::vector<std::vector<float>> got(static_cast<std::size_t>(kSeqs));
  std::vector<std::thread> ts;
  for (std::int32_t t = 0; t < kThreads; ++t)
    ts.emplace_back([&, t] {
      for (std::int32_t i = t; i < kSeqs; i += kThreads)  // thread t owns sequences t, t+3: a parent and a fork
        got[static_cast<std::size_t>(i)] = decode_life(*cache, ids[static_cast<std::size_t>(i)], i, &pool);
    });
  for (auto& th : ts) th.join();
  for (std::int32_t i = 0; i < kSeqs; ++i) {
    INFO("sequence slot " << i);
    REQUIRE(got[static_cast<std::size_t>(i)].size() == expect[static_cast<std::size_t>(i)].size());
    REQUIRE(got[static_cast<std::size_t>(i)] == expect[static_cast<std::size_t>(i)]);  // bit for bit
  }
  REQUIRE(cache->bytes_in_use() == ref_cache->bytes_in_use());
  REQUIRE(cache->tokens_held() == ref_cache->tokens_held());
  for (kvc::seq_id s : ids) cache->remove_sequence(s);
  REQUIRE(cache->bytes_in_use() == 0);  // no page leaked by concurrent copy-on-write
}

}  // namespace

TEST_CASE("caches: different sequences written and attended from several threads at once", "[threads][tsan]") {
  for (const char* spec : {"fp16", "fp32", "int4", "kivi"}) check_storage(spec);
  check_storage("mikv(high_ratio=0.5)", false);  // mikv cannot fork
}

TEST_CASE("kv_cache: one compressor per thread, each on its own sequences of one cache", "[threads][tsan]") {
  using kvc::evict::compressor;
  using kvc::evict::knorm;
  auto run = [](kvc::kv_cache<kvc::half>& c, const std::vector<kvc::seq_id>& mine, compressor<knorm>& comp,
                std::vector<std::int64_t>& lengths) {
    for (std::int32_t step = 0; step < kSteps; ++step)
      for (kvc::seq_id s : mine)
        for (std::int32_t l = 0; l < kLayers; ++l) {
          const auto k = rows(31u * s + 7u * step + l, kHeads * kDim), v = rows(37u * s + 5u * step + l, kHeads * kDim);
          c.append(s, l, k.data(), v.data(), 1);
          comp.after_decode_step(c, s, l);
          std::vector<float> kd(static_cast<std::size_t>(c.length(s, l, 0)) * kDim);
          c.gather(s, l, 0, kd.data());
          for (float x : kd) lengths.push_back(static_cast<std::int64_t>(x * 1024.0f));  // contents, quantised
        }
  };
  kvc::evict::compressor_options o;
  o.target = kvc::budget::tokens(12);
  auto make = [] {
    auto c = std::make_unique<kvc::kv_cache<kvc::half>>(config());
    for (std::int32_t i = 0; i < kSeqs; ++i) c->add_sequence();
    return c;
  };
  auto ref = make();
  std::vector<std::vector<std::int64_t>> expect(kThreads), got(kThreads);
  for (std::int32_t t = 0; t < kThreads; ++t) {
    compressor<knorm> comp(knorm{}, o);
    run(*ref, {t, t + kThreads}, comp, expect[static_cast<std::size_t>(t)]);
  }
  auto cache = make();
  std::vector<std::thread> ts;
  for (std::int32_t t = 0; t < kThreads; ++t)
    ts.emplace_back([&, t] {
      compressor<knorm> comp(knorm{}, o);
      run(*cache, {t, t + kThreads}, comp, got[static_cast<std::size_t>(t)]);
    });
  for (auto& th : ts) th.join();
  for (std::int32_t t = 0; t < kThreads; ++t) REQUIRE(got[static_cast<std::size_t>(t)] == expect[static_cast<std::size_t>(t)]);
  REQUIRE(cache->bytes_in_use() == ref->bytes_in_use());
}
