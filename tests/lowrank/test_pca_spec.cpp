// SPDX-License-Identifier: Apache-2.0
// The run-time storage pca(rank=, center=, coef=) (kvc/runtime/lowrank_storages.hpp), through
// any_cache as a harness uses it. Attention is checked against a dense double reference written
// here, computed on the keys and values gather() returns (the reconstruction U c + μ) and, at full
// rank, on the original K/V. gather() itself is checked against the projection onto the cache's
// own basis, computed here in double. Pool bytes are checked against a count of pages made here.
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <kvc/runtime/lowrank_storages.hpp>
#include <kvc/runtime/make_cache.hpp>

#include "kvc_catch.hpp"

// Storage headers register nothing by being included (runtime/make_cache.hpp): the storages this
// file builds by spec are registered here, in its own ISA configuration, before any test runs.
[[maybe_unused]] static const bool storages_registered = (kvc::runtime::register_lowrank_storages(), true);

namespace {

using kvc::cache_config;
using kvc::seq_id;
using kvc::runtime::any_cache;
using kvc::runtime::make_cache;
using Catch::Contains;

constexpr std::int32_t L = 2, H = 2, D = 64, G = 2, P = 16;

cache_config shape() {
  cache_config c;
  c.num_layers = L;
  c.num_kv_heads = H;
  c.head_dim = D;
  c.page_size = P;
  return c;
}

/// [n][H][D] rows with a decaying spectrum (channel d scaled by 1 / (1 + d / 8)) and an offset,
/// so a rank-16 basis keeps most but not all of each row.
std::vector<float> rows(std::int32_t n, std::uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<std::size_t>(n) * H * D);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = nd(g) / (1.0f + static_cast<float>(i % D) / 8.0f) + 0.3f;
  return x;
}

/// Dense double attention, GQA: q [H*G][D], K/V per kv head [n_h][D] -> out [H*G][D].
/// lse, when given, receives each query head's log-sum-exp of the scaled scores (natural log).
std::vector<double> reference(const std::vector<float>& q, const std::vector<std::vector<float>>& K,
                              const std::vector<std::vector<float>>& V, std::vector<double>* lse = nullptr) {
  std::vector<double> out(static_cast<std::size_t>(H) * G * D, 0.0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (std::int32_t qh = 0; qh < H * G; ++qh) {
    const auto& k = K[static_cast<std::size_t>(qh / G)];
    const auto& v = V[static_cast<std::size_t>(qh / G)];
    const std::size_t n = k.size() / D;
    std::vector<double> s(n);
    double m = -std::numeric_limits<double>::infinity();
    for (std::size_t t = 0; t < n; ++t) {
      double a = 0;
      for (std::int32_t d = 0; d < D; ++d) a += double(q[static_cast<std::size_t>(qh) * D + d]) * k[t * D + d];
      s[t] = a * scale;
      m = std::max(m, s[t]);
    }
    double l = 0;
    for (std::size_t t = 0; t < n; ++t) l += std::exp(s[t] - m);
    if (lse) lse->push_back(m + std::log(l));
    for (std::size_t t = 0; t < n; ++t)
      for (std::int32_t d = 0; d < D; ++d)
        out[static_cast<std::size_t>(qh) * D + d] += std::exp(s[t] - m) / l * v[t * D + d];
  }
  return out;
}

/// The cache's keys and values of one layer, per kv head, as gather() returns them.
void gathered(const any_cache& c, seq_id s, std::int32_t layer, std::vector<std::vector<float>>& K,
              std::vector<std::vector<float>>& V) {
  K.assign(H, {});
  V.assign(H, {});
  for (std::int32_t h = 0; h < H; ++h) {
    const std::size_t n = static_cast<std::size_t>(c.length(s, layer, h));
    K[h].resize(n * D);
    V[h].resize(n * D);
    c.gather(s, layer, h, K[h].data(), V[h].data());
  }
}

/// The original rows of one kv head, [n][D].
std::vector<float> head_rows(const std::vector<float>& x, std::int32_t h) {
  const std::size_t n = x.size() / (static_cast<std::size_t>(H) * D);
  std::vector<float> o(n * D);
  for (std::size_t t = 0; t < n; ++t)
    for (std::int32_t d = 0; d < D; ++d) o[t * D + d] = x[(t * H + h) * D + d];
  return o;
}

double max_diff(const std::vector<float>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - b[i]));
  return m;
}

