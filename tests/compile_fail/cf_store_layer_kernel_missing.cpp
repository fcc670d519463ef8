// SPDX-License-Identifier: Apache-2.0
// kvc::decode_attention runs a store's own kernel on that store's layer; the overload lives in the
// kernel's header. Without it, the front door would decode rows it should read as codes, so it
// refuses the heads and names the header to include.
#include <kvc/attention.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/store/quant_cache.hpp>

using cache = kvc::quant_cache<kvc::quant::kivi<2>, kvc::quant::kivi<2>>;

void attend(const cache& c, kvc::seq_id s, const float* q, float* out) {
  cache::layer_buffer buf;
  const auto heads = c.layer(s, 0, buf);
#ifdef KVC_SHOULD_FAIL
  kvc::decode_attention(heads, q, 4, out);
#else
  (void)heads;
  (void)q;
  (void)out;
#endif
}
