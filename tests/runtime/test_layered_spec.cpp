// SPDX-License-Identifier: Apache-2.0
/// `layers(BASE, lA_B=STORAGE, ...)` (runtime/layered_storage.hpp): every layer is stored by the
/// storage its key names, exactly as a cache of that storage alone would store it; attention over
/// each layer matches a dense double reference over what the layer holds; bytes are the parts'
/// pool bytes; sequences, forks and keeps route to the right part; bad specs name the key.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <kvc/runtime/layered_storage.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/quest_storage.hpp>

#include "dense_reference.hpp"
#include "kvc_catch.hpp"

// Storage headers register nothing by being included (runtime/make_cache.hpp): the storages this
// file builds by spec are registered here, in its own ISA configuration, before any test runs.
[[maybe_unused]] static const bool storages_registered =
    (kvc::runtime::register_layered_storage(), kvc::runtime::register_quest_storage(), true);

namespace {

using kvc::runtime::any_cache;
using kvc::runtime::make_cache;

kvc::cache_config config(int layers, int heads, int dim) {
  kvc::cache_config c;
  c.num_layers = layers;
  c.num_kv_heads = heads;
  c.head_dim = dim;
  c.page_size = 16;
  c.max_pages = 4096;
  return c;
}

/// [n][heads][dim] of N(0, 1), one seed per (layer, call) so a misrouted append shows.
std::vector<float> rows(std::mt19937& rng, int n, int heads, int dim) {
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<std::size_t>(n) * heads * dim);
  for (auto& v : x) v = nd(rng);
  return x;
}

/// The storage spec of layer l under `plan` (as written in the layers(...) spec).
std::string part_spec(const kvc::runtime::layer_plan& plan, int l) {
  return plan.parts[static_cast<std::size_t>(plan.layer_part[static_cast<std::size_t>(l)])].text;
}

/// Attention over every layer of `c` for sequence s against the double reference over the rows
/// the layer holds (gathered back), GQA with `hq` query heads.
void check_attention(const any_cache& c, kvc::seq_id s, int hq, std::mt19937& rng) {
  const auto& cfg = c.config();
  const int H = cfg.num_kv_heads, D = cfg.head_dim;
  for (int l = 0; l < cfg.num_layers; ++l) {
    std::vector<kvc_test::dense_head> heads(static_cast<std::size_t>(H));
    for (int h = 0; h < H; ++h) {
      const int n = c.length(s, l, h);
      std::vector<float> k(static_cast<std::size_t>(n) * D), v(k.size());
      c.gather(s, l, h, k.data(), v.data());
      heads[static_cast<std::size_t>(h)].n = n;
      heads[static_cast<std::size_t>(h)].k.assign(k.begin(), k.end());
      heads[static_cast<std::size_t>(h)].v.assign(v.begin(), v.end());
    }
    const std::vector<float> q = rows(rng, 1, hq, D);
    std::vector<float> out(static_cast<std::size_t>(hq) * D);
    c.attention(s, l, q.data(), hq, out.data());
    const auto ref = kvc_test::dense_decode_attention(heads, D, q.data(), hq, 1.0 / std::sqrt(static_cast<double>(D)));
    for (std::size_t i = 0; i < out.size(); ++i) {
      INFO("layer " << l << " element " << i);
      // fp32 accumulation over <= 200 rows of N(0,1) data; quantized storages attend to what
      // they store, which gather returns, so the same bound holds.
      CHECK(std::abs(out[i] - ref.out[i]) <= 2e-4 * (1.0 + std::abs(ref.out[i])));
    }
  }
}

}  // namespace

