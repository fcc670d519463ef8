// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// SimLayerKV: a layer is lazy when the last `n_last` queries put more than `lazy_threshold` of
/// their attention (mean over query heads and those queries) on the first `n_initial` and last
/// `n_recent` tokens; lazy layers keep only those tokens, other layers keep everything (the budget
/// does not apply). kvpress defaults (threshold 1.0 disables it; the paper tunes it per model).
/// \par Reference
/// Zhang et al., "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction", arXiv:2410.13846.

#include <vector>

#include <kvc/evict/select.hpp>
#include <kvc/evict/window_attention.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct simlayerkv_params {
  std::int32_t n_last = 1;
  std::int32_t n_recent = 1024;
  std::int32_t n_initial = 4;
  float lazy_threshold = 1.0f;
};

struct simlayerkv {
  using params_type = simlayerkv_params;
  using observation_type = query_window;
  static constexpr unsigned reads = reads_keys;
  static constexpr const char* name = "simlayerkv";
  params_type p;
  simlayerkv() = default;
  explicit simlayerkv(const params_type& params) : p(params) {
    KVC_EXPECTS(p.n_last >= 1 && p.n_recent >= 0 && p.n_initial >= 0, "n_last/n_recent/n_initial = ", p.n_last, "/",
                p.n_recent, "/", p.n_initial, ", expected n_last >= 1, others >= 0");
  }
  protection protect() const { return {p.n_initial, p.n_recent}; }

  /// Mass of the last n_last window queries on the initial + recent tokens, mean over heads.
  double lazy_mass(const layer_input& in, const query_window& w) const {
    query_window last = w;
    const std::int32_t m = std::min(p.n_last, w.n);
    last.q = w.q + static_cast<std::size_t>(w.n - m) * w.num_q_heads * w.head_dim;
    last.positions = w.positions ? w.positions + (w.n - m) : nullptr;
    last.n = m;
    const std::int32_t G = in.group();
    std::vector<float> probs;
    double mass = 0;
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const head_input& hi = in.heads[static_cast<std::size_t>(h)];
      for (std::int32_t g = 0; g < G; ++g) {
        window_probs(hi, last, h * G + g, in.seen, in.head_dim, probs);
        for (std::int32_t i = 0; i < m; ++i)
          for (std::int32_t t = 0; t < hi.n; ++t)
            if (is_protected(protect(), t, hi.n)) mass += probs[static_cast<std::size_t>(i) * hi.n + t];
      }
    }
    return mass / (static_cast<double>(in.num_q_heads) * std::max(1, m));
  }

  /// Score 1 for the initial/recent tokens, 0 elsewhere (what a lazy layer keeps).
  void score(const layer_input& in, const observations& obs, layer_scores& out) const {
    detail::need_window(obs, name);
    shape_scores(in, out);
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h)
      for (std::int32_t t = 0; t < in.heads[static_cast<std::size_t>(h)].n; ++t)
        out[static_cast<std::size_t>(h)][static_cast<std::size_t>(t)] = is_protected(protect(), t, in.heads[static_cast<std::size_t>(h)].n);
  }

  void select(const layer_input& in, const observations& obs, const layer_scores& s, const budget&, const allocator&,
              protection, layer_selection& out) const {
    const query_window& w = detail::need_window(obs, name);
    check_window(w, in, name);
    const bool lazy = lazy_mass(in, w) > p.lazy_threshold;
    out.assign(static_cast<std::size_t>(in.num_kv_heads), {});
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h) {
      const std::int32_t n = in.heads[static_cast<std::size_t>(h)].n;
      select_top(s[static_cast<std::size_t>(h)].data(), n, lazy ? protected_count(protect(), n) : n, protect(),
                 out[static_cast<std::size_t>(h)]);
    }
  }
};

}  // namespace evict
KVC_END_NAMESPACE
