// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// The shapes the tests build caches with, and random fills that keep the dense model in step, in
/// one place: the same five-field config and the same chunked append loop were written out in
/// every test that needed them.

#include <algorithm>
#include <cstdint>
#include <vector>

#include <kvc/store/kv_cache.hpp>

#include "dense_reference.hpp"
#include "random.hpp"

namespace kvc_test {

/// A kv_cache shape: layers x kv heads x head_dim, pages of page_size tokens, max_pages of them.
inline kvc::cache_config cache_shape(std::int32_t layers, std::int32_t kv_heads, std::int32_t head_dim,
                                     std::int32_t page_size, std::int32_t max_pages) {
  kvc::cache_config c;
  c.num_layers = layers;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.page_size = page_size;
  c.max_pages = max_pages;
  return c;
}

/// The same shape for a quantized cache (any config derived from cache_config, e.g.
/// kvc::quant_cache_config), whose other fields keep their defaults for the caller to set.
template <class Config>
Config shape_as(const kvc::cache_config& shape) {
  Config c;
  static_cast<kvc::cache_config&>(c) = shape;
  return c;
}

/// Appends `total` random N(0,1) tokens to (s, layer) of `cache` in chunks of 1..max_chunk (a
/// single token with probability p_single), rounded to the storage type T so that `model` holds
/// exactly what the cache stores.
template <class T, class Cache>
void append_random_chunks(Cache& cache, dense_cache_model& model, kvc::seq_id s, std::int32_t layer,
                          std::int32_t total, std::int32_t max_chunk, double p_single, rng& r) {
  const std::size_t row = static_cast<std::size_t>(model.heads) * static_cast<std::size_t>(model.dim);
  for (std::int32_t done = 0; done < total;) {
    const std::int32_t n = std::min(total - done, p_single > 0 && r.coin(p_single) ? 1 : r.integer(1, max_chunk));
    std::vector<float> k(static_cast<std::size_t>(n) * row), v(k.size());
    for (auto& x : k) x = kvc::to_float(kvc::from_float<T>(r.normal()));
    for (auto& x : v) x = kvc::to_float(kvc::from_float<T>(r.normal()));
    cache.append(s, layer, k.data(), v.data(), n);
    model.append(s, layer, k, v, n);
    done += n;
  }
}

}  // namespace kvc_test
