// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Comparing a kv_cache with the dense model, and snapshots of everything a cache holds (for the
/// strong-guarantee tests: a failed call must leave the snapshot unchanged).

#include <cstdint>
#include <map>
#include <set>
#include <tuple>
#include <vector>

#include <kvc/store/kv_cache.hpp>

#include "dense_reference.hpp"
#include "fast_require.hpp"
#include "kvc_catch.hpp"

namespace kvc_test {

/// The cache holds exactly what the model says: lengths, positions, K/V rows (gathered and through
/// the paged views), tokens seen, page counts, and the pool's accounting.
template <class T>
void require_matches(const kvc::kv_cache<T>& c, const dense_cache_model& m) {
  const std::int32_t P = c.config().page_size, D = m.dim;
  std::set<kvc::page_id> live;
  std::map<kvc::page_id, std::set<std::int32_t>> layers_of;  ///< the layers whose streams hold a page
  std::int64_t tokens = 0;
  std::set<std::int32_t> seqs;
  for (const auto& kv : m.streams) {
    const auto [s, l, h] = kv.first;
    seqs.insert(s);
    const auto& st = kv.second;
    INFO("seq " << s << " layer " << l << " head " << h);
    REQUIRE(c.contains(s));
    REQUIRE(c.length(s, l, h) == st.n());
    tokens += st.n();
    const std::int32_t* pos = c.positions(s, l, h);
    for (std::int32_t t = 0; t < st.n(); ++t) KVC_REQUIRE(pos[t] == st.pos[static_cast<std::size_t>(t)], "t=" << t);
    std::vector<float> k(st.k.size()), v(st.v.size());
    c.gather(s, l, h, k.data(), v.data());
    REQUIRE(k == st.k);
    REQUIRE(v == st.v);
    const auto kv_k = c.keys(s, l, h);
    const auto kv_v = c.values(s, l, h);
    REQUIRE(kv_k.extent(0) == st.n());
    REQUIRE(kv_k.extent(1) == 1);
    REQUIRE(kv_k.extent(2) == D);
    for (std::int32_t t = 0; t < st.n(); ++t)
      for (std::int32_t d = 0; d < D; ++d) {
        const std::size_t i = static_cast<std::size_t>(t) * D + d;
        KVC_REQUIRE(static_cast<float>(kv_k(t, 0, d)) == st.k[i], "t=" << t << " d=" << d);
        KVC_REQUIRE(static_cast<float>(kv_v(t, 0, d)) == st.v[i], "t=" << t << " d=" << d);
      }
    const auto& pages = c.pages(s, l, h);
    REQUIRE(static_cast<std::int32_t>(pages.size()) == (st.n() + P - 1) / P);
    REQUIRE(c.stream_bytes(s, l, h) == pages.size() * c.pool().page_bytes());
    for (kvc::page_id p : pages) {
      REQUIRE(c.pool().ref_count(p) >= 1);
      live.insert(p);
      layers_of[p].insert(l);
    }
  }
  for (const auto& sn : m.seen) REQUIRE(c.seen(sn.first.first, sn.first.second) == sn.second);
  REQUIRE(c.num_sequences() == seqs.size());
  REQUIRE(c.tokens_held() == tokens);
  // Memory is what the streams hold, each shared page once.
  REQUIRE(c.pool().pages_in_use() == static_cast<std::int32_t>(live.size()));
  REQUIRE(c.bytes_in_use() == live.size() * c.pool().page_bytes());
  // Per layer: the pages its streams hold. After share_layer a page counts in the layer that
  // allocated it (the pool's tag), which may no longer hold it: then per tag.
  std::map<std::int32_t, std::set<kvc::page_id>> by_layer, by_tag;
  for (const auto& page_layers : layers_of) {
    for (std::int32_t l : page_layers.second) by_layer[l].insert(page_layers.first);
    by_tag[c.pool().tag(page_layers.first)].insert(page_layers.first);
  }
  std::size_t sum = 0;
  for (std::int32_t l = 0; l < m.layers; ++l) {
    INFO("layer " << l);
    const auto& counted = m.layers_shared ? by_tag[l] : by_layer[l];
    REQUIRE(c.bytes_in_use(l) == counted.size() * c.pool().page_bytes());
    sum += c.bytes_in_use(l);
  }
  REQUIRE(sum == c.bytes_in_use());
}

/// Everything observable about a cache, for before/after comparisons.
struct cache_snapshot {
  struct stream_state {
    std::vector<float> k, v;
    std::vector<std::int32_t> pos;
    std::vector<kvc::page_id> pages;
    bool operator==(const stream_state& o) const {
      return k == o.k && v == o.v && pos == o.pos && pages == o.pages;
    }
  };
  std::map<std::tuple<std::int32_t, std::int32_t, std::int32_t>, stream_state> streams;
  std::map<std::pair<std::int32_t, std::int32_t>, std::int32_t> seen;
  std::vector<std::int32_t> refs;
  std::vector<std::size_t> layer_bytes;
  std::int32_t free_pages = 0;
  std::size_t sequences = 0;
  std::int64_t tokens = 0;
  std::size_t metadata = 0;
  bool operator==(const cache_snapshot& o) const {
    return streams == o.streams && seen == o.seen && refs == o.refs && layer_bytes == o.layer_bytes &&
           free_pages == o.free_pages && sequences == o.sequences && tokens == o.tokens && metadata == o.metadata;
  }
};

template <class T>
cache_snapshot snapshot(const kvc::kv_cache<T>& c, const std::vector<kvc::seq_id>& seqs) {
  cache_snapshot s;
  const auto& cfg = c.config();
  for (kvc::seq_id q : seqs) {
    if (!c.contains(q)) continue;
    for (std::int32_t l = 0; l < cfg.num_layers; ++l) {
      s.seen[{q, l}] = c.seen(q, l);
      for (std::int32_t h = 0; h < cfg.num_kv_heads; ++h) {
        cache_snapshot::stream_state st;
        const std::int32_t n = c.length(q, l, h);
        st.k.resize(static_cast<std::size_t>(n) * cfg.head_dim);
        st.v.resize(st.k.size());
        c.gather(q, l, h, st.k.data(), st.v.data());
        st.pos.assign(c.positions(q, l, h), c.positions(q, l, h) + n);
        st.pages = c.pages(q, l, h);
        s.streams[{q, l, h}] = std::move(st);
      }
    }
  }
  for (kvc::page_id p = 0; p < c.pool().capacity(); ++p) s.refs.push_back(c.pool().ref_count(p));
  for (std::int32_t l = 0; l < cfg.num_layers; ++l) s.layer_bytes.push_back(c.bytes_in_use(l));
  s.free_pages = c.pool().free_pages();
  s.sequences = c.num_sequences();
  s.tokens = c.tokens_held();
  s.metadata = c.metadata_bytes();
  return s;
}

}  // namespace kvc_test
