// SPDX-License-Identifier: Apache-2.0
// The evict helpers' bad-input errors name the public call (namespace and class included), the
// argument, the value and what was expected, and leave the cache unchanged (support/cache_checks.hpp
// snapshot: K/V, positions, page tables, reference counts, free pages, bytes per layer).

#include <cstdint>
#include <vector>

#include <kvc/attention/rope.hpp>
#include <kvc/evict/compressor.hpp>
#include <kvc/evict/core.hpp>
#include <kvc/evict/knorm.hpp>
#include <kvc/evict/observer.hpp>
#include <kvc/store/kv_cache.hpp>

#include "cache_builders.hpp"
#include "cache_checks.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

struct fixture {
  kvc::kv_cache<float> cache;
  kvc::seq_id s;
  fixture() : cache(config()) {
    s = cache.add_sequence();
    kvc_test::rng r(5);
    for (std::int32_t l = 0; l < 2; ++l) {
      const auto k = r.normals(20 * 2 * 32), v = r.normals(k.size());
      cache.append(s, l, k.data(), v.data(), 20);
    }
  }
  static kvc::cache_config config() { return kvc_test::cache_shape(2, 2, 32, 8, 64); }
  kvc_test::cache_snapshot snap() const { return kvc_test::snapshot(cache, {s}); }
};

}  // namespace

TEST_CASE("evict helpers: errors name the public call, the argument and the value; the cache is unchanged",
          "[evict][errors]") {
  using namespace kvc::evict;
  fixture fx;
  const auto before = fx.snap();
  // apply_layer: a rope of another head size
  kvc::rope_config rc;
  rc.head_dim = 16;
  const kvc::rope r16(rc);
  apply_options ao;
  ao.rerotate = &r16;
  const std::vector<std::vector<std::int32_t>> kept = {{0, 1, 5}, {2, 3}};
  REQUIRE_THROWS_WITH(apply_layer(fx.cache, fx.s, 0, kept, ao),
                      Catch::Contains("kvc::evict::apply_layer: apply_options.rerotate head_dim = 16, expected the "
                                      "cache's head_dim = 32"));
  REQUIRE(fx.snap() == before);
  // gather_layer: query heads that are not a multiple of the kv heads
  gathered_layer g;
  REQUIRE_THROWS_WITH(gather_layer(fx.cache, fx.s, 0, 3, reads_keys, g),
                      Catch::Contains("kvc::evict::gather_layer: num_q_heads = 3, expected a positive multiple of "
                                      "num_kv_heads = 2"));
  // select_top: more tokens kept than there are
  std::vector<float> sc(5, 1.0f);
  std::vector<std::int32_t> out;
  REQUIRE_THROWS_WITH(select_top(sc.data(), 5, 7, protection{}, out),
                      Catch::Contains("kvc::evict::select_top: keep = 7, expected 0..5"));
  REQUIRE_THROWS_WITH(select_top(sc.data(), 5, 2, protection{-1, 0}, out),
                      Catch::Contains("kvc::evict::select_top: protection = {sinks -1, recent 0}, expected both >= 0"));
  // attention_observer
  observer_params op;
  op.forgetting = 0.0f;
  REQUIRE_THROWS_WITH(attention_observer(op),
                      Catch::Contains("kvc::evict::attention_observer::attention_observer: forgetting = 0"));
  attention_observer ob;
  REQUIRE_THROWS_WITH(ob.fork(3, 3), Catch::Contains("kvc::evict::attention_observer::fork: from = to = 3"));
  REQUIRE_THROWS_WITH(ob.observe(fx.cache, fx.s, 0, nullptr, 2, 20),
                      Catch::Contains("kvc::evict::attention_observer::observe: probs = null"));
  std::vector<float> probs(2 * 20, 0.05f);
  REQUIRE_THROWS_WITH(ob.observe(fx.cache, fx.s, 0, probs.data(), 3, 20),
                      Catch::Contains("kvc::evict::attention_observer::observe: num_q_heads = 3"));
  REQUIRE_THROWS_WITH(ob.observe(fx.cache, fx.s, 0, probs.data(), 2, 10),
                      Catch::Contains("kvc::evict::attention_observer::observe: stride = 10, expected >= the stream "
                                      "length 20"));
  // compressor options and the one-shot budget
  compressor_options o;
  // Engaged from the start (what the compressor would pick for knorm anyway): with it left empty,
  // GCC 12 -O2 reports the empty optional's vectors "may be used uninitialized" at o's destruction
  // (a false positive, -Werror in the release17 build, since the store's sequence table changed
  // what gets inlined).
  o.alloc = kvc::allocator::uniform();
  o.interval = 0;
  REQUIRE_THROWS_WITH(compressor<knorm>(knorm{}, o),
                      Catch::Contains("kvc::evict::compressor::compressor: compressor_options.interval = 0, expected >= 1"));
  o.interval = 1;
  o.slack = -2;
  REQUIRE_THROWS_WITH(compressor<knorm>(knorm{}, o),
                      Catch::Contains("kvc::evict::compressor::compressor: compressor_options.slack = -2, expected >= 0"));
  o.slack = 0;
  o.target = kvc::budget::tokens(50);
  compressor<knorm> comp(knorm{}, o);
  REQUIRE_THROWS_WITH(comp.compress(fx.cache, fx.s, 1),
                      Catch::Contains("kvc::evict::compressor::compress: tokens = 50, expected <= the longest stream "
                                      "of layer 1 (20 tokens)"));
  REQUIRE(fx.snap() == before);
}
