// SPDX-License-Identifier: Apache-2.0
// kvc::prefill_attention (kvc::cpu::prefill_attention) against a plain dense double-precision
// causal GQA attention written here, on random data: chunks of 1, odd and multi-task sizes
// (rows = queries x group > one task of 16 blocks of 8 rows), chunks spanning page boundaries,
// num_kv_heads 1..4, groups 1..4, head_dim 32/64/80, serial and threaded; fp32 and fp16 kv_cache
// (rows read in place from the pages) and an int8 quant_cache (decoded through gather(), compared
// with the reference over the values gather() returns); evicted streams (non-contiguous and
// per-head different positions), positions out of order, rows that see no token; the errors.
//
// Tolerance: as test_attention's (float math, ~unit scores): |out - ref| <= 2e-5 * max|V| of
// the head, |lse - ref| <= 2e-5 * max(1, |ref|). A missing mask (a query seeing a later token) or
// an off-by-one position moves outputs by ~0.1, four orders of magnitude above the bound.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include <kvc/attention.hpp>
#include <kvc/cpu/prefill_attention.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/store/quant_cache.hpp>

#include "cache_builders.hpp"
#include "isa_check.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

constexpr double tol = 2e-5;

/// One kv head as the test knows it: positions and float rows [n][D].
struct head_rows {
  std::vector<std::int32_t> pos;
  std::vector<float> k, v;
};

/// The plain causal GQA attention, every sum in double: query i, head qh attends to the tokens of
/// kv head qh / G whose position is <= qpos[i]. A row with no such token is zeros, lse -inf.
void dense_prefill(const std::vector<head_rows>& heads, std::int32_t D, const std::vector<float>& q,
                   const std::vector<std::int32_t>& qpos, std::int32_t hq, double scale, std::vector<double>& out,
                   std::vector<double>& lse) {
  const std::int32_t nq = static_cast<std::int32_t>(qpos.size());
  const std::int32_t G = hq / static_cast<std::int32_t>(heads.size());
  out.assign(static_cast<std::size_t>(nq) * hq * D, 0.0);
  lse.assign(static_cast<std::size_t>(nq) * hq, -INFINITY);
  for (std::int32_t i = 0; i < nq; ++i)
    for (std::int32_t qh = 0; qh < hq; ++qh) {
      const head_rows& H = heads[static_cast<std::size_t>(qh / G)];
      const float* qv = q.data() + (static_cast<std::size_t>(i) * hq + qh) * D;
      std::vector<double> s;
      std::vector<std::size_t> idx;
      for (std::size_t t = 0; t < H.pos.size(); ++t) {
        if (H.pos[t] > qpos[static_cast<std::size_t>(i)]) continue;
        double dot = 0;
        for (std::int32_t d = 0; d < D; ++d) dot += static_cast<double>(qv[d]) * H.k[t * D + d];
        s.push_back(dot * scale);
        idx.push_back(t);
      }
      if (s.empty()) continue;
      const double mx = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (double x : s) sum += std::exp(x - mx);
      double* o = out.data() + (static_cast<std::size_t>(i) * hq + qh) * D;
      for (std::size_t j = 0; j < s.size(); ++j)
        for (std::int32_t d = 0; d < D; ++d) o[d] += std::exp(s[j] - mx) / sum * H.v[idx[j] * D + d];
      lse[static_cast<std::size_t>(i) * hq + qh] = mx + std::log(sum);
    }
}

/// What a cache holds, read back through positions() and gather() (for quantized caches: the
/// dequantized values the reference must use).
template <class Cache>
std::vector<head_rows> read_back(const Cache& c, kvc::seq_id s, std::int32_t layer) {
  const std::int32_t H = c.config().num_kv_heads, D = c.config().head_dim;
  std::vector<head_rows> out(static_cast<std::size_t>(H));
  for (std::int32_t h = 0; h < H; ++h) {
    const std::int32_t n = c.length(s, layer, h);
    head_rows& r = out[static_cast<std::size_t>(h)];
    r.pos.assign(c.positions(s, layer, h), c.positions(s, layer, h) + n);
    r.k.resize(static_cast<std::size_t>(n) * D);
    r.v.resize(r.k.size());
    if (n) c.gather(s, layer, h, r.k.data(), r.v.data());
  }
  return out;
}