std::vector<float> attend(const any_cache& c, seq_id s, std::int32_t layer, const std::vector<float>& q) {
  std::vector<float> out(q.size());
  c.attention(s, layer, q.data(), H * G, out.data());
  return out;
}

/// Appends a prompt of n tokens to every layer in one call, then `decode` single tokens.
void fill(any_cache& c, seq_id s, std::int32_t n, std::int32_t decode, std::uint32_t seed) {
  for (std::int32_t l = 0; l < L; ++l) {
    const auto k = rows(n, seed + 10 * l), v = rows(n, seed + 10 * l + 1);
    c.append(s, l, k.data(), v.data(), n);
    for (std::int32_t t = 0; t < decode; ++t) {
      const auto k1 = rows(1, seed + 100 * (t + 1) + l), v1 = rows(1, seed + 100 * (t + 1) + l + 50);
      c.append(s, l, k1.data(), v1.data(), 1);
    }
  }
}

}  // namespace

TEST_CASE("pca specs: attention equals a dense reference on the gathered keys and values", "[lowrank][pca_spec]") {
  // coef=int8: the coefficient rows in int8 pages (kvc_test_storages registers the quantized storages).
  for (const char* spec : {"pca(rank=16)", "pca(rank=0.25,center=1)", "pca(rank=16,coef=fp32)", "pca(rank=13,center=1)",
                           "pca(rank=16,center=1,coef=int8)"}) {
    CAPTURE(spec);
    auto c = make_cache(spec, shape());
    CHECK(c->name() == spec);
    CHECK(c->config().head_dim == D);
    CHECK_FALSE(c->pre_rope_keys());
    CHECK(c->has_prefill_attention());
    const seq_id s = c->add_sequence();
    CHECK(c->chunk_tokens(s, 0, 500) == 500);
    fill(*c, s, 100, 3, 7);
    for (std::int32_t l = 0; l < L; ++l) {
      CHECK(c->seen(s, l) == 103);
      for (std::int32_t h = 0; h < H; ++h) {
        REQUIRE(c->length(s, l, h) == 103);
        CHECK(c->positions(s, l, h)[102] == 102);
      }
      std::vector<std::vector<float>> K, V;
      gathered(*c, s, l, K, V);
      const auto q = rows(G, 99 + l);  // [H*G][D]
      const auto out = attend(*c, s, l, q);
      CHECK(max_diff(out, reference(q, K, V)) < 1e-3);
      // Lossy at rank < D: the reconstruction is not the original (a gather that returned the
      // input would not be what attention attends to).
      const auto orig = head_rows(rows(100, 7 + 10 * l), 0);
      double err = 0;
      for (std::size_t i = 0; i < orig.size(); ++i) err = std::max(err, double(std::abs(orig[i] - K[0][i])));
      CHECK(err > 1e-2);
    }
    CHECK(c->tokens_held() == std::int64_t{L} * H * 103);
  }
}

TEST_CASE("pca: gather is the projection onto the cache's own bases", "[lowrank][pca_spec]") {
  auto c = make_cache("pca(rank=16,center=1,coef=fp32)", shape());
  auto* pc = dynamic_cast<kvc::runtime::pca_cache<float>*>(c.get());
  REQUIRE(pc != nullptr);
  const seq_id s = c->add_sequence();
  const auto k = rows(40, 3), v = rows(40, 4);
  c->append(s, 0, k.data(), v.data(), 40);
  REQUIRE(pc->get().config().rank == 16);
  for (std::int32_t h = 0; h < H; ++h) {
    std::vector<float> gk(40 * D), gv(40 * D);
    c->gather(s, 0, h, gk.data(), gv.data());
    for (int which = 0; which < 2; ++which) {
      const auto& b = which == 0 ? pc->get().key_basis(0, h) : pc->get().value_basis(0, h);
      REQUIRE(b.centered());
      const auto x = head_rows(which == 0 ? k : v, h);
      const auto& g = which == 0 ? gk : gv;
      double err = 0;
      for (std::int32_t t = 0; t < 40; ++t) {
        std::vector<double> y(D);
        for (std::int32_t d = 0; d < D; ++d) y[d] = b.mean[d];
        for (std::int32_t j = 0; j < 16; ++j) {
          double cj = 0;
          for (std::int32_t d = 0; d < D; ++d) cj += double(b.direction(j)[d]) * (x[t * D + d] - b.mean[d]);
          for (std::int32_t d = 0; d < D; ++d) y[d] += cj * b.direction(j)[d];
        }
        for (std::int32_t d = 0; d < D; ++d) err = std::max(err, std::abs(y[d] - g[t * D + d]));
      }
      CHECK(err < 1e-4);
    }
  }
}

