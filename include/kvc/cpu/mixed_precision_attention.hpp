// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `kvc::cpu::decode_attention` over a `mixed_precision_cache`: the fused quantized kernel runs over
/// each of its two stores and the two partial softmaxes are merged exactly by their log-sum-exp; no
/// full-precision copy of the context is made. probs / group_probs come back in logical order.
/// A kernel, so it lives in cpu/ above the store it reads (quant/ never includes cpu/).
///
/// \par Reference
/// Yang et al., "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed
/// Precision Quantization" (MiKV), arXiv:2402.18096.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/quant_attention.hpp>
#include <kvc/error.hpp>
#include <kvc/store/mixed_precision_cache.hpp>
#include <kvc/view/heads.hpp>

KVC_BEGIN_NAMESPACE

namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md

/// Decode attention over both precisions of a mixed_precision_cache: the fused quantized kernel
/// runs over each store, and the two partial softmaxes are merged exactly by their log-sum-exp.
/// Same options as the quant_cache overload (probs and group_probs in logical token order).
template <class Arch = default_arch, class HQ, class LQ, class Fp>
void decode_attention(const mixed_precision_cache<HQ, LQ, Fp>& cache, seq_id seq, std::int32_t layer, const float* q,
                      std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  const std::int32_t hkv = cache.config().num_kv_heads, D = cache.config().head_dim;
  KVC_EXPECTS_IN("kvc::cpu::decode_attention", num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
              ", expected a positive multiple of num_kv_heads = ", hkv);
  KVC_EXPECTS_IN("kvc::cpu::decode_attention", q != nullptr && out != nullptr, "q or out is null");
  const std::int32_t G = num_q_heads / hkv;
  const bool want_probs = opt.probs || opt.group_probs;
  std::int32_t longest = 0, longest_high = 0;
  for (std::int32_t h = 0; h < hkv; ++h) {
    longest = std::max(longest, cache.length(seq, layer, h));
    const auto r = cache.high_cache().regions(seq, layer, h);
    longest_high = std::max(longest_high, r.sink + r.quantized + r.residual);
  }
  // As the single-store kernels: a layer with no token in any head is an error, but its tokens may
  // all be low precision (high_ratio = 0, or the high ones evicted): then the high store gives
  // zeros with lse = -inf instead of being asked to attend over nothing (which throws).
  KVC_EXPECTS_IN("kvc::cpu::decode_attention", longest > 0, "seq = ", seq, ", layer = ", layer,
              " holds 0 tokens in all its kv heads, expected at least one token to attend to (append this "
              "step's K/V to the layer before attending)");
  KVC_EXPECTS_IN("kvc::cpu::decode_attention", !want_probs || opt.probs_stride >= longest, "probs_stride = ", opt.probs_stride,
              ", expected >= the longest stream (", longest, " tokens)");
  const std::size_t nq = static_cast<std::size_t>(num_q_heads);
  const std::int32_t hs = std::max(1, longest_high);
  std::vector<float> lse_h(nq), lse_l(nq), out_l(nq * D, 0.0f), probs_h, probs_l, plog;
  decode_options oh = opt;
  oh.lse = lse_h.data();
  oh.group_probs = nullptr;
  oh.probs = nullptr;
  // probabilities in logical order: the caller's buffer, or a temporary one for group_probs only
  float* pr_base = opt.probs;
  const std::size_t pstride = static_cast<std::size_t>(opt.probs_stride);
  if (want_probs) {
    probs_h.resize(nq * static_cast<std::size_t>(hs));
    oh.probs = probs_h.data();
    oh.probs_stride = hs;
    if (!pr_base) {
      plog.resize(nq * pstride);
      pr_base = plog.data();
    }
  }
  if (longest_high > 0) {
    decode_attention<Arch>(cache.high_cache(), seq, layer, q, num_q_heads, out, oh);
  } else {
    std::fill(out, out + nq * static_cast<std::size_t>(D), 0.0f);
    std::fill(lse_h.begin(), lse_h.end(), -INFINITY);
    std::fill(probs_h.begin(), probs_h.end(), 0.0f);
  }
  for (std::int32_t h = 0; h < hkv; ++h) {
    const auto ls = cache.low_stream(seq, layer, h);
    const std::int32_t n = cache.low_cache().length(ls.first, ls.second, 0);
    const auto& low = cache.low_indices(seq, layer, h);
    const std::size_t q0 = static_cast<std::size_t>(h) * G;
    float* lse_lh = lse_l.data() + q0;
    if (n > 0) {
      decode_options ol = opt;
      ol.lse = lse_lh;
      ol.group_probs = nullptr;
      ol.probs = nullptr;
      if (want_probs) {
        probs_l.assign(static_cast<std::size_t>(G) * n, 0.0f);
        ol.probs = probs_l.data();
        ol.probs_stride = n;
      }
      decode_attention<Arch>(cache.low_cache(), ls.first, ls.second, q + q0 * D, G, out_l.data() + q0 * D, ol);
    } else {
      std::fill(lse_lh, lse_lh + G, -INFINITY);
    }
    for (std::int32_t g = 0; g < G; ++g) {
      const std::size_t qh = q0 + static_cast<std::size_t>(g);
      const float a = lse_h[qh], b = lse_l[qh];
      const float M = std::max(a, b);
      float sh = 0.0f, sl = 0.0f;  // shares of the probability mass in each store
      if (M != -INFINITY) {
        const float wa = a == -INFINITY ? 0.0f : std::exp(a - M), wb = b == -INFINITY ? 0.0f : std::exp(b - M);
        sh = wa / (wa + wb);
        sl = wb / (wa + wb);
        float* o = out + qh * D;
        const float* p = out_l.data() + qh * D;
        for (std::int32_t d = 0; d < D; ++d) o[d] = sh * o[d] + sl * p[d];
        lse_h[qh] = M + std::log(wa + wb);
      }
      if (!want_probs) continue;
      float* pr = pr_base + qh * pstride;
      const float* ph = probs_h.data() + qh * static_cast<std::size_t>(hs);
      std::int32_t hi = 0;
      for (std::size_t t = 0; t < low.size(); ++t)
        pr[t] = low[t] >= 0 ? probs_l[static_cast<std::size_t>(g) * n + static_cast<std::size_t>(low[t])] * sl
                            : ph[hi++] * sh;
    }
    if (opt.group_probs) {
      float* gp = opt.group_probs + static_cast<std::size_t>(h) * pstride;
      std::fill(gp, gp + low.size(), 0.0f);
      for (std::int32_t g = 0; g < G; ++g) {
        const float* pr = pr_base + (q0 + static_cast<std::size_t>(g)) * pstride;
        for (std::size_t t = 0; t < low.size(); ++t) gp[t] += pr[t];
      }
    }
  }
  if (opt.lse) std::copy(lse_h.begin(), lse_h.end(), opt.lse);
}

/// Decode attention over a mixed_precision_cache layer read through its views
/// (mixed_precision_cache::layer): the mixed kernel above, on the store the views name.
template <class Arch = default_arch, class HQ, class LQ, class Fp, class Heads>
void decode_attention(const store_layer<mixed_precision_cache<HQ, LQ, Fp>, Heads>& heads, const float* q,
                      std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  decode_attention<Arch>(*heads.store, heads.seq, heads.layer, q, num_q_heads, out, opt);
}

KVC_END_ISA_NAMESPACE
}  // namespace cpu

KVC_BEGIN_ISA_NAMESPACE
/// kvc::decode_attention (kvc/attention.hpp) on a mixed_precision_cache layer: the mixed kernel
/// above.
template <class HQ, class LQ, class Fp, class Heads>
void decode_attention(const store_layer<mixed_precision_cache<HQ, LQ, Fp>, Heads>& heads, const float* q,
                      std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  cpu::decode_attention(heads, q, num_q_heads, out, opt);
}
KVC_END_ISA_NAMESPACE

KVC_END_NAMESPACE
