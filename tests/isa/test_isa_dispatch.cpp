// SPDX-License-Identifier: Apache-2.0
// kvc::runtime::make_cache_for_cpu (docs/isa.md, "Choosing the ISA at run time"). This TU is built
// with the toolchain's default flags (x86-64: SSE2, as most engines ship); kvc_add_isa_variants
// adds a TU built with -mavx2 -mfma -mf16c that registers its make_cache (tests/isa/CMakeLists.txt).
// make_cache_for_cpu must build AVX2 caches on a CPU with AVX2, the baseline ones when forced
// (the `isa` argument or KVC_ISA: the fallback path, tested on this machine), fall back to a
// configuration that has the storage, and name every bad choice. Each cache's attention is
// checked against a dense double reference over what it holds.
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include <kvc/runtime/isa_dispatch.hpp>
#include <kvc/runtime/layered_storage.hpp>  // registered below, and in the AVX2 TU
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/merge_registry.hpp>
#include <kvc/runtime/merged_storage.hpp>  // registered below, and in the AVX2 TU (tests/isa/CMakeLists.txt)
#include <kvc/runtime/quest_storage.hpp>   // registered below, in this TU's configuration only

#include "dense_reference.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

// Storage headers register nothing by being included (runtime/make_cache.hpp): the storages this
// file builds by spec are registered here, in its own ISA configuration, before any test runs.
[[maybe_unused]] static const bool storages_registered =
    (kvc::runtime::register_quest_storage(), kvc::runtime::register_merged_storage(),
     kvc::runtime::register_layered_storage(), true);

namespace {

const char* const avx2_name = "isa_avx2_fma_f16c";

/// A merged cache's log-weights of one stream; empty for any other cache.
std::vector<float> log_weights(const kvc::runtime::any_cache& c, kvc::seq_id s, std::int32_t head) {
  if (const auto* f16 = c.merged_fp16()) return f16->log_weights(s, 0, head);
  if (const auto* f32 = c.merged_fp32()) return f32->log_weights(s, 0, head);
  return {};
}

/// Attention over layer 0 of s against the dense reference over what the cache holds (gather(),
/// and a merged cache's log-weights as the logits' bias).
void require_reference_attention(const kvc::runtime::any_cache& c, kvc::seq_id s, const std::vector<float>& q,
                                 std::int32_t hq) {
  const std::int32_t H = c.config().num_kv_heads, D = c.config().head_dim;
  std::vector<kvc_test::dense_head> heads(static_cast<std::size_t>(H));
  for (std::int32_t h = 0; h < H; ++h) {
    const std::int32_t len = c.length(s, 0, h);
    std::vector<float> kd(static_cast<std::size_t>(len) * D), vd(kd.size());
    c.gather(s, 0, h, kd.data(), vd.data());
    auto& dh = heads[static_cast<std::size_t>(h)];
    dh.n = len;
    dh.k.assign(kd.begin(), kd.end());
    dh.v.assign(vd.begin(), vd.end());
    const std::vector<float> lw = log_weights(c, s, h);
    dh.bias.assign(lw.begin(), lw.end());
  }
  std::vector<float> out(q.size());
  c.attention(s, 0, q.data(), hq, out.data());
  const auto ref = kvc_test::dense_decode_attention(heads, D, q.data(), hq, 1.0 / std::sqrt(double(D)));
  for (std::size_t i = 0; i < out.size(); ++i)
    REQUIRE(std::fabs(out[i] - ref.out[i]) <= 2e-5 * (1 + std::fabs(ref.out[i])));
}

/// Appends random tokens to layer 0 of a fresh sequence, attends, and compares with the dense
/// reference over gather().
void check_cache(kvc::runtime::any_cache& c, std::uint64_t seed) {
  const auto& cfg = c.config();
  const std::int32_t H = cfg.num_kv_heads, D = cfg.head_dim, hq = 2 * H, n = 77;
  kvc_test::rng r(seed);
  const auto k = r.normals(static_cast<std::size_t>(n) * H * D), v = r.normals(k.size()),
             q = r.normals(static_cast<std::size_t>(hq) * D);
  const auto s = c.add_sequence();
  c.append(s, 0, k.data(), v.data(), n);
  require_reference_attention(c, s, q, hq);
}

kvc::cache_config config() {
  kvc::cache_config cfg;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 64;
  cfg.max_pages = 256;
  return cfg;
}

}  // namespace

