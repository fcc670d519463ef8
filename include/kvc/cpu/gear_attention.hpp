// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `cpu::gear_decode_attention`: decode attention over a quant_cache of GEAR records
/// (kvc/quant/gear.hpp) that never rebuilds a token's low-rank term: the record's A B^T is applied
/// factored, (q.B) then A for scores and (A^T p) then B for the output, so a record of Group
/// tokens costs r(Group + D) multiply-adds for it instead of Group·D·r. The generic quantized
/// kernel (kvc/cpu/quant_attention.hpp) also reads gear caches, rebuilding tiles in L1 scratch.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/error.hpp>
#include <kvc/isa.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/quant/gear.hpp>
#include <kvc/store/quant_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md

/// Decode attention over a quant_cache whose K and V codecs are both gear<Bits, Group>, with the
/// low-rank term factored per record: scores = q.Q(X) + (q.B) A^T + q.S and
/// out += p^T Q(X) + B (A^T p) + p^T S, in one online-softmax pass (no token is reconstructed
/// with its low-rank term). Sinks and the full-precision window are read directly. Supports
/// decode_options scale, pool (one task per query head), lse, probs and group_probs; not
/// pre-RoPE caches (a per-position rotation does not factor through A B^T).
template <int BK, int GK, int BV, int GV, class Fp>
void gear_decode_attention(const quant_cache<quant::gear<BK, GK>, quant::gear<BV, GV>, Fp>& cache, seq_id seq,
                           std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                           const decode_options& opt = {}) {
  static_assert(GK == GV, "kvc::cpu::gear_decode_attention: K and V need the same group size");
  constexpr int G = GK;
  using quant::role;
  const auto& cfg = cache.config();
  const std::int32_t hkv = cfg.num_kv_heads, D = cfg.head_dim, P = cfg.page_size;
  KVC_EXPECTS(!cfg.pre_rope, "kvc::cpu::gear_decode_attention: pre-RoPE caches are not supported (use "
                             "kvc::cpu::decode_attention, which rotates reconstructed keys per tile)");
  KVC_EXPECTS(num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
              ", expected a positive multiple of num_kv_heads = ", hkv);
  KVC_EXPECTS(q != nullptr && out != nullptr, "q or out is null");
  for (std::int32_t i = 0; i < num_q_heads * D; ++i)
    KVC_EXPECTS(std::isfinite(q[i]), "q[", i, "] = ", q[i], ", expected a finite query");
  const std::int32_t GQ = num_q_heads / hkv;
  std::int32_t longest = 0;
  for (std::int32_t h = 0; h < hkv; ++h) longest = std::max(longest, cache.length(seq, layer, h));
  const bool want_probs = opt.probs || opt.group_probs;
  KVC_EXPECTS(!want_probs || opt.probs_stride >= longest, "probs_stride = ", opt.probs_stride,
              ", expected >= the longest stream (", longest, " tokens)");
  std::vector<float> raw;
  float* raw_base = opt.probs;
  std::size_t stride = static_cast<std::size_t>(opt.probs_stride);
  if (want_probs && !raw_base) {
    raw.resize(static_cast<std::size_t>(num_q_heads) * stride);
    raw_base = raw.data();
  }
  const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));
  const auto& kq = cache.key_quantizer();
  const auto& vq = cache.value_quantizer();
  const std::size_t rbk = kq.record_bytes(role::key, D), rbv = vq.record_bytes(role::value, D);
  std::vector<float> lse(static_cast<std::size_t>(num_q_heads));
  std::vector<quant_stream_view<Fp>> views;
  for (std::int32_t h = 0; h < hkv; ++h) views.push_back(cache.view(seq, layer, h));
  auto run = [&](std::int32_t qh) {
    const auto& sv = views[static_cast<std::size_t>(qh / GQ)];
    std::vector<float> qs(static_cast<std::size_t>(D)), acc(static_cast<std::size_t>(D), 0.0f);
    for (std::int32_t d = 0; d < D; ++d) qs[static_cast<std::size_t>(d)] = q[static_cast<std::size_t>(qh) * D + d] * scale;
    float* rawh = want_probs ? raw_base + static_cast<std::size_t>(qh) * stride : nullptr;
    float m = -INFINITY, l = 0.0f;
    float s[G], p[G];
    // one block of scores s[0..n) for tokens t0..: online-softmax rescale, then p = exp(s - m)
    auto block = [&](const float* sc, std::int32_t n, std::int32_t t0) {
      float mb = m;
      for (std::int32_t i = 0; i < n; ++i) mb = std::max(mb, sc[i]);
      const float corr = m == -INFINITY ? 0.0f : std::exp(m - mb);
      for (auto& a : acc) a *= corr;
      l *= corr;
      m = mb;
      for (std::int32_t i = 0; i < n; ++i) {
        p[i] = std::exp(sc[i] - m);
        l += p[i];
        if (rawh) rawh[t0 + i] = sc[i];
      }
    };
    auto dense_rows = [&](const Fp* K, const Fp* V, std::int32_t n, std::int32_t t0) {
      for (std::int32_t i = 0; i < n; ++i) {
        float a = 0.0f;
        for (std::int32_t d = 0; d < D; ++d) a += qs[static_cast<std::size_t>(d)] * static_cast<float>(K[static_cast<std::size_t>(i) * D + d]);
        block(&a, 1, t0 + i);
        for (std::int32_t d = 0; d < D; ++d) acc[static_cast<std::size_t>(d)] += p[0] * static_cast<float>(V[static_cast<std::size_t>(i) * D + d]);
      }
    };
    dense_rows(sv.sink_k, sv.sink_v, sv.n_sink, 0);
    for (std::int32_t i0 = 0; i0 < sv.n_quant; i0 += G) {
      const std::byte* page = sv.quant_base + static_cast<std::size_t>(sv.pages[i0 / P]) * sv.page_bytes;
      const std::size_t r = static_cast<std::size_t>((i0 % P) / G);
      // A trailing partial group (after keep) holds fewer real tokens; the rest weigh nothing.
      const std::int32_t gn = std::min<std::int32_t>(G, sv.n_quant - i0);
      kq.scores(page + rbk * r, D, qs.data(), s);
      block(s, gn, sv.n_sink + i0);
      for (std::int32_t i = gn; i < G; ++i) p[i] = 0.0f;
      vq.accumulate(page + sv.v_offset + rbv * r, D, p, acc.data());
    }
    dense_rows(sv.res_k, sv.res_v, sv.n_res, sv.n_sink + sv.n_quant);
    float* o = out + static_cast<std::size_t>(qh) * D;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (std::int32_t d = 0; d < D; ++d) o[d] = acc[static_cast<std::size_t>(d)] * inv;
    lse[static_cast<std::size_t>(qh)] = l > 0.0f ? m + std::log(l) : -INFINITY;
    if (rawh)
      for (std::int32_t t = 0; t < sv.length(); ++t) rawh[t] = std::exp(rawh[t] - lse[static_cast<std::size_t>(qh)]);
  };
  if (opt.pool && num_q_heads > 1) opt.pool->parallel_for(num_q_heads, run);
  else
    for (std::int32_t qh = 0; qh < num_q_heads; ++qh) run(qh);
  if (opt.lse) std::copy(lse.begin(), lse.end(), opt.lse);
  if (opt.group_probs)
    for (std::int32_t h = 0; h < hkv; ++h) {
      const std::int32_t n = views[static_cast<std::size_t>(h)].length();
      float* gp = opt.group_probs + static_cast<std::size_t>(h) * stride;
      std::fill(gp, gp + n, 0.0f);
      for (std::int32_t g = 0; g < GQ; ++g)
        for (std::int32_t t = 0; t < n; ++t) gp[t] += raw_base[static_cast<std::size_t>(h * GQ + g) * stride + t];
    }
}

KVC_END_ISA_NAMESPACE
}  // namespace cpu
KVC_END_NAMESPACE