TEST_CASE("pca at full rank equals exact attention on the original keys and values", "[lowrank][pca_spec]") {
  for (const char* spec : {"pca(rank=64,coef=fp32)", "pca(rank=64,center=1,coef=fp32)"}) {
    CAPTURE(spec);
    auto c = make_cache(spec, shape());
    const seq_id s = c->add_sequence();
    const std::int32_t n = 70;
    for (std::int32_t l = 0; l < L; ++l) {
      const auto k = rows(n, 20 + l), v = rows(n, 30 + l);
      c->append(s, l, k.data(), v.data(), n);
      std::vector<std::vector<float>> K, V;
      for (std::int32_t h = 0; h < H; ++h) {
        K.push_back(head_rows(k, h));
        V.push_back(head_rows(v, h));
      }
      const auto q = rows(G, 40 + l);
      CHECK(max_diff(attend(*c, s, l, q), reference(q, K, V)) < 2e-4);
    }
  }
}

TEST_CASE("pca: pool bytes are r/D of fp16's and metadata holds the bases", "[lowrank][pca_spec]") {
  const std::int32_t n = 100, r = 16;
  const std::int64_t pages = (n + P - 1) / P;  // per stream
  auto fp16 = make_cache("fp16", shape());
  fill(*fp16, fp16->add_sequence(), n, 0, 5);
  for (const char* spec : {"pca(rank=16)", "pca(rank=0.25,coef=fp32)", "pca(rank=16,center=1)"}) {
    CAPTURE(spec);
    const std::size_t elem = std::string(spec).find("fp32") != std::string::npos ? 4 : 2;
    const bool centered = std::string(spec).find("center=1") != std::string::npos;
    auto c = make_cache(spec, shape());
    const seq_id s = c->add_sequence();
    CHECK(c->bytes_in_use() == 0);
    fill(*c, s, n, 0, 5);
    // One page per P tokens of each (layer, kv head) stream, holding P rows of r K and r V coefficients.
    const std::size_t expected = static_cast<std::size_t>(L * H * pages) * 2 * P * r * elem;
    CHECK(c->bytes_in_use() == expected);
    CHECK(c->bytes_in_use(0) == expected / L);
    CHECK(c->traffic().bytes_allocated == expected);
    if (elem == 2) CHECK(c->bytes_in_use() * D == fp16->bytes_in_use() * r);
    // 4 bytes per position and page-table entry, plus U_k, U_v (r x D floats) and the means.
    const std::size_t bases = static_cast<std::size_t>(L * H) * 4 * (2 * r * D + (centered ? 2 * D : 0));
    CHECK(c->metadata_bytes() == static_cast<std::size_t>(L * H) * 4 * (n + pages) + bases);
  }
}

TEST_CASE("pca: keep and keep_layer, then attention matches the reference on the kept tokens", "[lowrank][pca_spec]") {
 for (const char* spec : {"pca(rank=16,center=1)", "pca(rank=16,center=1,coef=int8)"}) {
  CAPTURE(spec);
  auto c = make_cache(spec, shape());
  const seq_id s = c->add_sequence();
  fill(*c, s, 90, 2, 11);
  std::vector<std::vector<float>> K0, V0;
  gathered(*c, s, 0, K0, V0);
  std::vector<std::vector<std::int32_t>> kept(H);
  for (std::int32_t t = 0; t < 92; t += 2) kept[0].push_back(t);
  for (std::int32_t t = 0; t < 92; t += 3) kept[1].push_back(t);
  // All or nothing: a bad list for head 1 leaves head 0 as it was.
  std::vector<std::vector<std::int32_t>> bad = kept;
  bad[1] = {5, 3};
  CHECK_THROWS(c->keep_layer(s, 0, bad));
  CHECK(c->length(s, 0, 0) == 92);
  c->keep_layer(s, 0, kept);
  for (std::int32_t h = 0; h < H; ++h) {
    REQUIRE(c->length(s, 0, h) == static_cast<std::int32_t>(kept[h].size()));
    std::vector<float> k(kept[h].size() * D);
    c->gather(s, 0, h, k.data());
    for (std::size_t i = 0; i < kept[h].size(); ++i) {
      CHECK(c->positions(s, 0, h)[i] == kept[h][i]);
      for (std::int32_t d = 0; d < D; ++d) REQUIRE(k[i * D + d] == K0[h][static_cast<std::size_t>(kept[h][i]) * D + d]);
    }
  }
  const std::int32_t one[] = {0, 10, 50, 91};
  c->keep(s, 1, 1, one, 4);
  CHECK(c->length(s, 1, 1) == 4);
  CHECK(c->length(s, 1, 0) == 92);
  for (std::int32_t l = 0; l < L; ++l) {
    std::vector<std::vector<float>> K, V;
    gathered(*c, s, l, K, V);
    const auto q = rows(G, 60 + l);
    CHECK(max_diff(attend(*c, s, l, q), reference(q, K, V)) < 1e-3);
  }
  CHECK(c->tokens_held() == static_cast<std::int64_t>(kept[0].size() + kept[1].size() + 92 + 4));
 }
}

