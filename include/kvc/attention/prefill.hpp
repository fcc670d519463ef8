// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `kvc::prefill_attention(cache, seq, layer, q, num_queries, q_positions, num_q_heads, out, opt)`:
/// causal attention of a chunk of queries against one layer of a host cache, beside
/// kvc::decode_attention. It runs kvc::cpu::prefill_attention, the kernel of the TU's ISA: like
/// decode_attention it lives in the ISA namespace (docs/isa.md). There is no device backend.

#include <cstdint>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/prefill_attention.hpp>
#include <kvc/isa.hpp>

KVC_BEGIN_NAMESPACE
KVC_BEGIN_ISA_NAMESPACE

/// Causal prefill attention for one sequence and one layer (kvc::cpu::prefill_attention: shapes,
/// options and errors).
template <class Cache, class Seq>
void prefill_attention(const Cache& cache, Seq seq, std::int32_t layer, const float* q, std::int32_t num_queries,
                       const std::int32_t* q_positions, std::int32_t num_q_heads, float* out,
                       const decode_options& opt = {}) {
  cpu::prefill_attention(cache, seq, layer, q, num_queries, q_positions, num_q_heads, out, opt);
}

KVC_END_ISA_NAMESPACE
KVC_END_NAMESPACE
