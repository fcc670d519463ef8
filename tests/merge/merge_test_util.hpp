// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// What the merge tests share: one stream of a merged_cache copied out as the references see it.

#include <cstdint>
#include <vector>

#include <kvc/merge/merged_cache.hpp>

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

}  // namespace kvc_test
