// SPDX-License-Identifier: Apache-2.0
// Quantized KV: decode attention per quantizer against fp16, and append (quantize) throughput.
//
//   BM_quant_decode/<quantizer>/<q heads>x<kv heads>x<head_dim>/ctx:<tokens>/threads:<n>
//     wall time per step (UseRealTime: with a pool, cpu_time would be the calling thread's only)
//     bytes_per_second bytes_in_use() of the quantized cache read per second (every byte once a step)
//     bytes_per_token  bytes_in_use() of the quantized cache (all its pools) / context tokens, for
//                      all kv heads of the layer (fp16: 4 * kv_heads * head_dim)
//     No speed-up here: a ratio to fp16 is only reported paired (BM_quant_paired).
//   BM_quant_append/<quantizer>/<shape>   bytes_per_second = fp16 bytes of K+V input encoded per second
//                                         (also fp8e5m2, fp8t and fp8e5m2t: FP8 E5M2 and per-tensor scales)
//   BM_quant_paired/<quantizer>/<shape>/ctx:<tokens>/threads:<n>
//     fp16 and this quantizer called alternately (15 pairs, same data, same process), so both see
//     the same machine load: medians of wall time (fp16_ms, quant_ms, speedup_wall) and, for one
//     thread, of the calling thread's CPU time (fp16_cpu_ms, quant_cpu_ms, speedup_cpu). On a shared,
//     oversubscribed machine speedup_cpu is the number to read. speedup_vs_fp16 is speedup_cpu, one
//     thread only (the same definition as bench_quest's and bench_lowrank's); with a pool only
//     speedup_wall. quant_bytes_per_second and fp16_bytes_per_second: each cache's bytes_in_use()
//     over its median wall time. Names ending "+iq" run quant_attention_options::int8_query,
//     "+iq+ip" quant_attention_options::fast() (approximate integer paths); the others are exact.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>
#include <time.h>

#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/quant_attention.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/quant/fp8.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/store/kv_cache.hpp>

#include "kvc_bench.hpp"

