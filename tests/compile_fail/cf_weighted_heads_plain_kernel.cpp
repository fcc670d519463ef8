// SPDX-License-Identifier: Apache-2.0
// A merged cache's layer carries per-token log-weights; the plain CPU kernel would ignore them,
// so it refuses those heads at compile time and names the kernel that adds them.
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/store/merged_cache.hpp>

void attend(const kvc::merge::merged_cache<float>& c, kvc::seq_id s, const float* q, float* out) {
  kvc::merge::merged_cache<float>::layer_buffer buf;
  const auto heads = c.layer(s, 0, buf);
#ifdef KVC_SHOULD_FAIL
  kvc::cpu::decode_attention(heads, q, 4, out);
#else
  (void)heads;
  (void)q;
  (void)out;
#endif
}