TEST_CASE("every ISA configuration of the program is registered with its rank", "[isa][dispatch]") {
  const auto& vs = kvc::runtime::isa_variants();
  const std::string base = kvc::cpu::isa_name();
  INFO("this TU: " << base);
  REQUIRE(base != avx2_name);  // the point of the test: a TU without -mavx2
  const kvc::runtime::isa_variant* b = nullptr;
  const kvc::runtime::isa_variant* a = nullptr;
  for (const auto& v : vs) {
    if (v.name == base) b = &v;
    if (v.name == std::string(avx2_name)) a = &v;
  }
  REQUIRE(vs.size() == 2);
  REQUIRE(b != nullptr);
  REQUIRE(a != nullptr);
  REQUIRE(a->rank > b->rank);
  REQUIRE(b->runs_here());  // this TU runs here, so its configuration does
  REQUIRE(a->runs_here() == kvc::detail::cpu_has_avx2_fma_f16c());
  REQUIRE(b->has_storage("quest"));
  REQUIRE_FALSE(a->has_storage("quest"));
  REQUIRE(a->has_storage("fp16"));
}

TEST_CASE("make_cache_for_cpu builds with the best configuration this CPU runs", "[isa][dispatch]") {
  const std::string base = kvc::cpu::isa_name();
  const bool avx2 = kvc::detail::cpu_has_avx2_fma_f16c();
  ::unsetenv("KVC_ISA");
  for (const char* spec : {"fp16", "bf16", "fp32"}) {
    INFO(spec);
    auto best = kvc::runtime::make_cache_for_cpu(spec, config());
    REQUIRE(best->name() == spec);
    REQUIRE(std::string(best->isa()) == (avx2 ? std::string(avx2_name) : base));
    check_cache(*best, 1);
    // The fallback, forced by argument and by the environment: the baseline kernels, same answer.
    auto forced = kvc::runtime::make_cache_for_cpu(spec, config(), {}, base.c_str());
    REQUIRE(std::string(forced->isa()) == base);
    check_cache(*forced, 1);
    ::setenv("KVC_ISA", base.c_str(), 1);
    REQUIRE(std::string(kvc::runtime::make_cache_for_cpu(spec, config())->isa()) == base);
    ::unsetenv("KVC_ISA");
  }
  // make_cache itself still builds the calling TU's configuration (docs/isa.md).
  REQUIRE(std::string(kvc::runtime::make_cache("fp16", config())->isa()) == base);
  // A storage only this TU's configuration registered: built there.
  auto q = kvc::runtime::make_cache_for_cpu("quest(budget=128,dense=0)", config());  // budget >= the 77 tokens: every page read
  REQUIRE(std::string(q->isa()) == base);
  check_cache(*q, 2);
  // layers(...) is registered in both; the configuration must know every part too: with a quest
  // part only this TU's does, with plain parts the best one.
  const char* mixed = "layers(fp16, l0=quest(budget=128,dense=0))";
  REQUIRE(std::string(kvc::runtime::make_cache_for_cpu(mixed, config())->isa()) == base);
  check_cache(*kvc::runtime::make_cache_for_cpu(mixed, config()), 3);
  auto plain = kvc::runtime::make_cache_for_cpu("layers(fp16, l0=fp32)", config());
  REQUIRE(std::string(plain->isa()) == (avx2 ? std::string(avx2_name) : base));
  check_cache(*plain, 4);
}

TEST_CASE("make_cache_for_cpu names a configuration it cannot use", "[isa][dispatch][errors]") {
  using Catch::Contains;
  ::unsetenv("KVC_ISA");
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache_for_cpu("fp16", config(), {}, "isa_nonesuch"),
                      Contains("kvc::runtime::make_cache_for_cpu: isa = \"isa_nonesuch\" (argument or KVC_ISA) is not "
                               "registered, expected one of: ") &&
                          Contains(avx2_name));
  ::setenv("KVC_ISA", "isa_nonesuch", 1);
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache_for_cpu("fp16", config()), Contains("isa = \"isa_nonesuch\""));
  ::unsetenv("KVC_ISA");
  if (kvc::detail::cpu_has_avx2_fma_f16c())
    REQUIRE_THROWS_WITH(kvc::runtime::make_cache_for_cpu("quest(budget=32)", config(), {}, avx2_name),
                        Contains("storage 'quest' is not registered in the isa_avx2_fma_f16c configuration"));
  if (kvc::detail::cpu_has_avx2_fma_f16c())
    REQUIRE_THROWS_WITH(kvc::runtime::make_cache_for_cpu("layers(fp16, l0=quest(budget=32))", config(), {}, avx2_name),
                        Contains("make_cache_for_cpu: 'layers' needs storage(s) 'quest' (in \"") &&
                            Contains("not registered in the isa_avx2_fma_f16c configuration"));
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache_for_cpu("nonesuch(bits=2)", config()),
                      Contains("storage 'nonesuch' is not registered in any configuration this CPU runs"));
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache_for_cpu("fp16+fp16", config()), Contains("expected exactly one storage"));
}