namespace {

using namespace kvc::quant;

using kvc_bench::median;
using kvc_bench::random_rows;
using kvc_bench::shape;
constexpr std::int32_t prefill_chunk = 1024;


kvc::thread_pool* pool_for(int threads) {
  static std::map<int, std::unique_ptr<kvc::thread_pool>> pools;
  if (threads <= 1) return nullptr;
  auto& p = pools[threads];
  if (!p) p = std::make_unique<kvc::thread_pool>(threads);
  return p.get();
}

/// The quantized cache of the running benchmark (kept across Google Benchmark's repeated calls).
template <class KQ, class VQ>
struct quant_data {
  std::unique_ptr<kvc::quant_cache<KQ, VQ>> cache;
  kvc::seq_id seq = 0;
  std::string key;
};

template <class KQ, class VQ>
kvc::quant_cache<KQ, VQ>& get_cache(shape s, std::int32_t ctx, kvc::seq_id& seq) {
  static quant_data<KQ, VQ> d;
  const std::string key = std::to_string(s.q_heads) + "/" + std::to_string(s.kv_heads) + "/" +
                          std::to_string(s.head_dim) + "/" + std::to_string(ctx);
  if (d.key != key) {
    d.cache.reset();
    kvc::quant_cache_config c;
    c.num_layers = 1;
    c.num_kv_heads = s.kv_heads;
    c.head_dim = s.head_dim;
    c.page_size = 64;
    c.max_pages = s.kv_heads * (ctx / 64 + 2);
    c.max_fp_pages = s.kv_heads + 1;
    c.check_finite = false;
    d.cache = std::make_unique<kvc::quant_cache<KQ, VQ>>(c);
    d.seq = d.cache->add_sequence();
    for (std::int32_t t0 = 0; t0 < ctx; t0 += prefill_chunk) {
      const std::int32_t n = std::min(prefill_chunk, ctx - t0);
      auto k = random_rows(std::size_t(n) * s.kv_heads * s.head_dim, 1 + t0);
      auto v = random_rows(k.size(), 2 + t0);
      d.cache->append(d.seq, 0, k.data(), v.data(), n);
    }
    d.key = key;
  }
  seq = d.seq;
  return *d.cache;
}

template <class KQ, class VQ>
void BM_quant_decode(benchmark::State& state, shape s, std::int32_t ctx, int threads) {
  kvc::seq_id seq;
  auto& cache = get_cache<KQ, VQ>(s, ctx, seq);
  auto q = random_rows(std::size_t(s.q_heads) * s.head_dim, 3);
  std::vector<float> out(q.size());
  kvc::decode_options o;
  o.pool = pool_for(threads);
  for (auto _ : state) {
    kvc::cpu::decode_attention(cache, seq, 0, q.data(), s.q_heads, out.data(), o);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  // Every byte of the cache is read once per step.
  state.SetBytesProcessed(static_cast<std::int64_t>(cache.bytes_in_use()) * state.iterations());
  state.counters["bytes_per_token"] = double(cache.bytes_in_use()) / ctx;
}

using kvc_bench::thread_cpu_seconds;


std::unique_ptr<kvc::kv_cache<kvc::half>> fp16_cache(shape s, std::int32_t ctx, kvc::seq_id& seq) {
  kvc::cache_config c;
  c.num_layers = 1;
  c.num_kv_heads = s.kv_heads;
  c.head_dim = s.head_dim;
  c.page_size = 16;
  c.max_pages = s.kv_heads * (ctx / 16 + 2);
  c.check_finite = false;
  auto cache = std::make_unique<kvc::kv_cache<kvc::half>>(c);
  seq = cache->add_sequence();
  kvc_bench::append_random(*cache, seq, s, ctx, prefill_chunk);
  return cache;
}

template <class KQ, class VQ>
void BM_quant_paired(benchmark::State& state, shape s, std::int32_t ctx, int threads,
                     kvc::cpu::quant_attention_options qo) {
  kvc::seq_id qseq, fseq;
  auto& qc = get_cache<KQ, VQ>(s, ctx, qseq);
  auto fc = fp16_cache(s, ctx, fseq);
  auto q = random_rows(std::size_t(s.q_heads) * s.head_dim, 3);
  std::vector<float> out(q.size());
  kvc::decode_options o;
  o.pool = pool_for(threads);
  std::vector<double> fw, fcpu, qw, qcpu;
  for (auto _ : state) {
    for (int r = 0; r < 15; ++r) {
      auto w0 = std::chrono::steady_clock::now();
      double c0 = thread_cpu_seconds();
      kvc::cpu::decode_attention(*fc, fseq, 0, q.data(), s.q_heads, out.data(), o);
      benchmark::DoNotOptimize(out.data());
      fcpu.push_back(thread_cpu_seconds() - c0);
      fw.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count());
      w0 = std::chrono::steady_clock::now();
      c0 = thread_cpu_seconds();
      kvc::cpu::decode_attention(qc, qseq, 0, q.data(), s.q_heads, out.data(), o, qo);
      benchmark::DoNotOptimize(out.data());
      qcpu.push_back(thread_cpu_seconds() - c0);
      qw.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count());
    }
  }
  state.counters["fp16_ms"] = median(fw) * 1e3;
  state.counters["quant_ms"] = median(qw) * 1e3;
  state.counters["speedup_wall"] = median(fw) / median(qw);
  if (threads == 1) {
    state.counters["fp16_cpu_ms"] = median(fcpu) * 1e3;
    state.counters["quant_cpu_ms"] = median(qcpu) * 1e3;
    state.counters["speedup_cpu"] = median(fcpu) / median(qcpu);
    // One definition in every benchmark (bench_quest, bench_lowrank): one thread, paired, thread
    // CPU time. With a pool the calling thread's CPU time misses the workers': speedup_wall only.
    state.counters["speedup_vs_fp16"] = median(fcpu) / median(qcpu);
  }
  state.counters["bytes_per_token"] = double(qc.bytes_in_use()) / ctx;
  // Cache bytes read per second of wall time (every byte once per step).
  state.counters["quant_bytes_per_second"] = double(qc.bytes_in_use()) / median(qw);
  state.counters["fp16_bytes_per_second"] = double(fc->bytes_in_use()) / median(fw);
}

template <class KQ, class VQ>
void BM_quant_append(benchmark::State& state, shape s) {
  const std::int32_t n = 1024;
  kvc::quant_cache_config c;
  c.num_layers = 1;
  c.num_kv_heads = s.kv_heads;
  c.head_dim = s.head_dim;
  c.page_size = 64;
  c.max_pages = s.kv_heads * (n / 64 + 2);
  c.max_fp_pages = s.kv_heads + 1;
  c.check_finite = false;
  kvc::quant_cache<KQ, VQ> cache(c);
  auto k = random_rows(std::size_t(n) * s.kv_heads * s.head_dim, 5);
  auto v = random_rows(k.size(), 6);
  for (auto _ : state) {
    auto seq = cache.add_sequence();
    cache.append(seq, 0, k.data(), v.data(), n);
    cache.remove_sequence(seq);
  }
  state.SetBytesProcessed(state.iterations() * std::int64_t(n) * s.kv_heads * s.head_dim * 2 * 2);
}

