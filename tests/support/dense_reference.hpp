// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Dense double-precision references for kvc's tests, written from the formulas and sharing no
/// code with include/kvc (not even kvc::reference):
///  - decode attention over per-head dense K/V rows (GQA: query head q reads kv head q / G);
///  - a dense model of a KV cache: per (sequence, layer, head) rows of K and V and positions.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <tuple>
#include <vector>

namespace kvc_test {

/// One kv head: n rows of K and V, [n][dim], and a per-token bias on the logits (a merged token's
/// log-weight; empty: 0).
struct dense_head {
  std::vector<double> k, v;
  std::int32_t n = 0;
  std::vector<double> bias;
};

struct dense_attention_result {
  std::vector<double> out;          ///< [num_q_heads][dim]
  std::vector<double> lse;          ///< [num_q_heads]; -inf for an empty head
  std::vector<double> probs;        ///< [num_q_heads][stride]
  std::vector<double> group_probs;  ///< [num_kv_heads][stride]
  std::int32_t stride = 0;          ///< the longest head
};

/// out_q = sum_t softmax_t(scale * <q, k_t> + bias_t) v_t, everything in double.
inline dense_attention_result dense_decode_attention(const std::vector<dense_head>& heads, std::int32_t dim,
                                                     const float* q, std::int32_t num_q_heads, double scale) {
  const std::int32_t hkv = static_cast<std::int32_t>(heads.size());
  const std::int32_t group = num_q_heads / hkv;
  dense_attention_result r;
  for (const auto& h : heads) r.stride = std::max(r.stride, h.n);
  r.out.assign(static_cast<std::size_t>(num_q_heads) * dim, 0.0);
  r.lse.assign(static_cast<std::size_t>(num_q_heads), -std::numeric_limits<double>::infinity());
  r.probs.assign(static_cast<std::size_t>(num_q_heads) * r.stride, 0.0);
  r.group_probs.assign(static_cast<std::size_t>(hkv) * r.stride, 0.0);
  for (std::int32_t qh = 0; qh < num_q_heads; ++qh) {
    const std::int32_t kh = qh / group;
    const dense_head& H = heads[static_cast<std::size_t>(kh)];
    if (H.n == 0) continue;
    std::vector<double> s(static_cast<std::size_t>(H.n));
    for (std::int32_t t = 0; t < H.n; ++t) {
      double dot = 0;
      for (std::int32_t d = 0; d < dim; ++d)
        dot += static_cast<double>(q[static_cast<std::size_t>(qh) * dim + d]) * H.k[static_cast<std::size_t>(t) * dim + d];
      s[static_cast<std::size_t>(t)] = scale * dot + (H.bias.empty() ? 0.0 : H.bias[static_cast<std::size_t>(t)]);
    }
    const double m = *std::max_element(s.begin(), s.end());
    double z = 0;
    for (double x : s) z += std::exp(x - m);
    r.lse[static_cast<std::size_t>(qh)] = m + std::log(z);
    for (std::int32_t t = 0; t < H.n; ++t) {
      const double p = std::exp(s[static_cast<std::size_t>(t)] - m) / z;
      r.probs[static_cast<std::size_t>(qh) * r.stride + t] = p;
      r.group_probs[static_cast<std::size_t>(kh) * r.stride + t] += p;
      for (std::int32_t d = 0; d < dim; ++d)
        r.out[static_cast<std::size_t>(qh) * dim + d] += p * H.v[static_cast<std::size_t>(t) * dim + d];
    }
  }
  return r;
}

/// What a KV cache should hold: per (sequence, layer, head) the rows appended and kept, and the
/// original position of each, plus tokens seen per (sequence, layer).
struct dense_cache_model {
  struct stream {
    std::vector<float> k, v;  ///< [n][dim], the values as stored (after the storage rounding)
    std::vector<std::int32_t> pos;
    std::int32_t n() const { return static_cast<std::int32_t>(pos.size()); }
  };
  std::int32_t layers = 1, heads = 1, dim = 1;
  std::map<std::tuple<std::int32_t, std::int32_t, std::int32_t>, stream> streams;  ///< (seq, layer, head)
  std::map<std::pair<std::int32_t, std::int32_t>, std::int32_t> seen;               ///< (seq, layer)
  bool layers_shared = false;  ///< share_layer was called: pages may count in a layer that no longer holds them