TEST_CASE("layers(): each layer stores and attends exactly as its storage alone would", "[runtime][layers]") {
  struct shape {
    int layers, heads, dim, hq;
  };
  // The quantized parts come from kvc_test_storages (tests/CMakeLists.txt), which registers them.
  const std::string spec = GENERATE(as<std::string>{}, "layers(fp32, l1=fp16, l3_4=bf16)",
                                    "layers(fp16, l0=fp32, l2=fp32, l4=bf16)", "layers(bf16, l0_4=fp16)",
                                    "layers(kivi(bits=2,residual=32), l1=kivi(bits=4,residual=32), l3_4=int8)",
                                    "layers(int4, l2=fp16)");
  // head_dim a multiple of 32: KIVI's value groups.
  const shape sh = GENERATE(shape{5, 2, 32, 4}, shape{6, 1, 64, 3}, shape{5, 3, 32, 3});
  INFO(spec << " on " << sh.layers << " layers x " << sh.heads << " heads x " << sh.dim);
  const kvc::cache_config cfg = config(sh.layers, sh.heads, sh.dim);
  const auto stages = kvc::runtime::parse_spec(spec);
  const kvc::runtime::layer_plan plan = kvc::runtime::parse_layers(stages.at(0), sh.layers);
  std::unique_ptr<any_cache> c = make_cache(spec, cfg);
  REQUIRE(c->name() == spec);
  // One standalone one-layer cache per layer, of the storage that layer names: the differential
  // reference for what the layered cache stores.
  std::vector<std::unique_ptr<any_cache>> alone;
  for (int l = 0; l < sh.layers; ++l) alone.push_back(make_cache(part_spec(plan, l), config(1, sh.heads, sh.dim)));

  std::mt19937 rng(static_cast<unsigned>(sh.layers * 131 + sh.dim + spec.size()));
  const kvc::seq_id s = c->add_sequence();
  std::vector<kvc::seq_id> sa;
  for (auto& a : alone) sa.push_back(a->add_sequence());
  // Ragged: a 77-token prompt (past KIVI's 32-token residual window) then 1..3-token appends,
  // different data per layer.
  for (int round = 0; round < 4; ++round) {
    const int n = round == 0 ? 77 : round;
    for (int l = 0; l < sh.layers; ++l) {
      const auto k = rows(rng, n, sh.heads, sh.dim), v = rows(rng, n, sh.heads, sh.dim);
      std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
      for (int i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = c->seen(s, l) + i;
      c->append(s, l, k.data(), v.data(), n, pos.data());
      alone[static_cast<std::size_t>(l)]->append(sa[static_cast<std::size_t>(l)], 0, k.data(), v.data(), n, pos.data());
    }
  }
  std::size_t bytes = 0;
  for (int l = 0; l < sh.layers; ++l) {
    const any_cache& a = *alone[static_cast<std::size_t>(l)];
    const kvc::seq_id as = sa[static_cast<std::size_t>(l)];
    bytes += a.bytes_in_use();
    CHECK(c->bytes_in_use(l) == a.bytes_in_use(0));
    CHECK(c->seen(s, l) == a.seen(as, 0));
    for (int h = 0; h < sh.heads; ++h) {
      const int n = c->length(s, l, h);
      REQUIRE(n == a.length(as, 0, h));
      REQUIRE(std::equal(c->positions(s, l, h), c->positions(s, l, h) + n, a.positions(as, 0, h)));
      std::vector<float> k1(static_cast<std::size_t>(n) * sh.dim), v1(k1.size()), k2(k1.size()), v2(k1.size());
      c->gather(s, l, h, k1.data(), v1.data());
      a.gather(as, 0, h, k2.data(), v2.data());
      CHECK(k1 == k2);
      CHECK(v1 == v2);
    }
  }
  CHECK(c->bytes_in_use() == bytes);
  CHECK(c->tokens_held() == static_cast<std::int64_t>(sh.layers) * sh.heads * (77 + 1 + 2 + 3));
  check_attention(*c, s, sh.hq, rng);

  SECTION("keep_layer and fork route to the layer's part and leave the others alone") {
    const int l = sh.layers - 1;
    const kvc::seq_id f = c->fork(s);
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(sh.heads));
    for (int h = 0; h < sh.heads; ++h)
      for (int t = h; t < c->length(s, l, h); t += 3) kept[static_cast<std::size_t>(h)].push_back(t);
    const std::size_t before_other = c->bytes_in_use(0);
    c->keep_layer(f, l, kept);
    for (int h = 0; h < sh.heads; ++h) {
      CHECK(c->length(f, l, h) == static_cast<int>(kept[static_cast<std::size_t>(h)].size()));
      CHECK(c->length(s, l, h) == 77 + 6);  // the original is unchanged
      CHECK(c->length(f, 0, h) == 77 + 6);
    }
    CHECK(c->bytes_in_use(0) == before_other);
    check_attention(*c, f, sh.hq, rng);
    c->remove_sequence(f);
    CHECK_FALSE(c->contains(f));
    CHECK(c->contains(s));
    CHECK(c->bytes_in_use() == bytes);
  }
}

