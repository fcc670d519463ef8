// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// StreamingLLM: keep the attention sinks and the most recent tokens (score = token index, so the
/// selection keeps the protected sinks plus the newest tokens). As published, kept keys are
/// re-rotated to contiguous positions: set compressor_options::rerotate.
/// \par Reference
/// Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453.

#include <kvc/evict/core.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

struct streaming_llm_params {
  std::int32_t sinks = 4;
};

struct streaming_llm {
  using params_type = streaming_llm_params;
  using observation_type = no_observation;
  static constexpr unsigned reads = reads_nothing;
  static constexpr const char* name = "streaming_llm";
  params_type p;
  streaming_llm() = default;
  explicit streaming_llm(const params_type& params) : p(params) {
    KVC_EXPECTS(p.sinks >= 0, "sinks = ", p.sinks, ", expected >= 0");
  }
  protection protect() const { return {p.sinks, 0}; }
  void score(const layer_input& in, const observations&, layer_scores& out) const {
    shape_scores(in, out);
    for (std::int32_t h = 0; h < in.num_kv_heads; ++h)
      for (std::int32_t t = 0; t < in.heads[static_cast<std::size_t>(h)].n; ++t)
        out[static_cast<std::size_t>(h)][static_cast<std::size_t>(t)] = static_cast<float>(t);
  }
};

}  // namespace evict
KVC_END_NAMESPACE