  void add_sequence(std::int32_t s) {
    for (std::int32_t l = 0; l < layers; ++l) {
      seen[{s, l}] = 0;
      for (std::int32_t h = 0; h < heads; ++h) streams[{s, l, h}] = stream{};
    }
  }
  void remove_sequence(std::int32_t s) {
    for (std::int32_t l = 0; l < layers; ++l) {
      seen.erase({s, l});
      for (std::int32_t h = 0; h < heads; ++h) streams.erase({s, l, h});
    }
  }
  void fork(std::int32_t from, std::int32_t to) {
    for (std::int32_t l = 0; l < layers; ++l) {
      seen[{to, l}] = seen[{from, l}];
      for (std::int32_t h = 0; h < heads; ++h) streams[{to, l, h}] = streams[{from, l, h}];
    }
  }
  /// k, v: [n][heads][dim] already rounded to the storage type.
  void append(std::int32_t s, std::int32_t l, const std::vector<float>& k, const std::vector<float>& v,
              std::int32_t n, const std::int32_t* positions = nullptr) {
    std::int32_t& sn = seen[{s, l}];
    for (std::int32_t h = 0; h < heads; ++h) {
      stream& st = streams[{s, l, h}];
      for (std::int32_t i = 0; i < n; ++i) {
        const std::size_t row = (static_cast<std::size_t>(i) * heads + h) * dim;
        st.k.insert(st.k.end(), k.begin() + static_cast<std::ptrdiff_t>(row),
                    k.begin() + static_cast<std::ptrdiff_t>(row + dim));
        st.v.insert(st.v.end(), v.begin() + static_cast<std::ptrdiff_t>(row),
                    v.begin() + static_cast<std::ptrdiff_t>(row + dim));
        st.pos.push_back(positions ? positions[i] : sn + i);
      }
    }
    sn += n;
  }
  void keep(std::int32_t s, std::int32_t l, std::int32_t h, const std::vector<std::int32_t>& kept) {
    stream& st = streams[{s, l, h}];
    stream nw;
    for (std::int32_t i : kept) {
      const std::size_t row = static_cast<std::size_t>(i) * dim;
      nw.k.insert(nw.k.end(), st.k.begin() + static_cast<std::ptrdiff_t>(row),
                  st.k.begin() + static_cast<std::ptrdiff_t>(row + dim));
      nw.v.insert(nw.v.end(), st.v.begin() + static_cast<std::ptrdiff_t>(row),
                  st.v.begin() + static_cast<std::ptrdiff_t>(row + dim));
      nw.pos.push_back(st.pos[static_cast<std::size_t>(i)]);
    }
    st = std::move(nw);
  }
  /// kv_cache::rewind by its definition: every head forgets its tokens at positions >= n, and the
  /// layer has seen n tokens.
  void rewind(std::int32_t s, std::int32_t l, std::int32_t n) {
    for (std::int32_t h = 0; h < heads; ++h) {
      const stream& st = streams[{s, l, h}];
      std::vector<std::int32_t> kept;
      for (std::int32_t t = 0; t < st.n(); ++t)
        if (st.pos[static_cast<std::size_t>(t)] < n) kept.push_back(t);
      keep(s, l, h, kept);
    }
    seen[{s, l}] = n;
  }
  /// kv_cache::share_layer by its definition: layer l of s holds what layer `from` holds, and has
  /// seen as many tokens.
  void share_layer(std::int32_t s, std::int32_t l, std::int32_t from) {
    for (std::int32_t h = 0; h < heads; ++h) streams[{s, l, h}] = streams[{s, from, h}];
    seen[{s, l}] = seen[{s, from}];
    layers_shared = true;
  }
  /// The stream as a dense_head (for the attention reference).
  dense_head head(std::int32_t s, std::int32_t l, std::int32_t h) const {
    const stream& st = streams.at({s, l, h});
    dense_head d;
    d.n = st.n();
    d.k.assign(st.k.begin(), st.k.end());
    d.v.assign(st.v.begin(), st.v.end());
    return d;
  }
};

}  // namespace kvc_test