TEST_CASE("pca with coef=int8: int8 pages hold the coefficients, within int8's rounding of fp32 ones", "[lowrank][pca_spec]") {
  auto q8 = make_cache("pca(rank=16,vrank=24,center=1,coef=int8)", shape());
  auto f32 = make_cache("pca(rank=16,vrank=24,center=1,coef=fp32)", shape());
  auto f16 = make_cache("pca(rank=16,vrank=24,center=1)", shape());
  const seq_id a = q8->add_sequence(), b = f32->add_sequence(), e = f16->add_sequence();
  fill(*q8, a, 100, 0, 5);
  fill(*f32, b, 100, 0, 5);
  fill(*f16, e, 100, 0, 5);
  // Bytes from the pools: the int8 pages hold one byte per coefficient and their scales.
  CHECK(q8->bytes_in_use() < f16->bytes_in_use() * 3 / 4);
  auto* pc = dynamic_cast<kvc::runtime::pca_cache<kvc::half>*>(q8.get());
  REQUIRE(pc != nullptr);
  REQUIRE(pc->coefficient_store() != nullptr);
  CHECK(q8->bytes_in_use() == pc->coefficient_store()->bytes_in_use());
  CHECK(q8->metadata_bytes() > pc->coefficient_store()->metadata_bytes());  // the bases
  for (std::int32_t l = 0; l < L; ++l) {
    std::vector<std::vector<float>> K8, V8, K32, V32;
    gathered(*q8, a, l, K8, V8);
    gathered(*f32, b, l, K32, V32);
    for (std::int32_t h = 0; h < H; ++h) {
      double big = 0, err = 0, err0 = 0;
      for (std::size_t i = 0; i < K32[h].size(); ++i) {
        big = std::max({big, double(std::abs(K32[h][i])), double(std::abs(V32[h][i]))});
        err = std::max({err, double(std::abs(K8[h][i] - K32[h][i])), double(std::abs(V8[h][i] - V32[h][i]))});
        err0 = std::max(err0, double(std::abs(K8[h][i])));
      }
      CHECK(err <= 0.05 * big);  // 8 bits per coefficient
      CHECK(err > 0);            // and not the fp32 rows themselves
      CHECK(err0 > 0);
    }
    const auto q = rows(G, 40 + l);
    CHECK(max_diff(attend(*q8, a, l, q), reference(q, K8, V8)) < 1e-3);
  }
}

