// SPDX-License-Identifier: Apache-2.0
// Long decode stays bounded: 20,000 decode steps of a 2-layer, 2-kv-head model (GQA 2) on a KIVI-2
// quant_cache (group 32, residual window 32) with a decode-time evictor (h2o, then tova) through
// the compressor and the attention observer. Every step checks
//  - each stream holds <= budget + slack tokens after the compressor ran;
//  - bytes_in_use <= layers x heads x (pages_for(budget + slack + 1) quant pages + 1 residual page):
//    eviction keeps quantized codes compacted (a trailing partial group stays quantized) and never
//    takes a new page, so the pools cannot creep;
// and over the run, the process's resident set (/proc/self/statm) grows by at most 8 MiB after a
// 2,000-step warm-up. Everything the loop touches is bounded (pages are reused from the free list,
// the observer is compacted with the cache, scratch buffers are reused); 8 MiB covers the
// allocator's own high-water marks and is ~30x the whole cache's pages here (a leak of one page or
// one position per step would add 20,000 x >= 4 bytes per stream, and an unbounded residual or
// quant pool 20,000 tokens x 2 bytes x 32 dims x 2 (K,V) x 4 streams = 10 MB).
// Under AddressSanitizer (quarantine keeps freed memory resident) the RSS bound is not checked and
// the run is cut to 3,000 steps (KVC_LONG_DECODE_STEPS), to keep the sanitizer job short.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include <kvc/cpu/quant_attention.hpp>
#include <kvc/evict/compressor.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/evict/observer.hpp>
#include <kvc/evict/tova.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/store/quant_cache.hpp>

#include "cache_builders.hpp"
#include "kvc_catch.hpp"

#if defined(__SANITIZE_ADDRESS__)
#define KVC_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KVC_TEST_ASAN 1
#endif
#endif

#ifndef KVC_LONG_DECODE_STEPS
#if defined(KVC_TEST_ASAN)
#define KVC_LONG_DECODE_STEPS 3000
#else
#define KVC_LONG_DECODE_STEPS 20000
#endif
#endif

namespace {

std::size_t rss_bytes() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return 0;
  unsigned long size = 0, resident = 0;
  const int got = std::fscanf(f, "%lu %lu", &size, &resident);
  std::fclose(f);
  return got == 2 ? resident * 4096ul : 0;
}

template <class Scorer>
void long_decode(const Scorer& scorer, std::uint64_t seed) {
  using C = kvc::quant_cache<kvc::quant::kivi<2>, kvc::quant::kivi<2>>;
  constexpr int L = 2, H = 2, Hq = 4, D = 32, budget = 96, slack = 16, steps = KVC_LONG_DECODE_STEPS;
  auto cfg = kvc_test::shape_as<kvc::quant_cache_config>(kvc_test::cache_shape(L, H, D, 32, 256));
  cfg.max_fp_pages = 16;
  kvc::quant::kivi<2> q;
  q.residual_tokens = 32;
  C cache(cfg, q, q);
  const auto s = cache.add_sequence();
  kvc::evict::attention_observer ob;
  kvc::evict::compressor_options o;
  o.target = kvc::budget::tokens(budget);
  o.num_q_heads = Hq;
  o.interval = 16;
  o.slack = slack;
  kvc::evict::compressor<Scorer> comp(scorer, o);
  const auto pages_for = [](int t) { return (t + 31) / 32; };
  const std::size_t limit = std::size_t{L} * H *
                            (pages_for(budget + slack + 1) * cache.quant_pool().page_bytes() +
                             cache.residual_pool()->page_bytes());
  const int stride = budget + slack + 2;
  std::mt19937_64 g(seed);
  std::normal_distribution<float> nd;
  std::vector<float> k(std::size_t{H} * D), v(k.size()), qv(std::size_t{Hq} * D), out(qv.size());
  std::vector<float> probs(std::size_t{Hq} * stride);
  std::size_t rss0 = 0, peak = 0;
  std::int64_t compressions = 0;
  for (int step = 0; step < steps; ++step) {
    if (step == 2000 || (steps <= 2000 && step == 0)) rss0 = rss_bytes();
    for (int l = 0; l < L; ++l) {
      for (auto& x : k) x = nd(g);
      for (auto& x : v) x = nd(g);
      for (auto& x : qv) x = nd(g);
      cache.append(s, l, k.data(), v.data(), 1);
      const int n = cache.length(s, l, 0);
      if (n > budget + slack + 1) FAIL("step " << step << " layer " << l << ": " << n << " tokens before compressing");
      if (step % 8 == 0) {  // real attention probabilities now and then, random ones in between (fast under ASan)
        kvc::decode_options opt;
        opt.probs = probs.data();
        opt.probs_stride = stride;
        kvc::cpu::decode_attention(cache, s, l, qv.data(), Hq, out.data(), opt);
      } else {
        for (int qh = 0; qh < Hq; ++qh) {
          float* r = probs.data() + std::size_t(qh) * stride;
          float z = 0;
          for (int t = 0; t < n; ++t) z += (r[t] = std::exp(nd(g)));
          for (int t = 0; t < n; ++t) r[t] /= z;
        }
      }
      ob.observe(cache, s, l, probs.data(), Hq, stride);
      kvc::evict::observations obs;
      obs.attention = &ob;
      const auto rep = comp.after_decode_step(cache, s, l, obs);
      compressions += rep.compressed;
      if (rep.bytes_allocated != 0) FAIL("step " << step << ": a decode-time eviction allocated " << rep.bytes_allocated);
      for (int h = 0; h < H; ++h)
        if (cache.length(s, l, h) > budget + slack)
          FAIL("step " << step << " layer " << l << " head " << h << ": " << cache.length(s, l, h) << " tokens");
    }
    peak = std::max(peak, cache.bytes_in_use());
    if (cache.bytes_in_use() > limit) FAIL("step " << step << ": " << cache.bytes_in_use() << " bytes > " << limit);
  }
  REQUIRE(cache.seen(s, 0) == steps);
  REQUIRE(compressions > steps / 16);
  const std::size_t rss1 = rss_bytes();
  INFO(Scorer::name << ": " << steps << " steps, peak " << peak << " bytes (limit " << limit << "), RSS " << rss0
                    << " -> " << rss1);
#if !defined(KVC_TEST_ASAN)
  REQUIRE(rss0 > 0);
  REQUIRE(rss1 <= rss0 + (std::size_t{8} << 20));
#endif
  std::printf("%s: %d steps, peak %zu bytes (limit %zu), RSS %zu -> %zu\n", Scorer::name, steps, peak, limit, rss0,
              rss1);
  // the protected sinks survived
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < 4; ++t) REQUIRE(cache.positions(s, l, h)[t] == t);
}

}  // namespace

TEST_CASE("20,000 decode steps of h2o on KIVI-2 stay within the budget's pages and a flat RSS", "[evict][decode][long]") {
  long_decode(kvc::evict::h2o(kvc::evict::h2o_params{32, 4}), 41);
}

TEST_CASE("20,000 decode steps of tova on KIVI-2 stay within the budget's pages and a flat RSS", "[evict][decode][long]") {
  long_decode(kvc::evict::tova(), 42);
}
