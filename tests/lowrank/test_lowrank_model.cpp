// SPDX-License-Identifier: Apache-2.0
// The low-rank fuzzer's reference (tests/fuzz/fuzz_lowrank.cpp) run on fixed-seed random inputs in
// every ordinary build: pca, palu, think and xkv through any_cache against the reference kept
// there (positions, seen, rows a call must not re-encode, full-rank rows against the appended
// ones, attention against a double softmax over gather(), the strong guarantee, an empty pool at
// the end). The fuzzer explores; this keeps what it checks from regressing between campaigns.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cache_builders.hpp"
#include "kvc_catch.hpp"

// The model and the runner; its LLVMFuzzerTestOneInput is an unused symbol here.
#include "../fuzz/fuzz_lowrank.cpp"

TEST_CASE("lowrank model: random operation sequences on pca, palu, think and xkv", "[lowrank][storage_model]") {
  kvc_fuzz::throw_on_failure() = true;
  std::mt19937 g(20261206u);
  for (int i = 0; i < 4 * 20; ++i) {
    std::vector<std::uint8_t> in(700);
    for (auto& b : in) b = static_cast<std::uint8_t>(g());
    in[0] = static_cast<std::uint8_t>(i % 4);  // the family: every one gets the same share
    INFO("input " << i);
    REQUIRE_NOTHROW(lowrankfuzz::run_one(in.data(), in.size()));
  }
  kvc_fuzz::throw_on_failure() = false;
}

// Found by the fuzzer (issue 12; fixed in xkv_storage.hpp): a sequence whose group moved while it
// held no token keeps every later token in the tail, and its group may have no basis; attention
// then asked the empty basis for its slices (std::out_of_range, not a kvc error, and no output).
TEST_CASE("xkv: attention over a sequence that moved while empty reads only its tail", "[lowrank][xkv]") {
  auto cache = kvc::runtime::make_cache("xkv(group=1,rank=4,pre_rope=0)", kvc_test::cache_shape(1, 1, 8, 4, 16));
  const kvc::seq_id s = cache->add_sequence();
  cache->observe_window(s, 0, nullptr, 0, 1);  // the move of an empty prompt: no basis is fitted
  std::mt19937 g(7u);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const int n = 5;
  std::vector<float> k(n * 8), v(n * 8), q(8), out(8, -1.0f);
  for (auto* x : {&k, &v, &q})
    for (float& e : *x) e = u(g);
  cache->append(s, 0, k.data(), v.data(), n);
  REQUIRE(cache->length(s, 0, 0) == n);
  REQUIRE_NOTHROW(cache->attention(s, 0, q.data(), 1, out.data(), {}));
  // The tail is fp16 whole tokens: a double softmax over them.
  std::vector<double> w(n);
  double mx = -1e300, z = 0;
  for (int t = 0; t < n; ++t) {
    double a = 0;
    for (int d = 0; d < 8; ++d) a += static_cast<double>(q[d]) * static_cast<double>(kvc::half(k[t * 8 + d]));
    w[t] = a / std::sqrt(8.0);
    mx = std::max(mx, w[t]);
  }
  for (double& x : w) z += (x = std::exp(x - mx));
  for (int d = 0; d < 8; ++d) {
    double want = 0;
    for (int t = 0; t < n; ++t) want += w[t] / z * static_cast<double>(kvc::half(v[t * 8 + d]));
    CHECK(std::fabs(out[d] - want) < 1e-3);
  }
}
