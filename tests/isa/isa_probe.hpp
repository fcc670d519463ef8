// SPDX-License-Identifier: Apache-2.0
// The body both ISA TUs of test_isa_odr compile: the same kvc calls on the same caches through the
// public API. Included by isa_tu_avx2.cpp (-mavx2 -mfma -mf16c) and isa_tu_base.cpp (no -m flags);
// each defines KVC_PROBE_NAME. Everything here is `static` or the one named function, so the test
// itself has no inline function of its own that the two TUs would share.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/quant_attention.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/quant_cache.hpp>
#include <kvc/store/kv_cache.hpp>

#include "isa_shared.hpp"

probe_result KVC_PROBE_NAME(const isa_inputs& in) {
  probe_result r;
  r.isa = kvc::cpu::isa_name();
  r.runtime_avx2 = kvc::detail::cpu_has_avx2_fma_f16c();
  const std::int32_t D = in.fp16->config().head_dim;
  r.attn_fp16.resize(static_cast<std::size_t>(in.num_q_heads) * D);
  kvc::cpu::decode_attention(*in.fp16, in.seq, 0, in.q.data(), in.num_q_heads, r.attn_fp16.data());
  r.attn_int4.resize(r.attn_fp16.size());
  kvc::cpu::decode_attention(*in.int4, in.qseq, 0, in.q.data(), in.num_q_heads, r.attn_int4.data());
  // The codec and the half conversions, directly.
  const kvc::quant::int4 codec;
  std::vector<std::byte> rec(codec.record_bytes(kvc::quant::role::key, D));
  r.codec_roundtrip.resize(static_cast<std::size_t>(D));
  codec.encode<kvc::quant::role::key>(in.row.data(), D, rec.data());
  codec.decode<kvc::quant::role::key>(rec.data(), D, r.codec_roundtrip.data());
  r.codec_record.assign(rec.begin(), rec.end());
  std::vector<kvc::half> h(in.row.size());
  kvc::detail::float_to_half_n(in.row.data(), in.row.size(), h.data());
  for (kvc::half x : h) r.half_bits.push_back(x.bits);
  for (float x : in.row) r.half_bits_scalar.push_back(kvc::half(x).bits);
  return r;
}
