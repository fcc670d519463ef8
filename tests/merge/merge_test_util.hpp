// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// What the merge tests share: one stream of a merged_cache copied out as the references see it,
/// earlier merges to start from, and the check that a call throws kvc::error with a message.

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/store/merged_cache.hpp>

#include "cache_checks.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace kvc_test {

/// One stream as a reference sees it: rows in float (as stored), log-weights, positions.
struct stream_copy {
  std::vector<float> k, v, lw;
  std::vector<std::int32_t> pos;
  std::int32_t n = 0;
};

template <class T>
stream_copy copy_stream(const kvc::merge::merged_cache<T>& c, kvc::seq_id s, std::int32_t l, std::int32_t h) {
  stream_copy st;
  const std::int32_t D = c.config().head_dim;
  st.n = c.length(s, l, h);
  st.k.resize(static_cast<std::size_t>(st.n) * D);
  st.v.resize(st.k.size());
  c.cache().gather(s, l, h, st.k.data(), st.v.data());
  st.lw = c.log_weights(s, l, h);
  st.pos.assign(c.cache().positions(s, l, h), c.cache().positions(s, l, h) + st.n);
  return st;
}

/// Everything a merge step could change, for the strong-guarantee tests: the store's snapshot,
/// every stream's log-weights, pool bytes.
template <class T>
auto full_state(const kvc::merge::merged_cache<T>& c, const std::vector<kvc::seq_id>& seqs) {
  std::vector<std::vector<float>> lw;
  for (kvc::seq_id q : seqs)
    for (std::int32_t l = 0; l < c.config().num_layers; ++l)
      for (std::int32_t h = 0; h < c.config().num_kv_heads; ++h) lw.push_back(c.log_weights(q, l, h));
  return std::make_tuple(snapshot(c.cache(), seqs), lw, c.bytes_in_use());
}

/// Some tokens already merged (log-weights != 0), so their mass must count in the next merge:
/// groups {t, t+1, t+2} at random gaps of 3..max_gap tokens in every kv head of the layer.
template <class T>
void premerge(kvc::merge::merged_cache<T>& c, kvc::seq_id s, std::int32_t layer, rng& r, std::int32_t max_gap) {
  const std::int32_t H = c.config().num_kv_heads;
  std::vector<std::vector<kvc::merge::merge_group>> g(static_cast<std::size_t>(H));
  for (std::int32_t h = 0; h < H; ++h) {
    const std::int32_t n = c.length(s, layer, h);
    for (std::int32_t t = 0; t + 2 < n; t += r.integer(3, max_gap)) {
      kvc::merge::merge_group m;
      m.target = t + 1;
      // push_back, not `= {...}`: GCC 12 -O3 reports a false -Wnonnull in the vector<int>
      // initializer-list assignment it clones for some callers.
      for (std::int32_t u = t; u < t + 3; ++u) m.members.push_back(u);
      m.weights.push_back(r.uniform(0.2f, 2.0f));
      m.weights.push_back(1.0f);
      m.weights.push_back(r.uniform(0.0f, 2.0f));
      g[static_cast<std::size_t>(h)].push_back(m);
    }
  }
  c.merge_layer(s, layer, g);
}

/// Tolerance of merged rows against the double references: fp16 pages round to 2^-10 relative;
/// float pages to a few ulp of the double mean.
inline double merged_row_tol(bool fp16) { return fp16 ? 1.0 / 1024 : 4e-7; }

/// call() must throw kvc::error whose message contains `text`; the caller checks after it that
/// nothing changed.
template <class F>
void require_error(F&& call, const std::string& text) {
  INFO("expect: " << text);
  bool threw = false;
  try {
    call();
  } catch (const kvc::error& e) {
    threw = true;
    INFO("what: " << e.what());
    REQUIRE(std::string(e.what()).find(text) != std::string::npos);
  }
  REQUIRE(threw);
}

}  // namespace kvc_test