/// Runs the prefill attention and compares it with the reference over `heads`.
template <class Cache>
void check_prefill(const Cache& c, kvc::seq_id s, std::int32_t layer, const std::vector<head_rows>& heads,
                   const std::vector<float>& q, const std::vector<std::int32_t>& qpos, std::int32_t hq,
                   kvc::thread_pool* pool, float scale = 0.0f) {
  const std::int32_t D = c.config().head_dim;
  const std::int32_t nq = static_cast<std::int32_t>(qpos.size());
  std::vector<float> out(static_cast<std::size_t>(nq) * hq * D, std::numeric_limits<float>::quiet_NaN());
  std::vector<float> lse(static_cast<std::size_t>(nq) * hq, std::numeric_limits<float>::quiet_NaN());
  kvc::decode_options opt;
  opt.pool = pool;
  opt.lse = lse.data();
  opt.scale = scale;
  kvc::prefill_attention(c, s, layer, q.data(), nq, qpos.data(), hq, out.data(), opt);
  std::vector<double> ref, ref_lse;
  dense_prefill(heads, D, q, qpos, hq, scale != 0.0f ? scale : 1.0 / std::sqrt(static_cast<double>(D)), ref, ref_lse);
  const std::int32_t G = hq / static_cast<std::int32_t>(heads.size());
  for (std::int32_t qh = 0; qh < hq; ++qh) {
    const head_rows& H = heads[static_cast<std::size_t>(qh / G)];
    double vmax = 1e-30;
    for (float x : H.v) vmax = std::max(vmax, static_cast<double>(std::fabs(x)));
    for (std::int32_t i = 0; i < nq; ++i) {
      const std::size_t row = static_cast<std::size_t>(i) * hq + qh;
      double err = 0;
      for (std::int32_t d = 0; d < D; ++d)
        err = std::max(err, std::fabs(static_cast<double>(out[row * D + d]) - ref[row * D + d]));
      if (err > tol * vmax)
        FAIL("query " << i << " (position " << qpos[static_cast<std::size_t>(i)] << "), q head " << qh
                      << ": max |out - ref| = " << err << " > " << tol * vmax);
      if (std::isinf(ref_lse[row])) {
        REQUIRE(std::isinf(lse[row]));
        REQUIRE(lse[row] < 0);
      } else if (std::fabs(lse[row] - ref_lse[row]) > tol * std::max(1.0, std::fabs(ref_lse[row]))) {
        FAIL("query " << i << ", q head " << qh << ": lse " << lse[row] << " vs " << ref_lse[row]);
      }
    }
  }
}

std::vector<float> random_rows(kvc_test::rng& r, std::size_t n) {
  std::vector<float> x(n);
  for (auto& e : x) e = r.normal();
  return x;
}

/// Appends `past` tokens in random chunks, then a chunk of `nq` tokens at once, to layer 0 of c.
/// Returns the chunk's positions.
template <class Cache>
std::vector<std::int32_t> fill(Cache& c, kvc::seq_id s, kvc_test::rng& r, std::int32_t past, std::int32_t nq) {
  const std::size_t row = static_cast<std::size_t>(c.config().num_kv_heads) * c.config().head_dim;
  for (std::int32_t done = 0; done < past;) {
    const std::int32_t n = std::min(past - done, r.integer(1, 40));
    const auto k = random_rows(r, n * row), v = random_rows(r, n * row);
    c.append(s, 0, k.data(), v.data(), n);
    done += n;
  }
  const auto k = random_rows(r, nq * row), v = random_rows(r, nq * row);
  c.append(s, 0, k.data(), v.data(), nq);
  std::vector<std::int32_t> qpos(static_cast<std::size_t>(nq));
  std::iota(qpos.begin(), qpos.end(), past);
  return qpos;
}

}  // namespace