TEST_CASE("pca: bad specs name the argument, the value and what was expected", "[lowrank][pca_spec]") {
  const cache_config cfg = shape();
  REQUIRE_THROWS_WITH(make_cache("pca(rank=0)", cfg), Contains("rank = 0") && Contains("expected a whole count 1..64"));
  REQUIRE_THROWS_WITH(make_cache("pca(rank=65)", cfg), Contains("rank = 65") && Contains("1..64 (head_dim)"));
  REQUIRE_THROWS_WITH(make_cache("pca(rank=1.5)", cfg), Contains("rank = 1.5") && Contains("fraction in (0, 1)"));
  REQUIRE_THROWS_WITH(make_cache("pca(rank=-0.5)", cfg), Contains("rank = -0.5"));
  REQUIRE_THROWS_WITH(make_cache("pca(rank=16,bits=4)", cfg), Contains("no argument 'bits'") && Contains("rank, vrank, pre_rope, sinks, center, coef"));
  REQUIRE_THROWS_WITH(make_cache("pca(rank=16,coef=nosuch)", cfg),
                      Contains("nosuch would hold rows of 16 values") && Contains("'nosuch'"));
  REQUIRE_THROWS_WITH(make_cache("pca(rank=16,coef=pca(rank=2))", cfg), Contains("coef = pca(rank=2)") && Contains("not pca"));
  REQUIRE_THROWS_WITH(make_cache("pca(rank=16,center=2)", cfg), Contains("center = 2") && Contains("0 or 1"));
  REQUIRE_THROWS_WITH(make_cache("pca", cfg), Contains("needs 'rank="));
  REQUIRE_THROWS_WITH(make_cache("pca(rank=16,vrank=0)", cfg), Contains("vrank = 0") && Contains("1..64 (head_dim)"));
  REQUIRE_THROWS_WITH(make_cache("pca(rank=16,vrank=65)", cfg), Contains("vrank = 65"));
  REQUIRE_THROWS_WITH(make_cache("pca(rank=16,pre_rope=2)", cfg), Contains("pre_rope = 2") && Contains("0 or 1"));
  REQUIRE_THROWS_WITH(make_cache("pca(rank=16,vrank=8,sinks=9)", cfg), Contains("sinks = 9") && Contains("min(rank, vrank) = 8"));
  REQUIRE_THROWS_WITH(make_cache("pca(rank=16,sinks=-1)", cfg), Contains("sinks = -1"));
  REQUIRE_THROWS_WITH(make_cache("pca(rank=16,pre_rope=1)", cfg),
                      Contains("pre_rope = 1") && Contains("the model's RoPE in storage_options::rope"));
  kvc::rope_config rc;
  rc.head_dim = 128;
  kvc::runtime::storage_options so;
  so.rope = &rc;
  REQUIRE_THROWS_WITH(make_cache("pca(rank=16,pre_rope=1)", cfg, so),
                      Contains("rope->head_dim = 128") && Contains("the cache's head_dim = 64"));
  CHECK(make_cache("pca(rank=64)", cfg) != nullptr);
  CHECK(make_cache("pca(rank=0.999)", cfg) != nullptr);
}

