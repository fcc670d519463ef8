// SPDX-License-Identifier: Apache-2.0
// Eviction composes with quantization: the same compressor compacts a quant_cache (KIVI-2 pages)
// and its pool bytes fall; re-rotation is refused with a clear error since quantized keys cannot
// be rewritten in place.
#include <algorithm>

#include <kvc/evict/evict.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/store/quant_cache.hpp>

#include "evict_test_util.hpp"
#include "kvc_catch.hpp"

using namespace kvc::evict;

TEST_CASE("compressor works on a quant_cache (KIVI-2): exact budgets, bytes fall", "[evict][quant]") {
  kvc::quant_cache_config c;
  c.num_layers = 1;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.page_size = 32;
  c.max_pages = 256;
  c.max_fp_pages = 32;
  kvc::quant_cache<kvc::quant::kivi<2>, kvc::quant::kivi<2>> cache(c);
  auto s = cache.add_sequence();
  const int n = 400;
  auto k = kt::randn(std::size_t(n) * 2 * 64, 1), v = kt::randn(k.size(), 2);
  cache.append(s, 0, k.data(), v.data(), n);
  const std::size_t before = cache.bytes_in_use();
  compressor_options o;
  o.target = kvc::budget::ratio(0.75);
  compressor<knorm> comp(knorm{}, o);
  auto rep = comp.compress(cache, s, 0);
  REQUIRE(rep.compressed);
  for (int h = 0; h < 2; ++h) {
    REQUIRE(cache.length(s, 0, h) == 100);
    const int32_t* p = cache.positions(s, 0, h);
    REQUIRE(std::is_sorted(p, p + 100));
    for (int t = 0; t < 4; ++t) REQUIRE(p[t] == t);
  }
  REQUIRE(cache.bytes_in_use() < before);
  // decode-time h2o on the quantized cache, with the observer compacted alongside
  attention_observer ob;
  compressor_options od;
  od.target = kvc::budget::tokens(64);
  compressor<h2o> dec(h2o(h2o_params{8, 4}), od);
  std::vector<float> probs(std::size_t(2) * 200);
  for (int step = 0; step < 150; ++step) {
    auto kn = kt::randn(2 * 64, 100 + step), vn = kt::randn(2 * 64, 300 + step);
    cache.append(s, 0, kn.data(), vn.data(), 1);
    const int len = cache.length(s, 0, 0);
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < len; ++t) probs[std::size_t(h) * 200 + t] = 1.0f / len;
    ob.observe(cache, s, 0, probs.data(), 2, 200);
    observations obs;
    obs.attention = &ob;
    dec.after_decode_step(cache, s, 0, obs);
    REQUIRE(cache.length(s, 0, 0) <= 64);
  }
  kvc::rope_config rc;
  rc.head_dim = 64;
  kvc::rope r(rc);
  compressor_options orr;
  orr.target = kvc::budget::tokens(10);
  orr.rerotate = &r;
  compressor<knorm> rr(knorm{}, orr);
  const std::size_t b2 = cache.bytes_in_use();
  REQUIRE_THROWS_WITH(rr.compress(cache, s, 0), Catch::Contains("rewrite_keys"));
  REQUIRE(cache.length(s, 0, 0) == 64);
  REQUIRE(cache.bytes_in_use() == b2);
}