TEST_CASE("prefill attention over fp32 and fp16 kv_cache equals the dense causal reference", "[prefill]") {
  kvc_test::rng r(151);
  kvc::thread_pool pool(3);
  int cases = 0;
  for (std::int32_t D : {32, 64, 80})
    for (std::int32_t hkv = 1; hkv <= 4; ++hkv)
      for (std::int32_t G = 1; G <= 4; ++G)
        for (std::int32_t nq : {1, 7, 37, 67}) {
          const std::int32_t page = (cases % 2) ? 16 : 4;  // chunks spanning page boundaries
          const std::int32_t past = r.integer(0, 50);
          const auto shape = kvc_test::cache_shape(1, hkv, D, page, 64 * hkv);
          const std::int32_t hq = hkv * G;
          kvc::thread_pool* pl = (cases % 3 == 0) ? &pool : nullptr;
          INFO("D " << D << " hkv " << hkv << " G " << G << " nq " << nq << " past " << past << " page " << page);
          {
            kvc::kv_cache<float> c(shape);
            const auto s = c.add_sequence();
            const auto qpos = fill(c, s, r, past, nq);
            const auto q = random_rows(r, static_cast<std::size_t>(nq) * hq * D);
            check_prefill(c, s, 0, read_back(c, s, 0), q, qpos, hq, pl);
          }
          if (cases % 4 == 0) {
            kvc::kv_cache<kvc::half> c(shape);
            const auto s = c.add_sequence();
            const auto qpos = fill(c, s, r, past, nq);
            const auto q = random_rows(r, static_cast<std::size_t>(nq) * hq * D);
            check_prefill(c, s, 0, read_back(c, s, 0), q, qpos, hq, pl, 0.3f);
          }
          ++cases;
        }
  // Rows beyond one task (16 blocks of 8): 3 heads x 3 queries per group x 100 queries.
  kvc::kv_cache<float> c(kvc_test::cache_shape(1, 3, 64, 16, 256));
  const auto s = c.add_sequence();
  const auto qpos = fill(c, s, r, 300, 200);
  const auto q = random_rows(r, 200 * 9 * 64);
  check_prefill(c, s, 0, read_back(c, s, 0), q, qpos, 9, &pool);
  check_prefill(c, s, 0, read_back(c, s, 0), q, qpos, 9, nullptr);
  WARN("prefill attention kernels: " << kvc_test::simd_path());
  if (kvc_test::expect_avx2()) REQUIRE(kvc_test::simd_path().find("avx2") != std::string::npos);
  if (kvc_test::expect_avx512()) REQUIRE(kvc_test::simd_path().find("avx512") != std::string::npos);
}

TEST_CASE("prefill attention over an int8 quant_cache equals the reference over its dequantized values",
          "[prefill][quant]") {
  kvc_test::rng r(152);
  kvc::thread_pool pool(2);
  int cases = 0;
  for (std::int32_t D : {32, 64})
    for (std::int32_t hkv : {1, 2, 3})
      for (std::int32_t G : {1, 3, 4})
        for (std::int32_t nq : {1, 19, 40}) {
          auto cfg = kvc_test::shape_as<kvc::quant_cache_config>(kvc_test::cache_shape(1, hkv, D, 16, 64 * hkv));
          cfg.sink_tokens = cases % 2 ? 0 : 3;
          kvc::quant_cache<kvc::quant::int8> c(cfg);
          const auto s = c.add_sequence();
          const auto qpos = fill(c, s, r, r.integer(0, 60), nq);
          const std::int32_t hq = hkv * G;
          const auto q = random_rows(r, static_cast<std::size_t>(nq) * hq * D);
          INFO("D " << D << " hkv " << hkv << " G " << G << " nq " << nq);
          const auto heads = read_back(c, s, 0);
          // The values really are quantized (else this would test the float path again).
          if (nq > 1) {
            bool differs = false;
            for (float x : heads[0].k) differs |= x != kvc::to_float(kvc::from_float<kvc::half>(x));
            CHECK(differs);
          }
          check_prefill(c, s, 0, heads, q, qpos, hq, cases % 2 ? &pool : nullptr);
          ++cases;
        }
}

TEST_CASE("prefill attention over evicted streams: non-contiguous, per-head positions", "[prefill][evict]") {
  kvc_test::rng r(153);
  for (int round = 0; round < 12; ++round) {
    const std::int32_t hkv = r.integer(1, 4), G = r.integer(1, 4), D = round % 2 ? 64 : 32, hq = hkv * G;
    kvc::kv_cache<float> c(kvc_test::cache_shape(1, hkv, D, 16, 64 * hkv));
    const auto s = c.add_sequence();
    const std::int32_t nq = r.integer(1, 50);
    const auto qpos = fill(c, s, r, r.integer(5, 120), nq);
    // Each head keeps its own random subset, chunk tokens included (a query may lose its own
    // token; one head of the later rounds keeps nothing at all).
    for (std::int32_t h = 0; h < hkv; ++h) {
      std::vector<std::int32_t> kept;
      const bool none = round >= 8 && h == hkv - 1 && hkv > 1;
      for (std::int32_t t = 0; t < c.length(s, 0, h) && !none; ++t)
        if (r.coin(0.6)) kept.push_back(t);
      c.keep(s, 0, h, kept.data(), static_cast<std::int32_t>(kept.size()));
    }
    const auto heads = read_back(c, s, 0);
    INFO("round " << round << " hkv " << hkv << " G " << G << " nq " << nq);
    const auto q = random_rows(r, static_cast<std::size_t>(nq) * hq * D);
    check_prefill(c, s, 0, heads, q, qpos, hq, nullptr);
    // Queries before every kept token of some head: those rows see nothing (zeros, lse -inf).
    std::vector<std::int32_t> early(qpos.size(), -1);
    early.back() = qpos.back();
    check_prefill(c, s, 0, heads, q, early, hq, nullptr);
  }
}

