// SPDX-License-Identifier: Apache-2.0
// A consumer built as engines ship (no -m flags) plus kvc_add_isa_variants(... ISAS avx2): the
// cache make_cache_for_cpu builds runs the AVX2 kernels on a CPU that has them, the baseline ones
// when KVC_ISA forces them, and either attends correctly. Exit 0 when it does.
#include <kvc/runtime/make_cache.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

int main() {
  kvc::cache_config c;
  c.num_kv_heads = 1;
  c.head_dim = 2;
  c.page_size = 2;
  c.max_pages = 8;
  auto cache = kvc::runtime::make_cache_for_cpu("fp16", c);
  const auto s = cache->add_sequence();
  const float k[] = {1, 0, 0, 1, 0, 0}, v[] = {1, 0, 0, 1, 0, 0};
  cache->append(s, 0, k, v, 3);
  const float q[] = {std::sqrt(2.0f) * std::log(2.0f), 0};  // scores: ln2, 0, 0 -> weights 2/4, 1/4, 1/4
  float out[2];
  cache->attention(s, 0, q, 1, out);
  const std::string isa = cache->isa();
  const char* forced = std::getenv("KVC_ISA");
  const bool want_avx2 = (!forced || !*forced) && kvc::detail::cpu_has_avx2_fma_f16c();
  std::printf("make_cache_for_cpu: %s (this TU: %s), out = (%g, %g)\n", isa.c_str(), kvc::cpu::isa_name(), out[0], out[1]);
  if (want_avx2 && isa != "isa_avx2_fma_f16c") return 2;
  if (forced && *forced && isa != forced) return 3;
  return std::fabs(out[0] - 0.5f) < 1e-3f && std::fabs(out[1] - 0.25f) < 1e-3f ? 0 : 1;
}
