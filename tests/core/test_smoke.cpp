// SPDX-License-Identifier: Apache-2.0
#include <kvc/kvc.hpp>
#include "kvc_catch.hpp"

TEST_CASE("a cache holds what was appended", "[core]") {
  kvc::cache_config c;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.page_size = 4;
  c.max_pages = 16;
  kvc::kv_cache<float> cache(c);
  auto s = cache.add_sequence();
  std::vector<float> k(5 * 2 * 8), v(k.size());
  for (size_t i = 0; i < k.size(); ++i) k[i] = float(i), v[i] = -float(i);
  cache.append(s, 0, k.data(), v.data(), 5);
  auto kv = cache.keys(s, 0, 1);
  for (int t = 0; t < 5; ++t)
    for (int d = 0; d < 8; ++d) REQUIRE(kv(t, 0, d) == k[(t * 2 + 1) * 8 + d]);
}