TEST_CASE("prefill attention with positions out of order", "[prefill]") {
  kvc_test::rng r(154);
  kvc::kv_cache<float> c(kvc_test::cache_shape(1, 2, 32, 16, 64));
  const auto s = c.add_sequence();
  const std::int32_t n = 90;
  std::vector<std::int32_t> pos(n);
  for (std::int32_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = (i * 37) % n;  // a permutation
  const auto k = random_rows(r, n * 64), v = random_rows(r, n * 64);
  c.append(s, 0, k.data(), v.data(), n, pos.data());
  const std::vector<std::int32_t> qpos{3, 88, 45, 0, 60, 61, 17};
  const auto q = random_rows(r, qpos.size() * 4 * 32);
  check_prefill(c, s, 0, read_back(c, s, 0), q, qpos, 4, nullptr);
}

TEST_CASE("prefill attention errors name the call, the argument, the value and the expectation",
          "[prefill][errors]") {
  kvc_test::rng r(155);
  kvc::kv_cache<float> c(kvc_test::cache_shape(1, 2, 8, 4, 16));
  const auto s = c.add_sequence();
  const auto empty = c.add_sequence();
  const auto qpos = fill(c, s, r, 3, 2);
  std::vector<float> q(2 * 4 * 8, 0.5f), out(q.size(), -7.0f);
  using Catch::Contains;
  const std::string call = "kvc::cpu::prefill_attention: ";
  auto run = [&](kvc::seq_id sq, std::int32_t layer, std::int32_t nq, const std::int32_t* qp, std::int32_t hq,
                 const kvc::decode_options& o = {}) {
    kvc::prefill_attention(c, sq, layer, q.data(), nq, qp, hq, out.data(), o);
  };
  REQUIRE_THROWS_WITH(run(77, 0, 2, qpos.data(), 4), Contains(call + "seq = 77 is not a live sequence"));
  REQUIRE_THROWS_WITH(run(s, 1, 2, qpos.data(), 4), Contains(call + "layer = 1, expected 0..0"));
  REQUIRE_THROWS_WITH(run(s, 0, 0, qpos.data(), 4), Contains(call + "num_queries = 0, expected >= 1"));
  REQUIRE_THROWS_WITH(run(s, 0, 2, qpos.data(), 3),
                      Contains(call + "num_q_heads = 3, expected a positive multiple of num_kv_heads = 2"));
  REQUIRE_THROWS_WITH(run(s, 0, 2, qpos.data(), 0),
                      Contains(call + "num_q_heads = 0, expected a positive multiple of num_kv_heads = 2"));
  REQUIRE_THROWS_WITH(run(s, 0, 2, nullptr, 4), Contains(call + "q_positions is null, expected [num_queries]"));
  kvc::decode_options o;
  std::vector<float> probs(64);
  o.probs = probs.data();
  o.probs_stride = 8;
  REQUIRE_THROWS_WITH(run(s, 0, 2, qpos.data(), 4, o), Contains(call + "opt.probs is set, expected null"));
  o.probs = nullptr;
  o.group_probs = probs.data();
  REQUIRE_THROWS_WITH(run(s, 0, 2, qpos.data(), 4, o), Contains(call + "opt.group_probs is set, expected null"));
  q[13] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_WITH(run(s, 0, 2, qpos.data(), 4), Contains(call + "q[13] = nan, expected a finite query"));
  q[13] = 0.5f;
  REQUIRE_THROWS_WITH(run(empty, 0, 2, qpos.data(), 4),
                      Contains(call + "seq = " + std::to_string(empty) + ", layer = 0 holds 0 tokens in all its kv heads"));
  // A failed call writes nothing.
  CHECK(std::all_of(out.begin(), out.end(), [](float x) { return x == -7.0f; }));
  REQUIRE_NOTHROW(run(s, 0, 2, qpos.data(), 4));
  CHECK(std::none_of(out.begin(), out.end(), [](float x) { return x == -7.0f; }));
}
