// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Decode attention over merged tokens in encoded pages (merge::basic_merged_cache over a
/// quant_cache): the quantized kernel (kvc/cpu/quant_attention.hpp), reading the codes as it does
/// for the store alone, with each logit raised by its token's log-weight,
///
///   s_t = scale · q·k_t + lw_t,
///
/// added to every tile's scores before its online-softmax update (one add per score, whichever
/// path scored them: decoded rows, the fused code kernels or integer dots). So k identical tokens
/// merged into one with lw = log k give the output of the k copies, as cpu::merged_decode_attention
/// does for full-precision pages. Same contract as cpu::decode_attention on the quant_cache (split
/// over tokens, opt.pool, opt.lse, opt.probs and group_probs: a merged token's probability is the
/// mass of its members). Prefill over these stores is not provided.
/// Threads: read-only on the cache. Compiled per ISA (docs/isa.md).

#include <cstdint>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/quant_attention.hpp>
#include <kvc/cpu/stream_attention.hpp>
#include <kvc/store/merged_cache.hpp>
#include <kvc/store/quant_cache.hpp>
#include <kvc/view/heads.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md

/// Decode attention of one query token per query head over one layer of merged tokens in encoded
/// pages. Arguments as cpu::decode_attention on a quant_cache (qopt: its integer fast paths).
template <class Arch = default_arch, class KQ, class VQ, class Fp>
void merged_decode_attention(const merge::basic_merged_cache<quant_cache<KQ, VQ, Fp>>& cache, seq_id seq,
                             std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                             const decode_options& opt = {}, const quant_attention_options& qopt = {}) {
  stream_detail::check_query_args("kvc::cpu::merged_decode_attention", cache, seq, layer, q, 1, num_q_heads, out, opt,
                                  true);
  const std::int32_t hkv = cache.config().num_kv_heads;
  std::vector<const float*> lw(static_cast<std::size_t>(hkv));
  for (std::int32_t h = 0; h < hkv; ++h) lw[static_cast<std::size_t>(h)] = cache.log_weights(seq, layer, h).data();
  qdetail::decode_attention_lw<Arch>(cache.cache(), seq, layer, q, num_q_heads, out, opt, qopt, lw.data());
}

/// Decode attention over such a layer (basic_merged_cache::layer: decoded views plus log-weights):
/// the kernel above on the store the heads name.
template <class Arch = default_arch, class KQ, class VQ, class Fp, class Heads>
void decode_attention(const store_layer<merge::basic_merged_cache<quant_cache<KQ, VQ, Fp>>, Heads>& heads,
                      const float* q, std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  merged_decode_attention<Arch>(*heads.store, heads.seq, heads.layer, q, num_q_heads, out, opt);
}

KVC_END_ISA_NAMESPACE
}  // namespace cpu

KVC_BEGIN_ISA_NAMESPACE
/// kvc::decode_attention (kvc/attention.hpp) on such a layer: the kernel above.
template <class KQ, class VQ, class Fp, class Heads>
void decode_attention(const store_layer<merge::basic_merged_cache<quant_cache<KQ, VQ, Fp>>, Heads>& heads,
                      const float* q, std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  cpu::decode_attention(heads, q, num_q_heads, out, opt);
}
KVC_END_ISA_NAMESPACE
KVC_END_NAMESPACE
