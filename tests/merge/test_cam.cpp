// SPDX-License-Identifier: Apache-2.0
// CaM (kvc/merge/cam.hpp) and the primitive it commits through (merged_cache::
// keep_layer_mix_values), against CaM's rule written here in double: per evicted token e,
// p_e = min(1, a_e / mean of the kept scores) (1 when that mean is 0 and a_e > 0), added as
// p_e · v_e / M' to each of its M' recipients (the first M kept tokens after e, or the last M
// kept ones when none follows). Keys, positions and log-weights of the kept tokens must not change.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <kvc/merge/cam.hpp>
#include <kvc/store/merged_cache.hpp>

#include "cache_builders.hpp"
#include "cache_checks.hpp"
#include "fast_require.hpp"
#include "kvc_catch.hpp"
#include "merge_test_util.hpp"
#include "random.hpp"

namespace {

using kvc::merge::merged_cache;

template <class T>
void cam_trials(std::uint64_t salt) {
  const bool fp16 = std::is_same<T, kvc::half>::value;
  for (int trial = 0; trial < 30; ++trial) {
    kvc_test::rng r(salt + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 3), D = r.integer(1, 40), P = 1 << r.integer(0, 4);
    kvc::merge::cam_options o;
    o.merge_span = trial % 3 == 0 ? 32 : r.integer(1, 8);
    merged_cache<T> c(kvc_test::cache_shape(1, H, D, P, 4096));
    const kvc::seq_id s = c.add_sequence();
    const std::int32_t L = r.integer(1, 120);
    const auto k = r.normals(static_cast<std::size_t>(L) * H * D), v = r.normals(k.size());
    c.append(s, 0, k.data(), v.data(), L);
    if (r.coin()) {  // some tokens already merged: their log-weights must follow them
      std::vector<std::vector<kvc::merge::merge_group>> g(static_cast<std::size_t>(H));
      for (std::int32_t h = 0; h < H && L >= 4; ++h) {
        kvc::merge::merge_group m;
        m.target = 1;
        m.members.push_back(1);
        m.members.push_back(2);
        m.weights = {1, 1};
        g[static_cast<std::size_t>(h)] = {m};
      }
      c.merge_layer(s, 0, g);
    }
    std::vector<std::vector<float>> scores(static_cast<std::size_t>(H));
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H));
    std::vector<std::vector<float>> k0(static_cast<std::size_t>(H)), v0(static_cast<std::size_t>(H)), lw0(static_cast<std::size_t>(H));
    std::vector<std::vector<std::int32_t>> p0(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) {
      const std::int32_t n = c.length(s, 0, h);
      auto& sc = scores[static_cast<std::size_t>(h)];
      for (std::int32_t t = 0; t < n; ++t) sc.push_back(r.coin(0.2) ? 0.0f : r.uniform(0.0f, 1.0f) * r.uniform(0.0f, 1.0f));
      kept[static_cast<std::size_t>(h)] = r.subset(n, r.integer(0, n));
      if (trial % 10 == 4)  // no kept token had attention: every evicted token with a score merges fully
        for (std::int32_t t : kept[static_cast<std::size_t>(h)]) sc[static_cast<std::size_t>(t)] = 0.0f;
      k0[static_cast<std::size_t>(h)].resize(static_cast<std::size_t>(n) * D);
      v0[static_cast<std::size_t>(h)].resize(static_cast<std::size_t>(n) * D);
      c.cache().gather(s, 0, h, k0[static_cast<std::size_t>(h)].data(), v0[static_cast<std::size_t>(h)].data());
      lw0[static_cast<std::size_t>(h)] = c.log_weights(s, 0, h);
      for (std::int32_t t = 0; t < n; ++t) p0[static_cast<std::size_t>(h)].push_back(c.cache().positions(s, 0, h)[t]);
    }
    INFO("trial " << trial << (fp16 ? " fp16" : " fp32") << " H=" << H << " D=" << D << " P=" << P << " M=" << o.merge_span);
    const std::size_t bytes_before = c.bytes_in_use();
    kvc::merge::cam_merge_layer(c, s, 0, scores, kept, o);
    // Accounting: never more bytes than before, and exactly the pool's pages. The pages a head
    // needs after its keep: ceil(K / P) each.
    REQUIRE(c.bytes_in_use() <= bytes_before);
    REQUIRE(c.bytes_in_use() == static_cast<std::size_t>(c.cache().pool().pages_in_use()) * c.cache().pool().page_bytes());
    std::int32_t pages_kept = 0;
    for (const auto& kh : kept) pages_kept += (static_cast<std::int32_t>(kh.size()) + P - 1) / P;
    REQUIRE(c.cache().pool().pages_in_use() == pages_kept);
    for (std::int32_t h = 0; h < H; ++h) {
      const auto& kh = kept[static_cast<std::size_t>(h)];
      const auto& sc = scores[static_cast<std::size_t>(h)];
      const std::int32_t n = static_cast<std::int32_t>(sc.size()), K = static_cast<std::int32_t>(kh.size());
      // The rule in double.
      std::vector<double> want(static_cast<std::size_t>(K) * D);
      for (std::int32_t i = 0; i < K; ++i)
        for (std::int32_t d = 0; d < D; ++d)
          want[static_cast<std::size_t>(i) * D + d] = v0[static_cast<std::size_t>(h)][static_cast<std::size_t>(kh[static_cast<std::size_t>(i)]) * D + d];
      double abar = 0;
      for (std::int32_t t : kh) abar += sc[static_cast<std::size_t>(t)];
      if (K > 0) abar /= K;
      for (std::int32_t e = 0; e < n && K > 0; ++e) {
        if (std::binary_search(kh.begin(), kh.end(), e)) continue;
        const double a = sc[static_cast<std::size_t>(e)];
        const double p = abar > 0 ? std::min(1.0, a / abar) : (a > 0 ? 1.0 : 0.0);
        std::vector<std::int32_t> rec;  // kept slots receiving e
        for (std::int32_t i = 0; i < K && static_cast<std::int32_t>(rec.size()) < o.merge_span; ++i)
          if (kh[static_cast<std::size_t>(i)] > e) rec.push_back(i);
        if (rec.empty())
          for (std::int32_t i = std::max(0, K - o.merge_span); i < K; ++i) rec.push_back(i);
        for (std::int32_t i : rec)
          for (std::int32_t d = 0; d < D; ++d)
            want[static_cast<std::size_t>(i) * D + d] +=
                p / static_cast<double>(rec.size()) * v0[static_cast<std::size_t>(h)][static_cast<std::size_t>(e) * D + d];
      }
      REQUIRE(c.length(s, 0, h) == K);
      std::vector<float> kg(static_cast<std::size_t>(K) * D), vg(kg.size());
      c.cache().gather(s, 0, h, kg.data(), vg.data());
      const double tol = fp16 ? 1.0 / 1024 : 4e-7;
      for (std::int32_t i = 0; i < K; ++i) {
        const std::size_t src = static_cast<std::size_t>(kh[static_cast<std::size_t>(i)]);
        REQUIRE(c.cache().positions(s, 0, h)[i] == p0[static_cast<std::size_t>(h)][src]);
        REQUIRE(c.log_weights(s, 0, h)[static_cast<std::size_t>(i)] == lw0[static_cast<std::size_t>(h)][src]);
        for (std::int32_t d = 0; d < D; ++d) {
          REQUIRE(kg[static_cast<std::size_t>(i) * D + d] == k0[static_cast<std::size_t>(h)][src * D + d]);
          const double w = want[static_cast<std::size_t>(i) * D + d];
          KVC_REQUIRE(std::fabs(vg[static_cast<std::size_t>(i) * D + d] - w) <= tol * (std::fabs(w) + 1),
                      "h " << h << " i " << i << " d " << d << ": " << vg[static_cast<std::size_t>(i) * D + d] << " vs " << w);
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("CaM merges evicted values into kept ones by the published rule's expectation", "[merge][cam]") {
  cam_trials<float>(9900);
  cam_trials<kvc::half>(9950);
}

TEST_CASE("CaM and keep_layer_mix_values reject bad arguments and change nothing", "[merge][cam][strong]") {
  kvc_test::rng r(9990);
  merged_cache<float> c(kvc_test::cache_shape(1, 2, 8, 4, 1024));
  const kvc::seq_id s = c.add_sequence();
  const auto k = r.normals(20 * 2 * 8), v = r.normals(k.size());
  c.append(s, 0, k.data(), v.data(), 20);
  const auto before = kvc_test::snapshot(c.cache(), {s});
  std::vector<std::vector<float>> scores(2, std::vector<float>(20, 0.5f));
  std::vector<std::vector<std::int32_t>> kept = {{0, 5, 9}, {1, 2, 19}};
  auto expect_error = [&](auto&& call, const std::string& text) {
    kvc_test::require_error(call, text);
    REQUIRE(kvc_test::snapshot(c.cache(), {s}) == before);
    for (std::int32_t h = 0; h < 2; ++h) REQUIRE(c.log_weights(s, 0, h) == std::vector<float>(20, 0.0f));
  };
  auto bad = scores;
  bad[1][3] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { kvc::merge::cam_merge_layer(c, s, 0, bad, kept); }, "scores[3] = nan, expected a finite attention score >= 0");
  bad = scores;
  bad[0][7] = -1.0f;
  expect_error([&] { kvc::merge::cam_merge_layer(c, s, 0, bad, kept); }, "scores[7] = -1");
  bad = scores;
  bad[0].pop_back();
  expect_error([&] { kvc::merge::cam_merge_layer(c, s, 0, bad, kept); }, "scores[0].size() = 19, expected the head's length 20");
  auto kbad = kept;
  kbad[1].clear();
  kbad[1].push_back(3);
  kbad[1].push_back(2);
  expect_error([&] { kvc::merge::cam_merge_layer(c, s, 0, scores, kbad); }, "kept[1] = 2 after 3");
  kvc::merge::cam_options o;
  o.merge_span = 0;
  expect_error([&] { kvc::merge::cam_merge_layer(c, s, 0, scores, kept, o); }, "cam_options.merge_span = 0");
  using kvc::merge::value_mix;
  expect_error([&] { c.keep_layer_mix_values(s, 0, kept, {{{5, 1, 0.5f}}, {{3, 1, 0.5f}}}); },
               "mixes[1][0].recipient = 3, expected a kept token of kv head 1");
  expect_error([&] { c.keep_layer_mix_values(s, 0, kept, {{{5, 20, 0.5f}}, {}}); }, "mixes[0][0].source = 20, expected 0..19");
  expect_error([&] { c.keep_layer_mix_values(s, 0, kept, {{{5, 1, std::numeric_limits<float>::infinity()}}, {}}); },
               "mixes[0][0].coef = inf");
  expect_error([&] { c.keep_layer_mix_values(s, 0, kept, {{}}); }, "mixes.size() = 1, expected num_kv_heads = 2");
}

TEST_CASE("CaM on a forked sequence with the pool exhausted changes nothing", "[merge][cam][strong]") {
  for (int trial = 0; trial < 6; ++trial) {
    kvc_test::rng r(9970 + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 3), P = 4, D = r.integer(2, 20), L = r.integer(9, 40);
    const std::int32_t pages = H * ((L + P - 1) / P);
    // Exactly the pages the prompt needs: the step must copy a shared page, and cannot.
    merged_cache<float> c(kvc_test::cache_shape(1, H, D, P, pages));
    const kvc::seq_id a = c.add_sequence();
    const auto k = r.normals(static_cast<std::size_t>(L) * H * D), v = r.normals(k.size());
    c.append(a, 0, k.data(), v.data(), L);
    const kvc::seq_id b = c.fork(a);
    std::vector<std::vector<float>> scores(static_cast<std::size_t>(H));
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) {
      for (std::int32_t t = 0; t < L; ++t) {
        scores[static_cast<std::size_t>(h)].push_back(r.uniform(0.1f, 1.0f));
        if (t != 1) kept[static_cast<std::size_t>(h)].push_back(t);  // evict token 1: its value goes to the next kept ones
      }
    }
    auto state = [&] { return kvc_test::full_state(c, {a, b}); };
    const auto before = state();
    const kvc::seq_id target = trial % 2 ? a : b;
    REQUIRE_THROWS_AS(kvc::merge::cam_merge_layer(c, target, 0, scores, kept), kvc::out_of_memory);
    REQUIRE(state() == before);
    REQUIRE(c.cache().pool().pages_in_use() == pages);
    // With the sibling gone, the step goes through: one token fewer per head, its value merged.
    c.remove_sequence(target == a ? b : a);
    kvc::merge::cam_merge_layer(c, target, 0, scores, kept);
    for (std::int32_t h = 0; h < H; ++h) REQUIRE(c.length(target, 0, h) == L - 1);
    REQUIRE(c.bytes_in_use() == static_cast<std::size_t>(c.cache().pool().pages_in_use()) * c.cache().pool().page_bytes());
  }
}
