// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// SnapKV: the last `window` queries of the prompt (the observation window) attend to the
/// stream; their attention is averaged over the window, pooled along the tokens (avg_pool1d or
/// max_pool1d, kernel `kernel`, padding kernel/2, stride 1, zero padding counted as in
/// torch's default), and aggregated over the GQA group. The window's own tokens score the
/// maximum + 1 and above, newest highest, so they are kept first (KVCache-Factory keeps them
/// beside the budget; when the budget is below the window, the newest window tokens win).
/// Causality follows positions, so the scorer also runs on a compacted stream.
/// \par Reference
/// Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv:2404.14469.

#include <algorithm>
#include <vector>

#include <kvc/evict/core.hpp>
#include <kvc/evict/window_attention.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

enum class pooling { avg, max };

struct snapkv_params {
  std::int32_t window = 64;  ///< kvpress / KVCache-Factory window_size
  std::int32_t kernel = 5;   ///< kernel_size
  pooling pool = pooling::avg;
  group_agg agg = group_agg::mean;
  /// Attention sinks always kept (StreamingLLM's 4). With none, a decode-time budget below the
  /// recent window evicts the first token for good: GPL-3 stream protocol, snapkv ratio 0.5,
  /// Δppl +33.1 with 0 sinks, +2.1 with 4 (kvc-eval --protocols stream, 384 tokens, chunks of 16).
  std::int32_t sinks = 4;
};

namespace detail {

/// 1-d pooling of x[0..n) with kernel k (odd or even), padding k/2, stride 1, output length n
/// (the first n outputs as torch would give for even k).
inline void pool1d(const float* x, std::int32_t n, std::int32_t k, pooling mode, float* out) {
  const std::int32_t pad = k / 2;
  for (std::int32_t i = 0; i < n; ++i) {
    double s = 0;
    float m = -INFINITY;
    for (std::int32_t j = i - pad; j < i - pad + k; ++j) {
      if (j < 0 || j >= n) continue;  // zero padding (avg counts it, max ignores it)
      s += x[j];
      m = std::max(m, x[j]);
    }
    out[i] = mode == pooling::avg ? static_cast<float>(s / k) : m;
  }
}

/// SnapKV-style scores of one kv-head from a window: per query head, the window-mean attention
/// of the prefix tokens (those before the window), pooled, then aggregated over the group;
/// window tokens get max + 1.
inline void window_scores(const layer_input& in, std::int32_t h, const query_window& w, std::int32_t kernel,
                          pooling mode, group_agg agg, bool pool, float* out) {
  const head_input& hi = in.heads[static_cast<std::size_t>(h)];
  const std::int32_t n = hi.n, G = in.group();
  const std::int32_t first_q = w.n > 0 ? w.position(0, in.seen) : in.seen;
  std::int32_t prefix = 0;
  while (prefix < n && hi.positions[prefix] < first_q) ++prefix;
  std::vector<float> probs, perq(static_cast<std::size_t>(G) * prefix), tmp(static_cast<std::size_t>(prefix));
  for (std::int32_t g = 0; g < G; ++g) {
    window_probs(hi, w, h * G + g, in.seen, in.head_dim, probs);
    for (std::int32_t j = 0; j < prefix; ++j) {
      double s = 0;
      for (std::int32_t i = 0; i < w.n; ++i) s += probs[static_cast<std::size_t>(i) * n + j];
      tmp[static_cast<std::size_t>(j)] = static_cast<float>(s / std::max(1, w.n));
    }
    float* dst = perq.data() + static_cast<std::size_t>(g) * prefix;
    if (pool && kernel > 1) pool1d(tmp.data(), prefix, kernel, mode, dst);
    else std::copy(tmp.begin(), tmp.end(), dst);
  }
  aggregate_group(perq.data(), G, prefix, static_cast<std::size_t>(prefix), agg, out);
  float mx = 0.0f;
  for (std::int32_t j = 0; j < prefix; ++j) mx = std::max(mx, out[j]);
  // Window tokens rank above the prefix and, among themselves, newest first: a budget smaller
  // than the window (decode-time compression of a short sequence) then keeps the most recent
  // tokens. Equal scores would fall to the lower-index tie-break and evict the newest ones,
  // the token just generated included (it made decode-time snapkv emit "MMMM…").
  for (std::int32_t j = prefix; j < n; ++j)
    out[j] = mx + 1.0f + static_cast<float>(j - prefix + 1) / static_cast<float>(n - prefix + 1);
}

}  // namespace detail

struct snapkv {
  using params_type = snapkv_params;
  using observation_type = query_window;
  static constexpr unsigned reads = reads_keys;
  static constexpr const char* name = "snapkv";
  params_type p;
  snapkv() = default;
  explicit snapkv(const params_type& params) : p(params) { validate(); }
  void validate() const {
    KVC_EXPECTS(p.window >= 1, "window = ", p.window, ", expected >= 1 query");
    KVC_EXPECTS(p.kernel >= 1, "kernel = ", p.kernel, ", expected >= 1");
    KVC_EXPECTS(p.sinks >= 0, "sinks = ", p.sinks, ", expected >= 0");
  }
  protection protect() const { return {p.sinks, 0}; }
  /// Uses the last min(window, w.n) queries of the given window.
  void score(const layer_input& in, const observations& obs, layer_scores& out) const {
    const query_window& full = detail::need_window(obs, name);
    check_window(full, in, name);
    query_window w = full;
    if (w.n > p.window) {
      const std::int32_t skip = w.n - p.window;
      w.q = full.q + static_cast<std::size_t>(skip) * full.num_q_heads * full.head_dim;
      w.positions = full.positions ? full.positions + skip : nullptr;
      w.n = p.window;
    }
    shape_scores(in, out);
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h)
      detail::window_scores(in, h, w, p.kernel, p.pool, p.agg, true, out[static_cast<std::size_t>(h)].data());
  }
};

}  // namespace evict
KVC_END_NAMESPACE