TEST_CASE("make_merged_cache_for_cpu: the best configuration's merged kernels, merged by a stage of another", "[isa][dispatch][merge]") {
  const std::string base = kvc::cpu::isa_name();
  const bool avx2 = kvc::detail::cpu_has_avx2_fma_f16c();
  ::unsetenv("KVC_ISA");
  const auto cfg = config();
  const std::int32_t H = cfg.num_kv_heads, D = cfg.head_dim, hq = 2 * H, n = 90;
  kvc_test::rng r(7);
  const auto k = r.normals(static_cast<std::size_t>(n) * H * D), v = r.normals(k.size()),
             q = r.normals(static_cast<std::size_t>(hq) * D);
  // Every third token and the last 16 kept, per head; D2O merges the others into similar kept keys.
  std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H));
  std::vector<std::vector<float>> scores(static_cast<std::size_t>(H), std::vector<float>(static_cast<std::size_t>(n), 1.0f));
  for (std::int32_t h = 0; h < H; ++h)
    for (std::int32_t t = 0; t < n; ++t)
      if (t % 3 == h % 3 || t >= n - 16) kept[static_cast<std::size_t>(h)].push_back(t);
  for (const char* storage : {"fp16", "fp32"}) {
    INFO(storage);
    const bool half = std::string(storage) == "fp16";
    auto best = kvc::runtime::make_merged_cache_for_cpu(storage, cfg);
    auto forced = kvc::runtime::make_merged_cache_for_cpu(storage, cfg, base.c_str());
    REQUIRE(std::string(best->isa()) == (avx2 ? std::string(avx2_name) : base));
    REQUIRE(std::string(forced->isa()) == base);
    ::setenv("KVC_ISA", base.c_str(), 1);
    REQUIRE(std::string(kvc::runtime::make_merged_cache_for_cpu(storage, cfg)->isa()) == base);
    ::unsetenv("KVC_ISA");
    for (auto* c : {best.get(), forced.get()}) {
      REQUIRE((c->merged_fp16() != nullptr) == half);
      REQUIRE((c->merged_fp32() != nullptr) == !half);
    }
    // This TU's merger (its configuration: the baseline) acts on both caches alike.
    kvc::runtime::merger m(kvc::runtime::make_merge_policy(kvc::runtime::parse_spec("d2o(beta=0.5)")[0]));
    kvc::runtime::merger m2(m.policy());
    const auto sb = best->add_sequence(), sf = forced->add_sequence();
    best->append(sb, 0, k.data(), v.data(), n);
    forced->append(sf, 0, k.data(), v.data(), n);
    m.apply(*best, sb, 0, scores, kept);
    m2.apply(*forced, sf, 0, scores, kept);
    bool merged_any = false;
    for (std::int32_t h = 0; h < H; ++h) {
      const auto len = best->length(sb, 0, h);
      REQUIRE(len == static_cast<std::int32_t>(kept[static_cast<std::size_t>(h)].size()));
      REQUIRE(forced->length(sf, 0, h) == len);
      std::vector<float> kb(static_cast<std::size_t>(len) * D), vb(kb.size()), kf(kb.size()), vf(kb.size());
      best->gather(sb, 0, h, kb.data(), vb.data());
      forced->gather(sf, 0, h, kf.data(), vf.data());
      REQUIRE(kb == kf);
      REQUIRE(vb == vf);
      const auto lb = log_weights(*best, sb, h), lf = log_weights(*forced, sf, h);
      REQUIRE(lb.size() == static_cast<std::size_t>(len));
      REQUIRE(lb == lf);
      for (float w : lb) merged_any = merged_any || w > 0.0f;
    }
    REQUIRE(merged_any);  // else the log-weights below would test nothing
    require_reference_attention(*best, sb, q, hq);
    require_reference_attention(*forced, sf, q, hq);
  }
  using Catch::Contains;
  REQUIRE_THROWS_WITH(kvc::runtime::make_merged_cache_for_cpu("fp8", cfg), Contains("storage 'fp8' cannot hold merged tokens"));
  // Codes hold them (int8 here), from the best configuration too.
  REQUIRE(kvc::runtime::make_merged_cache_for_cpu("int8", cfg)->holds_log_weights());
  REQUIRE_THROWS_WITH(kvc::runtime::make_merged_cache_for_cpu("fp16", cfg, "isa_nonesuch"),
                      Contains("kvc::runtime::make_merged_cache_for_cpu: isa = \"isa_nonesuch\""));
  // A plain cache holds no log-weights: the merger refuses it by name, whatever its configuration.
  auto plain = kvc::runtime::make_cache_for_cpu("fp16", cfg);
  REQUIRE(plain->merged_fp16() == nullptr);
  REQUIRE(plain->merged_fp32() == nullptr);
}
