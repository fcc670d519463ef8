// SPDX-License-Identifier: Apache-2.0
// The run-time storage quest(budget=, sinks=, recent=, dense=) (kvc/runtime/quest_storage.hpp)
// through any_cache: its attention equals kvc::cpu::quest_decode_attention over a kv_cache<half>
// with key bounds holding the same rows (which test_quest.cpp checks against the double
// reference) past the dense layers, and the whole read (a softmax in double over every token)
// in them; it composes with an evictor; bad specs name the argument.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/quest_storage.hpp>
#include <kvc/sparse/quest.hpp>

#include "kvc_catch.hpp"

// Storage headers register nothing by being included (runtime/make_cache.hpp): the storages this
// file builds by spec are registered here, in its own ISA configuration, before any test runs.
[[maybe_unused]] static const bool storages_registered = (kvc::runtime::register_quest_storage(), true);

namespace {

using kvc::cache_config;
using kvc::seq_id;
using Catch::Contains;

std::vector<float> randn(std::size_t n, std::mt19937& g) {
  std::normal_distribution<float> nd;
  std::vector<float> x(n);
  for (float& v : x) v = nd(g);
  return x;
}

}  // namespace

TEST_CASE("quest storage: dense layers read whole, later layers read Quest's pages") {
  cache_config c;
  c.num_layers = 3, c.num_kv_heads = 2, c.head_dim = 32, c.page_size = 8, c.max_pages = 1024;
  auto any = kvc::runtime::make_cache("quest(budget=40,sinks=1,recent=1,dense=1)", c);
  cache_config rc = c;
  rc.key_bounds = true;
  kvc::kv_cache<kvc::half> ref(rc);
  const seq_id s = any->add_sequence(), r = ref.add_sequence();
  std::mt19937 g(7);
  const std::int32_t n = 200, H = 2, D = 32, Hq = 6;
  for (std::int32_t layer = 0; layer < 3; ++layer) {
    const auto k = randn(static_cast<std::size_t>(n) * H * D, g), v = randn(k.size(), g);
    any->append(s, layer, k.data(), v.data(), n, nullptr);
    ref.append(r, layer, k.data(), v.data(), n);
  }
  const auto q = randn(static_cast<std::size_t>(Hq) * D, g);
  std::vector<float> got(q.size()), want(q.size());
  // Layer 0 is dense: every token, against a softmax in double over the fp16 rows.
  any->attention(s, 0, q.data(), Hq, got.data(), {});
  std::vector<float> kr(static_cast<std::size_t>(n) * D), vr(kr.size());
  for (std::int32_t h = 0; h < H; ++h) {
    ref.gather(r, 0, h, kr.data(), vr.data());
    for (std::int32_t gi = 0; gi < Hq / H; ++gi) {
      const float* qh = q.data() + static_cast<std::size_t>(h * (Hq / H) + gi) * D;
      std::vector<double> sc(static_cast<std::size_t>(n));
      double mx = -std::numeric_limits<double>::infinity(), z = 0;
      for (std::int32_t t = 0; t < n; ++t) {
        double x = 0;
        for (std::int32_t d = 0; d < D; ++d) x += double(qh[d]) * kr[static_cast<std::size_t>(t) * D + d];
        sc[static_cast<std::size_t>(t)] = x / std::sqrt(double(D));
        mx = std::max(mx, sc[static_cast<std::size_t>(t)]);
      }
      for (double& x : sc) z += (x = std::exp(x - mx));
      for (std::int32_t d = 0; d < D; ++d) {
        double o = 0;
        for (std::int32_t t = 0; t < n; ++t) o += sc[static_cast<std::size_t>(t)] / z * vr[static_cast<std::size_t>(t) * D + d];
        REQUIRE(std::abs(got[static_cast<std::size_t>(h * (Hq / H) + gi) * D + d] - o) <= 2e-4);
      }
    }
  }
  // Layers 1 and 2: Quest's read, 5 pages of 25 per head.
  kvc::quest_options qo;
  qo.token_budget = 40;
  for (std::int32_t layer = 1; layer < 3; ++layer) {
    any->attention(s, layer, q.data(), Hq, got.data(), {});
    kvc::cpu::quest_decode_attention(ref, r, layer, q.data(), Hq, want.data(), qo);
    for (std::size_t i = 0; i < got.size(); ++i) REQUIRE(got[i] == want[i]);
  }
  // The same bytes as fp16 pages; the bounds are host metadata.
  REQUIRE(any->bytes_in_use() == ref.bytes_in_use());
  REQUIRE(any->metadata_bytes() == ref.metadata_bytes());
  // Eviction through any_cache keeps the bounds exact: Quest still equals the kernel on ref.
  std::vector<std::vector<std::int32_t>> kept(2);
  for (std::int32_t t = 0; t < n; t += 3) kept[0].push_back(t), kept[1].push_back(t + 1);
  any->keep_layer(s, 2, kept);
  ref.keep_layer(r, 2, kept);
  any->attention(s, 2, q.data(), Hq, got.data(), {});
  kvc::cpu::quest_decode_attention(ref, r, 2, q.data(), Hq, want.data(), qo);
  for (std::size_t i = 0; i < got.size(); ++i) REQUIRE(got[i] == want[i]);
}

TEST_CASE("quest storage: bad specs name the argument and the expectation") {
  cache_config c;
  c.num_layers = 2, c.num_kv_heads = 1, c.head_dim = 16, c.page_size = 16;
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache("quest(budget=20)", c),
                      Contains("budget = 20, expected >= (sinks + recent) x page_size = 32 tokens"));
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache("quest(recent=0)", c), Contains("recent = 0, expected >= 1 page"));
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache("quest(sinks=-1)", c), Contains("sinks = -1, expected >= 0"));
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache("quest(dense=-2)", c), Contains("dense = -2, expected >= 0"));
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache("quest(budgt=64)", c), Contains("budgt"));
  // Probabilities would be over a subset of the pages: refused, not silently wrong.
  auto any = kvc::runtime::make_cache("quest(budget=32,dense=0)", c);
  const seq_id s = any->add_sequence();
  std::vector<float> kv(100 * 16, 0.5f), q(16, 1.0f), out(16), probs(128);
  any->append(s, 1, kv.data(), kv.data(), 100, nullptr);
  kvc::decode_options o;
  o.probs = probs.data(), o.probs_stride = 128;
  REQUIRE_THROWS_WITH(any->attention(s, 1, q.data(), 1, out.data(), o), Contains("probs/group_probs are set"));
}
