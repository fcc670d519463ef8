// SPDX-License-Identifier: Apache-2.0
// The storage fuzzer's reference model (tests/fuzz/fuzz_storage.cpp) run on fixed-seed random
// inputs in every ordinary build: every runtime storage against the dense reference (positions,
// per-codec bounds, page-exact bytes, strong guarantee). The fuzzer explores; this keeps what it
// checks from regressing between fuzzing campaigns.
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kvc_catch.hpp"

// The model and the runner; its LLVMFuzzerTestOneInput is an unused symbol here.
#include "../fuzz/fuzz_storage.cpp"

TEST_CASE("storage model: random operation sequences on every storage family", "[runtime][storage_model]") {
  storagefuzz::throw_on_failure() = true;
  std::mt19937 g(20261203u);
  // Family is the 5th 16-bit draw of choose(); cycle it so every family gets the same share.
  for (int i = 0; i < 14 * 24; ++i) {
    std::vector<std::uint8_t> in(600);
    for (auto& b : in) b = static_cast<std::uint8_t>(g());
    in[8] = static_cast<std::uint8_t>(i % 14);
    in[9] = 0;
    INFO("input " << i);
    REQUIRE_NOTHROW(storagefuzz::run_one(in.data(), in.size()));
  }
  storagefuzz::throw_on_failure() = false;
}