TEST_CASE("layers(): parts share a cache per distinct storage and split the pool by layers", "[runtime][layers]") {
  const kvc::cache_config cfg = config(6, 2, 16);
  auto c = make_cache("layers(fp16, l1=fp32, l3=fp32, l5=bf16)", cfg);
  auto* lc = dynamic_cast<kvc::runtime::layered_cache*>(c.get());
  REQUIRE(lc != nullptr);
  CHECK(lc->num_parts() == 3);
  CHECK(lc->part(1).name() == "fp32");
  CHECK(&lc->part(1) == &lc->part(3));
  CHECK(lc->local_layer(3) == 1);
  CHECK(lc->part(0).name() == "fp16");
  CHECK(lc->part(0).config().num_layers == 3);                   // layers 0, 2, 4
  CHECK(lc->part(0).config().max_pages == (4096 * 3 + 5) / 6);   // ceil(3/6 of the pool)
  CHECK(lc->part(5).config().max_pages == (4096 * 1 + 5) / 6);
}

TEST_CASE("layers(): bad specs and bad calls name what was wrong and change nothing", "[runtime][layers]") {
  const kvc::cache_config cfg = config(4, 2, 16);
  auto err = [&](const std::string& spec) {
    try {
      make_cache(spec, cfg);
    } catch (const kvc::error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  using Catch::Matchers::Contains;
  CHECK_THAT(err("layers(fp16, l4=fp32)"), Contains("names layer 4") && Contains("layers 0..3"));
  CHECK_THAT(err("layers(fp16, l2_1=fp32)"), Contains("a range backwards"));
  CHECK_THAT(err("layers(fp16, l0_2=fp32, l2=bf16)"), Contains("layer 2 named by both 'l0_2' and 'l2'"));
  CHECK_THAT(err("layers(fp16, x1=fp32)"), Contains("key 'x1'") && Contains("lA (one layer) or lA_B"));
  CHECK_THAT(err("layers(fp16, l1x=fp32)"), Contains("key 'l1x'"));
  CHECK_THAT(err("layers(fp16, l1=3)"), Contains("l1 = 3") && Contains("a storage stage"));
  CHECK_THAT(err("layers(l1=fp32)"), Contains("no positional storage"));
  CHECK_THAT(err("layers(fp16)"), Contains("no lA=STORAGE key"));
  CHECK_THAT(err("layers(fp16, fp32, l1=bf16)"), Contains("a second positional storage 'fp32'"));
  CHECK_THAT(err("layers(fp16, l1=layers(fp32, l0=bf16))"), Contains("nested layers"));
  CHECK_THAT(err("layers(fp16, l1=fp31)"), Contains("unknown storage 'fp31'"));

  {
    kvc::rope_config rc;  // KIVI groups 32 channels: head_dim 32
    rc.head_dim = 32;
    kvc::runtime::storage_options so;
    so.rope = &rc;
    const kvc::cache_config c32 = config(4, 2, 32);
    CHECK_THROWS_WITH(make_cache("layers(fp16, l1=kivi(bits=4,pre_rope=1))", c32, so),
                      Contains("takes post-RoPE keys and part") && Contains("expected every part to take the same"));
    CHECK(make_cache("layers(kivi(bits=2,pre_rope=1), l1=kivi(bits=4,pre_rope=1))", c32, so)->pre_rope_keys());
  }

  auto c = make_cache("layers(fp16, l1=fp32)", cfg);
  const kvc::seq_id s = c->add_sequence();
  std::vector<float> k(2 * 16, 0.5f), v(k.size(), 0.25f);
  const std::int32_t pos = 0;
  CHECK_THROWS_WITH(c->append(s, 4, k.data(), v.data(), 1, &pos),
                    Contains("kvc::runtime::layered_cache::append: layer = 4, expected 0..3"));
  CHECK_THROWS_WITH(c->append(s + 7, 1, k.data(), v.data(), 1, &pos),
                    Contains("kvc::runtime::layered_cache::append: seq = ") && Contains("not a live sequence"));
  CHECK_THROWS_WITH(c->fork(s + 7), Contains("layered_cache::fork"));
  CHECK(c->bytes_in_use() == 0);
  CHECK(c->tokens_held() == 0);
}

TEST_CASE("rewind through any_cache: each storage forgets the newest tokens as if it never saw them",
          "[runtime][rewind]") {
  // A cache that saw 70 tokens and was rewound to 45 must equal a twin that saw only the first 45
  // (every storage here stores a token the same way whatever follows it while 70 < KIVI's
  // 128-token window), bit for bit, and both must continue alike.
  const int L = 2, H = 2, D = 32, hq = 4, N = 70, n = 45;
  for (const char* spec : {"fp32", "fp16", "bf16", "int8", "kivi(bits=2)", "layers(fp16, l1=int4)"}) {
    INFO(spec);
    auto c = make_cache(spec, config(L, H, D)), twin = make_cache(spec, config(L, H, D));
    REQUIRE(c->can_rewind());
    std::mt19937 rng(17);
    const auto s = c->add_sequence(), t = twin->add_sequence();
    for (int l = 0; l < L; ++l) {
      const auto k = rows(rng, N + 10, H, D), v = rows(rng, N + 10, H, D);
      c->append(s, l, k.data(), v.data(), 30);
      c->append(s, l, k.data() + 30 * H * D, v.data() + 30 * H * D, N - 30);
      twin->append(t, l, k.data(), v.data(), n);
      const auto bytes = c->bytes_in_use(l);
      c->rewind(s, l, n);
      CHECK(c->seen(s, l) == n);
      CHECK(c->bytes_in_use(l) <= bytes);
      c->append(s, l, k.data() + N * H * D, v.data() + N * H * D, 10);
      twin->append(t, l, k.data() + N * H * D, v.data() + N * H * D, 10);
      for (int h = 0; h < H; ++h) {
        REQUIRE(c->length(s, l, h) == twin->length(t, l, h));
        const int m = c->length(s, l, h);
        std::vector<float> a(static_cast<std::size_t>(m) * D), b(a.size()), av(a.size()), bv(a.size());
        c->gather(s, l, h, a.data(), av.data());
        twin->gather(t, l, h, b.data(), bv.data());
        CHECK(a == b);
        CHECK(av == bv);
        CHECK(std::equal(c->positions(s, l, h), c->positions(s, l, h) + m, twin->positions(t, l, h)));
      }
    }
    CHECK(c->bytes_in_use() == twin->bytes_in_use());
    check_attention(*c, s, hq, rng);
    CHECK_THROWS_WITH(c->rewind(s, 0, n + 11), Catch::Contains("n = 56, expected 0..55"));
  }
  // Storages that cannot: the call names the storage and changes nothing.
  for (const char* spec : {"mikv(hbits=8,lbits=2,high_ratio=0.3)", "layers(fp16, l1=mikv(hbits=8,lbits=2))"}) {
    INFO(spec);
    auto c = make_cache(spec, config(L, H, D));
    CHECK_FALSE(c->can_rewind());
    std::mt19937 rng(18);
    const auto s = c->add_sequence();
    const auto k = rows(rng, 20, H, D), v = rows(rng, 20, H, D);
    c->append(s, 1, k.data(), v.data(), 20);  // layer 1: mikv in both specs
    CHECK_THROWS_WITH(c->rewind(s, 1, 10), Catch::Contains("storage 'mikv") && Catch::Contains("cannot rewind"));
    CHECK(c->seen(s, 1) == 20);
    CHECK(c->length(s, 1, 1) == 20);
  }
}

TEST_CASE("share_layer through any_cache: kv_cache and quant_cache storages share pages, the others refuse by name",
          "[runtime][share]") {
  const int L = 3, H = 2, D = 32, hq = 4;  // KIVI groups 32 channels
  auto gathered = [&](const any_cache& c, kvc::seq_id s, int l, int h) {
    std::vector<float> kv(static_cast<std::size_t>(c.length(s, l, h)) * D * 2);
    c.gather(s, l, h, kv.data(), kv.data() + kv.size() / 2);
    return kv;
  };
  // quest: a kv_cache with key bounds (shared with the pages); its budget here covers every token.
  // int8, kivi, gear: quant_caches (residual and sink pages shared too); layers(...): within a part.
  for (const char* spec : {"fp16", "bf16", "quest", "int8", "kivi(bits=2,residual=32)", "gear(bits=4)",
                           "fp8(sinks=4)", "layers(fp16, l2=int8)", "layers(int8, l2=fp16)"}) {
    INFO(spec);
    auto c = make_cache(spec, config(L, H, D));
    REQUIRE(c->can_share_layers());
    std::mt19937 rng(21);
    const auto s = c->add_sequence();
    for (int l = 0; l < L; ++l) {
      const int n = 40 + 9 * l;
      const auto k = rows(rng, n, H, D), v = rows(rng, n, H, D);
      c->append(s, l, k.data(), v.data(), n);
    }
    const auto total = c->bytes_in_use(), own1 = c->bytes_in_use(1), bytes0 = c->bytes_in_use(0);
    std::vector<std::vector<float>> rows0;
    for (int h = 0; h < H; ++h) rows0.push_back(gathered(*c, s, 0, h));
    c->share_layer(s, 1, 0);
    CHECK(c->bytes_in_use() == total - own1);  // layer 1's pages went back; layer 0's are held twice
    CHECK(c->bytes_in_use(1) == 0);
    CHECK(c->bytes_in_use(0) == bytes0);
    CHECK(c->seen(s, 1) == c->seen(s, 0));
    for (int h = 0; h < H; ++h) {
      CHECK(gathered(*c, s, 1, h) == rows0[static_cast<std::size_t>(h)]);
      CHECK(std::equal(c->positions(s, 1, h), c->positions(s, 1, h) + c->length(s, 1, h), c->positions(s, 0, h)));
    }
    check_attention(*c, s, hq, rng);
    // A write to the sharer copies the shared page: layer 0 stays as it was.
    const auto k = rows(rng, 3, H, D), v = rows(rng, 3, H, D);
    c->append(s, 1, k.data(), v.data(), 3);
    for (int h = 0; h < H; ++h) CHECK(gathered(*c, s, 0, h) == rows0[static_cast<std::size_t>(h)]);
    CHECK(c->length(s, 1, 0) == c->length(s, 0, 0) + 3);
    check_attention(*c, s, hq, rng);
    CHECK_THROWS_WITH(c->share_layer(s, 1, 1), Catch::Contains("from = 1"));
    if (std::string(spec).rfind("layers", 0) == 0) {
      const auto before = c->bytes_in_use();
      CHECK_THROWS_WITH(c->share_layer(s, 2, 0), Catch::Contains("live in different parts"));
      CHECK(c->bytes_in_use() == before);
      CHECK(c->length(s, 2, 0) == 58);
    }
  }
  // mikv keeps per-sequence precision tables and refuses page sharing (fork too).
  for (const char* spec : {"mikv", "layers(mikv, l2=fp16)"}) {
    INFO(spec);
    auto c = make_cache(spec, config(L, H, D));
    CHECK(c->can_share_layers() == (std::string(spec).rfind("layers", 0) == 0));
    std::mt19937 rng(22);
    const auto s = c->add_sequence();
    const auto k = rows(rng, 20, H, D), v = rows(rng, 20, H, D);
    c->append(s, 0, k.data(), v.data(), 20);
    const auto before = c->bytes_in_use();
    CHECK_THROWS_WITH(c->share_layer(s, 1, 0), Catch::Contains("storage 'mikv"));
    CHECK_THROWS_WITH(c->share_layer(s, 1, 0), Catch::Contains("cannot share layers"));
    CHECK(c->bytes_in_use() == before);
    CHECK(c->length(s, 1, 0) == 0);
    CHECK(c->length(s, 0, 0) == 20);
  }
}
