// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Registers the CUDA backend of kvc::decode_attention for views in device memory.

#include <kvc/attention.hpp>
#include <kvc/cuda/common.cuh>
#include <kvc/cuda/decode_attention.cuh>

KVC_BEGIN_NAMESPACE

template <>
struct decode_backend<device_memory> {
  template <class Heads>
  static void run(const Heads& heads, const float* q, std::int32_t num_q_heads, float* out,
                  const cuda::device_decode_options& opt) {
    cuda::decode_attention(heads, q, num_q_heads, out, opt);
  }
  template <class Heads>
  static void run(const Heads& heads, const float* q, std::int32_t num_q_heads, float* out, const decode_options& opt) {
    KVC_EXPECTS(opt.pool == nullptr && opt.probs == nullptr && opt.group_probs == nullptr && opt.lse == nullptr,
                "device views: pass kvc::cuda::device_decode_options (device output pointers, CUDA stream); "
                "kvc::decode_options carries host pointers");
    cuda::device_decode_options d;
    d.scale = opt.scale;
    d.split_tokens = opt.split_tokens;
    cuda::decode_attention(heads, q, num_q_heads, out, d);
  }
};

KVC_END_NAMESPACE
