// SPDX-License-Identifier: Apache-2.0
// The body both ISA TUs of test_isa_odr compile: the same kvc calls on the same caches through the
// public API. Included by isa_tu_avx2.cpp (-mavx2 -mfma -mf16c) and isa_tu_base.cpp (no -m flags);
// each defines KVC_PROBE_NAME. Everything here is `static` or the one named function, so the test
// itself has no inline function of its own that the two TUs would share.
#pragma once

#include <cstdint>
#include <string>
#include <typeinfo>
#include <vector>

#include <kvc/attention.hpp>
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/quant_attention.hpp>
#include <kvc/evict/compressor.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/runtime/evictor_registry.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/mikv_storage.hpp>
#include <kvc/runtime/quant_storages.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/store/quant_cache.hpp>

#include "isa_shared.hpp"

// Storage headers register nothing by being included (runtime/make_cache.hpp): the storages this
// file builds by spec are registered here, in its own ISA configuration, before any test runs.
[[maybe_unused]] static const bool storages_registered =
    (kvc::runtime::register_quant_storages(), kvc::runtime::register_mikv_storage(), true);

/// A cache built from `spec` through the runtime registry of this TU, filled with in.k / in.v.
static runtime_run probe_runtime_cache(const isa_inputs& in, const std::string& spec) {
  runtime_run r;
  r.spec = spec;
  r.cache = kvc::runtime::make_cache(spec, in.cfg);
  r.seq = r.cache->add_sequence();
  r.cache->append(r.seq, 0, in.k.data(), in.v.data(), in.n);
  const kvc::runtime::any_cache& c = *r.cache;
  r.type = typeid(c).name();
  return r;
}

static void probe_runtime_attention(const isa_inputs& in, runtime_run& r) {
  r.attn.resize(static_cast<std::size_t>(in.num_q_heads) * static_cast<std::size_t>(in.cfg.head_dim));
  r.cache->attention(r.seq, 0, in.q.data(), in.num_q_heads, r.attn.data());
}

probe_result KVC_PROBE_NAME(const isa_inputs& in) {
  probe_result r;
  r.isa = kvc::cpu::isa_name();
  r.runtime_avx2 = kvc::detail::cpu_has_avx2_fma_f16c();
  const std::int32_t D = in.fp16->config().head_dim;
  r.attn_fp16.resize(static_cast<std::size_t>(in.num_q_heads) * D);
  kvc::cpu::decode_attention(*in.fp16, in.seq, 0, in.q.data(), in.num_q_heads, r.attn_fp16.data());
  r.attn_int4.resize(r.attn_fp16.size());
  kvc::cpu::decode_attention(*in.int4, in.qseq, 0, in.q.data(), in.num_q_heads, r.attn_int4.data());
  // The view-based front end (kvc/attention.hpp), host memory: the CPU kernel of this TU.
  {
    std::vector<kvc::kv_cache<kvc::half>::view_type> buf;
    r.attn_view.resize(r.attn_fp16.size());
    kvc::decode_attention(in.fp16->layer(in.seq, 0, buf), in.q.data(), in.num_q_heads, r.attn_view.data());
  }
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

  // kvc::runtime: caches from spec strings, attention through any_cache.
  for (const char* spec : isa_storage_specs) {
    r.runtime.push_back(probe_runtime_cache(in, spec));
    probe_runtime_attention(in, r.runtime.back());
  }
  // An evictor from a spec compresses an fp16 cache after prefill; attention then reads what is kept.
  {
    kvc::runtime::evictor_context ctx;
    ctx.num_layers = in.cfg.num_layers;
    ctx.num_q_heads = in.num_q_heads;
    const kvc::runtime::evictor ev = kvc::runtime::make_evictor(isa_evictor_spec, ctx);
    runtime_run run = probe_runtime_cache(in, "fp16");
    run.spec = isa_evictor_spec;
    kvc::evict::query_window w;
    w.q = in.window.data();
    w.n = in.window_n;
    w.num_q_heads = in.num_q_heads;
    w.head_dim = D;
    kvc::evict::observations obs;
    obs.window = &w;
    auto comp = ev.compressor();
    comp.after_prefill(*run.cache, run.seq, 0, obs);
    for (std::int32_t hh = 0; hh < in.cfg.num_kv_heads; ++hh) {
      const std::int32_t* p = run.cache->positions(run.seq, 0, hh);
      r.kept.emplace_back(p, p + run.cache->length(run.seq, 0, hh));
    }
    probe_runtime_attention(in, run);
    r.runtime.push_back(std::move(run));
  }
  // R-KV's redundancy (evict/rkv.hpp) through the registry: lambda = 0 leaves -softmax(R).
  {
    kvc::runtime::evictor_context ctx;
    ctx.num_layers = in.cfg.num_layers;
    ctx.num_q_heads = in.num_q_heads;
    const kvc::runtime::evictor ev = kvc::runtime::make_evictor("rkv(knorm,lambda=0,ratio=0.5)", ctx);
    kvc::evict::gathered_layer g;
    kvc::evict::gather_layer(*in.fp16, in.seq, 0, in.num_q_heads, kvc::evict::reads_keys, g);
    r.rkv_scores.assign(static_cast<std::size_t>(in.cfg.num_kv_heads), {});
    ev.scorer.score(g.in, kvc::evict::observations{}, r.rkv_scores);
  }
  return r;
}
