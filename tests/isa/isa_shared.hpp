// SPDX-License-Identifier: Apache-2.0
// Plain data passed between test_isa_odr's TUs (no kvc code whose body depends on -m flags).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <kvc/quant/int8.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/store/quant_cache.hpp>

struct isa_inputs {
  const kvc::kv_cache<kvc::half>* fp16 = nullptr;  // built in the main TU: one type across TUs
  kvc::seq_id seq = 0;
  const kvc::quant_cache<kvc::quant::int4>* int4 = nullptr;
  kvc::seq_id qseq = 0;
  std::int32_t num_q_heads = 0;
  std::vector<float> q;
  std::vector<float> row;  // one head row for the codec and the half conversions
  // For the caches each TU builds through kvc::runtime::make_cache: their shape and contents.
  kvc::cache_config cfg;
  std::int32_t n = 0;
  std::vector<float> k, v;       // [n][num_kv_heads][head_dim]
  std::vector<float> window;     // [window_n][num_q_heads][head_dim]: the evictor's query window
  std::int32_t window_n = 0;
};

/// One cache built by a probe TU through kvc::runtime::make_cache (and possibly compressed).
struct runtime_run {
  std::string spec;
  std::unique_ptr<kvc::runtime::any_cache> cache;  // neutral interface: usable from any TU
  kvc::seq_id seq = 0;
  std::string type;        // typeid(*cache).name(): the adapter's mangled type, with its namespace
  std::vector<float> attn; // cache->attention(...) run by the probe TU
};

struct probe_result {
  std::string isa;            // kvc::cpu::isa_name() as this TU sees it
  bool runtime_avx2 = false;  // the run-time choice of the ISA-neutral code
  std::vector<float> attn_fp16, attn_int4, codec_roundtrip;
  std::vector<float> attn_view;  // kvc::decode_attention (kvc/attention.hpp) on fp16's views
  std::vector<std::byte> codec_record;
  std::vector<std::uint16_t> half_bits, half_bits_scalar;
  std::vector<runtime_run> runtime;  // make_cache specs, then an evictor's compressed cache
  std::vector<std::vector<std::int32_t>> kept;  // positions the evictor kept, per kv-head (layer 0)
  std::vector<std::vector<float>> rkv_scores;   // rkv(knorm, lambda=0) scores of the fp16 cache, layer 0
};

/// The storages each probe builds, in order; the last runtime_run is `evictor_spec` on fp16.
inline const char* const isa_storage_specs[] = {"fp16", "int4", "kivi(bits=2,residual=32)", "mikv(hbits=8,lbits=4)"};
inline const char* const isa_evictor_spec = "snapkv(ratio=0.5,window=8)";

probe_result probe_avx2(const isa_inputs& in);
probe_result probe_base(const isa_inputs& in);
