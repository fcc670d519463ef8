// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Options and optional outputs of decode attention, shared by the reference and the backends.

#include <cstdint>

#include <kvc/config.hpp>

KVC_BEGIN_NAMESPACE

class thread_pool;

/// Query head q belongs to kv head q / (num_q_heads / num_kv_heads) (the Llama GQA convention).
struct decode_options {
  float scale = 0.0f;              ///< softmax scale; 0 means 1/sqrt(head_dim)
  thread_pool* pool = nullptr;     ///< null: serial on the calling thread
  std::int32_t split_tokens = 0;   ///< split-K chunk in tokens; 0 picks one from the pool size
  float* lse = nullptr;            ///< [num_q_heads] log-sum-exp of the scaled scores (natural log)
  float* probs = nullptr;          ///< [num_q_heads][probs_stride] softmax probability per token
  float* group_probs = nullptr;    ///< [num_kv_heads][probs_stride] probabilities summed over the group
  std::int32_t probs_stride = 0;   ///< >= the longest stream; required with probs or group_probs
};

KVC_END_NAMESPACE