TEST_CASE("pca: a rejected append leaves the cache unchanged", "[lowrank][pca_spec]") {
  auto c = make_cache("pca(rank=16)", shape());
  auto* pc = dynamic_cast<kvc::runtime::pca_cache<kvc::half>*>(c.get());
  REQUIRE(pc != nullptr);
  const seq_id s = c->add_sequence();
  auto k = rows(40, 1), v = rows(40, 2);
  // A NaN in the first append: no basis is fitted and nothing is stored.
  k[static_cast<std::size_t>(17) * H * D + D + 3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(c->append(s, 0, k.data(), v.data(), 40), Contains("expected finite values"));
  CHECK_FALSE(pc->get().has_basis(0, 0));
  CHECK(c->length(s, 0, 0) == 0);
  CHECK(c->bytes_in_use() == 0);
  // Fewer tokens than the rank in the first append: refused (a basis fitted on too few rows).
  k = rows(40, 1);
  CHECK_THROWS_WITH(c->append(s, 0, k.data(), v.data(), 8), Contains("n = 8") && Contains("at least max(rank, vrank) = 16"));
  CHECK(c->length(s, 0, 0) == 0);
  CHECK(c->seen(s, 0) == 0);
  c->append(s, 0, k.data(), v.data(), 40);
  CHECK(pc->get().has_basis(0, 1));
  // Later appends may be a single token; a NaN one changes nothing.
  c->append(s, 0, k.data(), v.data(), 1);
  const auto q = rows(G, 3);
  const auto before = attend(*c, s, 0, q);
  const std::size_t bytes = c->bytes_in_use(), meta = c->metadata_bytes();
  auto bad = rows(1, 9);
  bad[D + 5] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(c->append(s, 0, bad.data(), v.data(), 1), Contains("expected a finite value"));
  CHECK(c->length(s, 0, 1) == 41);
  CHECK(c->seen(s, 0) == 41);
  CHECK(c->bytes_in_use() == bytes);
  CHECK(c->metadata_bytes() == meta);
  CHECK(attend(*c, s, 0, q) == before);
}

TEST_CASE("pca: a first append the pool cannot hold leaves no basis behind", "[lowrank][pca_spec]") {
  cache_config cfg = shape();
  cfg.max_pages = 4;  // 40 tokens in pages of 16 need 3 pages per kv head: 6
  auto c = make_cache("pca(rank=16)", cfg);
  auto* pc = dynamic_cast<kvc::runtime::pca_cache<kvc::half>*>(c.get());
  REQUIRE(pc != nullptr);
  const seq_id s = c->add_sequence();
  const std::size_t meta = c->metadata_bytes();
  const auto k = rows(40, 1), v = rows(40, 2);
  CHECK_THROWS(c->append(s, 0, k.data(), v.data(), 40));
  for (std::int32_t h = 0; h < H; ++h) CHECK_FALSE(pc->get().has_basis(0, h));
  CHECK(c->metadata_bytes() == meta);
  CHECK(c->bytes_in_use() == 0);
  CHECK(c->length(s, 0, 0) == 0);
  // A first append that fits is fitted and stored as if the refused one had not happened.
  c->append(s, 0, k.data(), v.data(), 20);
  CHECK(pc->get().has_basis(0, 1));
  CHECK(c->length(s, 0, 1) == 20);
  CHECK(c->metadata_bytes() > meta);
}

TEST_CASE("pca: a coefficient past fp16's range is refused, not stored as inf", "[lowrank][pca_spec]") {
  for (const char* spec : {"pca(rank=16)", "pca(rank=16,coef=fp32)"}) {
    CAPTURE(spec);
    auto c = make_cache(spec, shape());
    const seq_id s = c->add_sequence();
    const auto k = rows(40, 1), v = rows(40, 2);
    c->append(s, 0, k.data(), v.data(), 40);
    // |x| = 6e4 · 8 in every kv head: its largest coefficient (along the rows' common offset,
    // which the fitted basis spans) is far past 65504.
    std::vector<float> big(static_cast<std::size_t>(H) * D, 6.0e4f);
    const std::size_t bytes = c->bytes_in_use();
    const auto q = rows(G, 3);
    const auto before = attend(*c, s, 0, q);
    if (std::string(spec).find("fp32") == std::string::npos) {
      CHECK_THROWS_WITH(c->append(s, 0, big.data(), v.data(), 1),
                        Contains("expected |c| <= 65504") && Contains("of token 0"));
      CHECK(c->length(s, 0, 0) == 40);
      CHECK(c->bytes_in_use() == bytes);
      CHECK(attend(*c, s, 0, q) == before);
    } else {
      c->append(s, 0, big.data(), v.data(), 1);  // float coefficients hold it
      CHECK(c->length(s, 0, 0) == 41);
      for (const float x : attend(*c, s, 0, q)) CHECK(std::isfinite(x));
    }
  }
}

TEST_CASE("pca: prefill attention is causal attention over the gathered keys and values", "[lowrank][pca_spec]") {
  for (const char* spec : {"pca(rank=16)", "pca(rank=24,center=1,coef=fp32)"}) {
    CAPTURE(spec);
    auto c = make_cache(spec, shape());
    const seq_id s = c->add_sequence();
    const std::int32_t n = 50;
    const auto k = rows(n, 71), v = rows(n, 72);
    c->append(s, 1, k.data(), v.data(), n);
    std::vector<std::vector<float>> K, V;
    gathered(*c, s, 1, K, V);
    const std::int32_t pos[] = {0, 10, 25, 49, 49};
    const std::int32_t nq = 5;
    const auto q = rows(nq * G, 73);  // [nq][H*G][D]
    std::vector<float> out(q.size()), lse(static_cast<std::size_t>(nq) * H * G);
    kvc::decode_options opt;
    opt.lse = lse.data();
    c->prefill_attention(s, 1, q.data(), nq, pos, H * G, out.data(), opt);
    for (std::int32_t i = 0; i < nq; ++i) {
      std::vector<std::vector<float>> Ki(H), Vi(H);
      const std::size_t visible = static_cast<std::size_t>(pos[i] + 1) * D;  // positions are 0..n-1
      for (std::int32_t h = 0; h < H; ++h) {
        Ki[h].assign(K[h].begin(), K[h].begin() + static_cast<std::ptrdiff_t>(visible));
        Vi[h].assign(V[h].begin(), V[h].begin() + static_cast<std::ptrdiff_t>(visible));
      }
      const std::size_t row = static_cast<std::size_t>(H) * G * D;
      const std::vector<float> qi(q.begin() + static_cast<std::ptrdiff_t>(i * row), q.begin() + static_cast<std::ptrdiff_t>((i + 1) * row));
      const std::vector<float> oi(out.begin() + static_cast<std::ptrdiff_t>(i * row), out.begin() + static_cast<std::ptrdiff_t>((i + 1) * row));
      CAPTURE(i);
      std::vector<double> ref_lse;
      CHECK(max_diff(oi, reference(qi, Ki, Vi, &ref_lse)) < 1e-3);
      REQUIRE(ref_lse.size() == static_cast<std::size_t>(H) * G);
      for (std::int32_t qh = 0; qh < H * G; ++qh)
        CHECK(std::abs(double(lse[static_cast<std::size_t>(i) * H * G + qh]) - ref_lse[static_cast<std::size_t>(qh)]) < 1e-4);
    }
    // The last query sees every token: decode attention over the same cache agrees with it.
    const std::size_t row = static_cast<std::size_t>(H) * G * D;
    const std::vector<float> qlast(q.end() - static_cast<std::ptrdiff_t>(row), q.end());
    const auto dec = attend(*c, s, 1, qlast);
    for (std::size_t j = 0; j < row; ++j) CHECK(std::abs(dec[j] - out[4 * row + j]) < 1e-4f);
  }
}

namespace {

/// RoPE in double from its definition (rotate-half pairs (i, i + D/2), pair i turning by
/// pos · θ^(-2i/D)): written here, not kvc::rope.
void rotate_here(float* x, double theta, double pos) {
  for (std::int32_t i = 0; i < D / 2; ++i) {
    const double a = pos * std::pow(theta, -2.0 * i / D), x0 = x[i], x1 = x[i + D / 2];
    x[i] = static_cast<float>(x0 * std::cos(a) - x1 * std::sin(a));
    x[i + D / 2] = static_cast<float>(x0 * std::sin(a) + x1 * std::cos(a));
  }
}

kvc::runtime::storage_options with_rope(kvc::rope_config& rc) {
  rc.head_dim = D;
  rc.theta = 1000.0f;
  kvc::runtime::storage_options so;
  so.rope = &rc;
  return so;
}

}  // namespace

TEST_CASE("pca with pre_rope and vrank: gather rotates the rebuilt keys, attention matches a dense reference",
          "[lowrank][pca_spec]") {
  kvc::rope_config rc;
  const auto so = with_rope(rc);
  for (const char* spec : {"pca(rank=16,vrank=64,pre_rope=1)", "pca(rank=24,vrank=40,pre_rope=1,center=1,coef=fp32)",
                           "pca(rank=16,vrank=48,pre_rope=1,coef=int8)",
                           "pca(rank=0.25,vrank=0.75)", "pca(rank=64,vrank=64,pre_rope=1,coef=fp32)"}) {
    CAPTURE(spec);
    auto c = make_cache(spec, shape(), so);
    const bool pre = std::string(spec).find("pre_rope=1") != std::string::npos;
    const bool full = std::string(spec).rfind("pca(rank=64,", 0) == 0;
    CHECK(c->pre_rope_keys() == pre);
    const seq_id s = c->add_sequence();
    fill(*c, s, 100, 3, 17);
    for (std::int32_t l = 0; l < L; ++l) {
      std::vector<std::vector<float>> K, V;
      gathered(*c, s, l, K, V);
      const auto q = rows(G, 199 + l);
      CHECK(max_diff(attend(*c, s, l, q), reference(q, K, V)) < 1e-3);
      // Prefill attention of the last position over the same tokens agrees with decode attention.
      std::vector<float> pout(q.size());
      const std::int32_t last = 102;
      c->prefill_attention(s, l, q.data(), 1, &last, H * G, pout.data(), {});
      CHECK(max_diff(pout, reference(q, K, V)) < 1e-3);
      if (full) {  // full rank: gather is the original keys rotated here, and the original values
        const auto k0 = rows(100, 17 + 10 * l), v0 = rows(100, 17 + 10 * l + 1);
        for (std::int32_t h = 0; h < H; ++h) {
          auto kh = head_rows(k0, h);
          const auto vh = head_rows(v0, h);
          double ek = 0, ev = 0;
          for (std::int32_t t = 0; t < 100; ++t) {
            rotate_here(kh.data() + static_cast<std::size_t>(t) * D, 1000.0, t);
            for (std::int32_t d = 0; d < D; ++d) {
              ek = std::max(ek, double(std::abs(kh[static_cast<std::size_t>(t) * D + d] - K[h][static_cast<std::size_t>(t) * D + d])));
              ev = std::max(ev, double(std::abs(vh[static_cast<std::size_t>(t) * D + d] - V[h][static_cast<std::size_t>(t) * D + d])));
            }
          }
          CHECK(ek < 1e-4);
          CHECK(ev < 1e-4);
        }
      }
    }
  }
}

TEST_CASE("pca with vrank: pool bytes are (rank + vrank) coefficients per token, counted in pages here",
          "[lowrank][pca_spec]") {
  kvc::rope_config rc;
  const auto so = with_rope(rc);
  struct row { const char* spec; std::size_t width, elem; };
  for (const row& r : {row{"pca(rank=16,vrank=64,pre_rope=1)", 80, 2}, row{"pca(rank=13,vrank=46,coef=fp32)", 60, 4},
                       row{"pca(rank=32)", 64, 2}}) {
    CAPTURE(r.spec);
    auto c = make_cache(r.spec, shape(), so);
    const seq_id s = c->add_sequence();
    fill(*c, s, 70, 0, 5);  // 70 tokens: 5 pages of 16 per stream
    const std::size_t pages = std::size_t{L} * H * 5;
    CHECK(c->bytes_in_use() == pages * P * r.width * r.elem);
  }
  // The first append must give both bases enough rows.
  auto c = make_cache("pca(rank=8,vrank=48)", shape());
  const seq_id s = c->add_sequence();
  const auto k = rows(40, 1), v = rows(40, 2);
  REQUIRE_THROWS_WITH(c->append(s, 0, k.data(), v.data(), 40),
                      Contains("n = 40") && Contains("at least max(rank, vrank) = 48"));
  CHECK(c->bytes_in_use() == 0);
}

TEST_CASE("pca with sinks: the first tokens of the fitting append come back exactly, the rest do not",
          "[lowrank][pca_spec]") {
  kvc::rope_config rc;
  const auto so = with_rope(rc);
  for (const char* spec : {"pca(rank=16,vrank=16,pre_rope=1,sinks=4,coef=fp32)", "pca(rank=8,vrank=12,sinks=3,center=1,coef=fp32)"}) {
    CAPTURE(spec);
    const bool pre = std::string(spec).find("pre_rope=1") != std::string::npos;
    const std::int32_t m = pre ? 4 : 3;
    auto c = make_cache(spec, shape(), so);
    const seq_id s = c->add_sequence();
    auto k = rows(100, 31), v = rows(100, 32);
    for (std::size_t i = 0; i < static_cast<std::size_t>(m) * H * D; ++i) {  // sink-like: far off the bulk
      k[i] = k[i] * 6.0f - 2.0f;
      v[i] = v[i] * 5.0f + 1.0f;
    }
    c->append(s, 0, k.data(), v.data(), 100);
    std::vector<std::vector<float>> K, V;
    gathered(*c, s, 0, K, V);
    for (std::int32_t h = 0; h < H; ++h) {
      auto kh = head_rows(k, h);
      const auto vh = head_rows(v, h);
      if (pre)
        for (std::int32_t t = 0; t < 100; ++t) rotate_here(kh.data() + static_cast<std::size_t>(t) * D, 1000.0, t);
      auto err = [&](const std::vector<float>& a, const std::vector<float>& b, std::int32_t t0, std::int32_t t1) {
        double e = 0;
        for (std::size_t i = static_cast<std::size_t>(t0) * D; i < static_cast<std::size_t>(t1) * D; ++i)
          e = std::max(e, double(std::abs(a[i] - b[i])));
        return e;
      };
      CHECK(err(kh, K[static_cast<std::size_t>(h)], 0, m) < 1e-3);
      CHECK(err(vh, V[static_cast<std::size_t>(h)], 0, m) < 1e-3);
      CHECK(err(kh, K[static_cast<std::size_t>(h)], m, 100) > 1e-2);  // the bulk is lossy at this rank
    }
    // Without sinks= the same rows do not come back (the test can fail).
    auto plain = make_cache(pre ? "pca(rank=16,vrank=16,pre_rope=1,coef=fp32)" : "pca(rank=8,vrank=12,center=1,coef=fp32)", shape(), so);
    const seq_id s2 = plain->add_sequence();
    plain->append(s2, 0, k.data(), v.data(), 100);
    gathered(*plain, s2, 0, K, V);
    auto kh0 = head_rows(k, 0);
    if (pre) rotate_here(kh0.data(), 1000.0, 0);
    double e0 = 0;
    for (std::int32_t d = 0; d < D; ++d) e0 = std::max(e0, double(std::abs(kh0[static_cast<std::size_t>(d)] - K[0][static_cast<std::size_t>(d)])));
    CHECK(e0 > 1e-2);
  }
}
