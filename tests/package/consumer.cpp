// SPDX-License-Identifier: Apache-2.0
// A consumer of kvc: a cache, a few tokens, one decode-attention step. Exit 0 when the output is
// the expected softmax mix of the values.
#include <kvc/kvc.hpp>

#include <cmath>
#include <cstdio>

int main() {
  kvc::cache_config c;
  c.num_kv_heads = 1;
  c.head_dim = 2;
  c.page_size = 2;
  c.max_pages = 8;
  kvc::kv_cache<kvc::half> cache(c);
  const auto s = cache.add_sequence();
  const float k[] = {1, 0, 0, 1, 0, 0}, v[] = {1, 0, 0, 1, 0, 0};
  cache.append(s, 0, k, v, 3);
  const float q[] = {std::sqrt(2.0f) * std::log(2.0f), 0};  // scores: ln2, 0, 0 -> weights 2/4, 1/4, 1/4
  float out[2];
  kvc::cpu::decode_attention(cache, s, 0, q, 1, out);
  std::printf("kvc %d.%d.%d: out = (%g, %g), %zu bytes in use\n", KVC_VERSION_MAJOR, KVC_VERSION_MINOR,
              KVC_VERSION_PATCH, out[0], out[1], cache.bytes_in_use());
  return std::fabs(out[0] - 0.5f) < 1e-5f && std::fabs(out[1] - 0.25f) < 1e-5f ? 0 : 1;
}