/// Append only: the FP8 variants whose decode runs the same kernel as "fp8" (E5M2, per-tensor
/// scales) but whose encoders differ.
template <class KQ, class VQ>
void register_append(const std::string& name) {
  for (const shape s : {shape{32, 8, 128}, shape{9, 3, 64}}) {
    const std::string sh = std::to_string(s.q_heads) + "x" + std::to_string(s.kv_heads) + "x" + std::to_string(s.head_dim);
    benchmark::RegisterBenchmark(("BM_quant_append/" + name + "/" + sh).c_str(),
                                 [=](benchmark::State& st) { BM_quant_append<KQ, VQ>(st, s); })
        ->Unit(benchmark::kMicrosecond);
  }
}

template <class KQ, class VQ>
void register_quantizer(const std::string& name) {
  const shape shapes[] = {{32, 8, 128}, {9, 3, 64}};
  const int all = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (const auto& s : shapes) {
    const std::string sh = std::to_string(s.q_heads) + "x" + std::to_string(s.kv_heads) + "x" + std::to_string(s.head_dim);
    for (std::int32_t ctx : {4096, 32768, 131072})
      for (int threads : {1, all}) {
        const std::string bn = "BM_quant_decode/" + name + "/" + sh + "/ctx:" + std::to_string(ctx) +
                               "/threads:" + std::to_string(threads);
        benchmark::RegisterBenchmark(bn.c_str(), [=](benchmark::State& st) { BM_quant_decode<KQ, VQ>(st, s, ctx, threads); })
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
        const std::string pn = "BM_quant_paired/" + name + "/" + sh + "/ctx:" + std::to_string(ctx) +
                               "/threads:" + std::to_string(threads);
        benchmark::RegisterBenchmark(pn.c_str(), [=](benchmark::State& st) { BM_quant_paired<KQ, VQ>(st, s, ctx, threads, {}); })
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime()
            ->Iterations(1);
        // The approximate paths, named in the benchmark: "+iq" = quant_attention_options::int8_query
        // (integer q.k for per-token integer keys), "+iq+ip" = quant_attention_options::fast()
        // (int8_query and int8_probs: integer value accumulation for per-token integer values;
        // KIVI keys keep the exact fused scores, KIVI values (grouped scales) the exact path).
        auto approx = [&](const char* suffix, kvc::cpu::quant_attention_options qo) {
          const std::string in = "BM_quant_paired/" + name + suffix + "/" + sh + "/ctx:" + std::to_string(ctx) +
                                 "/threads:" + std::to_string(threads);
          benchmark::RegisterBenchmark(in.c_str(), [=](benchmark::State& st) { BM_quant_paired<KQ, VQ>(st, s, ctx, threads, qo); })
              ->Unit(benchmark::kMillisecond)
              ->UseRealTime()
              ->Iterations(1);
        };
        if (name.rfind("int", 0) == 0) {
          kvc::cpu::quant_attention_options iq;
          iq.int8_query = true;
          approx("+iq", iq);
          approx("+iq+ip", kvc::cpu::quant_attention_options::fast());
        }
        if (all == 1) break;
      }
    benchmark::RegisterBenchmark(("BM_quant_append/" + name + "/" + sh).c_str(),
                                 [=](benchmark::State& st) { BM_quant_append<KQ, VQ>(st, s); })
        ->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_quantizer<int8, int8>("int8");
  register_quantizer<fp8<>, fp8<>>("fp8");
  register_quantizer<int4, int4>("int4");
  register_quantizer<int2, int2>("int2");
  register_quantizer<kivi<8>, kivi<8>>("kivi8");
  register_quantizer<kivi<4>, kivi<4>>("kivi4");
  register_quantizer<kivi<3>, kivi<3>>("kivi3");
  register_quantizer<kivi<2>, kivi<2>>("kivi2");
  register_quantizer<kivi<4>, kivi<2>>("kivi_k4v2");
  register_append<fp8<kvc::fp8_e5m2>, fp8<kvc::fp8_e5m2>>("fp8e5m2");
  register_append<fp8_e4m3_per_tensor, fp8_e4m3_per_tensor>("fp8t");
  register_append<fp8_e5m2_per_tensor, fp8_e5m2_per_tensor>("fp8e5m2t");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
