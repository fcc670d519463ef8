// SPDX-License-Identifier: Apache-2.0
// Quickstart: make a paged cache, append a few thousand tokens, run decode attention, print the
// memory the page pool holds.
#include <cstdio>
#include <random>
#include <vector>

#include <kvc/kvc.hpp>

int main() {
  kvc::cache_config cfg;
  cfg.num_layers = 2;
  cfg.num_kv_heads = 8;
  cfg.head_dim = 128;
  cfg.page_size = 16;
  cfg.max_pages = 8192;
  kvc::kv_cache<kvc::half> cache(cfg);
  const kvc::seq_id seq = cache.add_sequence();

  const int tokens = 4096, q_heads = 32, hd = cfg.head_dim, hkv = cfg.num_kv_heads;
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  std::vector<float> k(static_cast<size_t>(tokens) * hkv * hd), v(k.size());
  for (auto& x : k) x = normal(rng);
  for (auto& x : v) x = normal(rng);
  for (int layer = 0; layer < cfg.num_layers; ++layer)  // a 4096-token prefill, in chunks of 512
    for (int t = 0; t < tokens; t += 512)
      cache.append(seq, layer, k.data() + static_cast<size_t>(t) * hkv * hd, v.data() + static_cast<size_t>(t) * hkv * hd, 512);

  std::vector<float> q(static_cast<size_t>(q_heads) * hd), out(q.size());
  for (auto& x : q) x = normal(rng);
  kvc::thread_pool pool(2);
  kvc::decode_options opt;
  opt.pool = &pool;
  kvc::cpu::decode_attention(cache, seq, 0, q.data(), q_heads, out.data(), opt);

  std::printf("tokens per head      %d\n", cache.length(seq, 0, 0));
  std::printf("KV bytes in use      %zu (pool), %.1f per token per layer\n", cache.bytes_in_use(),
              static_cast<double>(cache.bytes_in_use(0)) / tokens);
  std::printf("out[0][0..3]         %.4f %.4f %.4f %.4f\n", out[0], out[1], out[2], out[3]);

  // Keep every other token of head 0 in layer 0: half its pages go back to the pool at once.
  std::vector<int> kept;
  for (int t = 0; t < tokens; t += 2) kept.push_back(t);
  cache.keep(seq, 0, 0, kept.data(), static_cast<int>(kept.size()));
  std::printf("after keep(head 0)   %zu bytes in layer 0\n", cache.bytes_in_use(0));
  return 0;
}
