// SPDX-License-Identifier: Apache-2.0
// Plain data passed between test_isa_odr's TUs (no kvc code whose body depends on -m flags).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <kvc/quant/int8.hpp>
#include <kvc/quant/quant_cache.hpp>
#include <kvc/store/kv_cache.hpp>

struct isa_inputs {
  const kvc::kv_cache<kvc::half>* fp16 = nullptr;  // built in the main TU: one type across TUs
  kvc::seq_id seq = 0;
  const kvc::quant_cache<kvc::quant::int4>* int4 = nullptr;
  kvc::seq_id qseq = 0;
  std::int32_t num_q_heads = 0;
  std::vector<float> q;
  std::vector<float> row;  // one head row for the codec and the half conversions
};

struct probe_result {
  std::string isa;            // kvc::cpu::isa_name() as this TU sees it
  bool runtime_avx2 = false;  // the run-time choice of the ISA-neutral code
  std::vector<float> attn_fp16, attn_int4, codec_roundtrip;
  std::vector<std::byte> codec_record;
  std::vector<std::uint16_t> half_bits, half_bits_scalar;
};

probe_result probe_avx2(const isa_inputs& in);
probe_result probe_base(const isa_inputs& in);
