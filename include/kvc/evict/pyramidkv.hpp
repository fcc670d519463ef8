// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// PyramidKV: SnapKV scores with per-layer budgets that decrease linearly from the first layer to
/// the last (KVCache-Factory `PyramidKVCluster`: min = (C - w) / beta, max = 2 (C - w) - min,
/// window w kept in every layer). Its preferred allocator is allocator::pyramid(beta, window);
/// the compressor uses it unless told otherwise.
/// \par Reference
/// Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling", arXiv:2406.02069.

#include <kvc/budget/allocator.hpp>
#include <kvc/evict/snapkv.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct pyramidkv_params {
  std::int32_t window = 64;
  std::int32_t kernel = 5;
  std::int32_t beta = 20;
  pooling pool = pooling::avg;
  group_agg agg = group_agg::mean;
  /// Attention sinks always kept (StreamingLLM's 4). With none, a decode-time budget below the
  /// recent window evicts the first token for good: GPL-3 stream protocol, snapkv ratio 0.5,
  /// Δppl +33.1 with 0 sinks, +2.1 with 4 (kvc-eval --protocols stream, 384 tokens, chunks of 16).
  std::int32_t sinks = 4;
};

struct pyramidkv {
  using params_type = pyramidkv_params;
  using observation_type = query_window;
  static constexpr unsigned reads = reads_keys;
  static constexpr const char* name = "pyramidkv";
  params_type p;
  pyramidkv() = default;
  explicit pyramidkv(const params_type& params) : p(params) {
    KVC_EXPECTS(p.beta >= 1, "beta = ", p.beta, ", expected >= 1");
    inner().validate();
  }
  snapkv inner() const { return snapkv(snapkv_params{p.window, p.kernel, p.pool, p.agg, p.sinks}); }
  protection protect() const { return {p.sinks, 0}; }
  allocator preferred_allocator() const { return allocator::pyramid(p.beta, p.window); }
  void score(const layer_input& in, const observations& obs, layer_scores& out) const { inner().score(in, obs, out); }
};

}  // namespace evict
KVC_END_NAMESPACE
