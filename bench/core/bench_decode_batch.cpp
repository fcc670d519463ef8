// SPDX-License-Identifier: Apache-2.0
// Batched decode (kvc::cpu::decode_attention_batch: an engine's continuous batch in one call)
// against the same sequences decoded one call each, paired.
//   BM_decode_batch/f16/<q>x<kv>x<D>/seqs:<n>/ctx:<tokens>[/ragged]
// One kv_cache<half> holds n sequences of ctx tokens (ragged: lengths spread evenly over
// [ctx/8, 2 ctx - ctx/8], the same total). Each round runs, alternating, with the same queries:
//   serial batch   decode_attention_batch, no pool
//   pool batch     decode_attention_batch on a pool of every hardware thread
//   pool singles   n calls of decode_attention on that pool (each splits its own sequence)
//   seq-parallel   n serial calls of decode_attention spread over the pool, a whole sequence per
//                  task: the plan an engine would write by hand for equal sequences
// and reports medians over the rounds:
//   batch_ms            wall-clock ms of the pool batch
//   scaling             serial batch / pool batch, wall clock (target >= 1.8 at 2 threads)
//   speedup_vs_singles  pool singles / pool batch, wall clock
//   seq_parallel_scaling  serial batch / seq-parallel, wall clock (the hand-written plan's scaling)
//   cpu_vs_singles      process CPU time of the pool singles / the pool batch (the pool's
//                       workers block when idle, so this is CPU spent on the work; >= 1: the
//                       batch spends no more CPU per token)
//   bytes_per_second    K+V bytes / pool batch wall time
// Data: uniform random K/V, 128 MiB+ of pages (DRAM-resident on the 32 MiB-L3 machines of the
// brief; bench_decode's ws_over_l3 says how this one's L3 compares).

#include <algorithm>
#include <cstdint>
#include <ctime>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>

#include <kvc/cpu/decode_attention.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/store/kv_cache.hpp>

#include "kvc_bench.hpp"

namespace {

using kvc_bench::median;
using kvc_bench::random_rows;
using kvc_bench::shape;

double seconds(clockid_t id) {
  timespec ts{};
  ::clock_gettime(id, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

/// Wall and process-CPU seconds of one call of f.
template <class F>
std::pair<double, double> timed(F&& f, const float* out) {
  const double w0 = seconds(CLOCK_MONOTONIC), c0 = seconds(CLOCK_PROCESS_CPUTIME_ID);
  f();
  benchmark::DoNotOptimize(out);
  return {seconds(CLOCK_MONOTONIC) - w0, seconds(CLOCK_PROCESS_CPUTIME_ID) - c0};
}

void BM_decode_batch(benchmark::State& state, shape s, std::int32_t n, std::int32_t ctx, bool ragged, int rounds) {
  std::vector<std::int32_t> lens(static_cast<std::size_t>(n), ctx);
  if (ragged)
    for (std::int32_t b = 0; b < n; ++b)
      lens[static_cast<std::size_t>(b)] = ctx / 8 + static_cast<std::int32_t>((2LL * ctx - ctx / 4) * b / std::max(1, n - 1));
  std::int64_t total = 0, pages = 0;
  for (std::int32_t l : lens) total += l, pages += (l + 15) / 16 + 1;
  kvc::cache_config cfg;
  cfg.num_kv_heads = s.kv_heads;
  cfg.head_dim = s.head_dim;
  cfg.max_pages = static_cast<std::int32_t>(pages * s.kv_heads);
  cfg.check_finite = false;
  kvc::kv_cache<kvc::half> cache(cfg);
  std::vector<kvc::seq_id> seqs;
  for (std::int32_t l : lens) {
    seqs.push_back(cache.add_sequence());
    kvc_bench::append_random(cache, seqs.back(), s, l);
  }
  const std::size_t qs = std::size_t(s.q_heads) * s.head_dim;
  const auto q = random_rows(qs * n, 3);
  std::vector<float> out(q.size());
  static kvc::thread_pool pool(std::max<std::int32_t>(1, static_cast<std::int32_t>(std::thread::hardware_concurrency())));
  kvc::decode_options serial, pooled;
  pooled.pool = &pool;
  std::vector<double> ser, bat, sin, bat_cpu, sin_cpu, ideal;
  for (auto _ : state) {
    for (int r = 0; r < rounds; ++r) {
      ser.push_back(timed([&] {
        kvc::cpu::decode_attention_batch(cache, seqs.data(), n, 0, q.data(), s.q_heads, out.data(), serial);
      }, out.data()).first);
      const auto b = timed([&] {
        kvc::cpu::decode_attention_batch(cache, seqs.data(), n, 0, q.data(), s.q_heads, out.data(), pooled);
      }, out.data());
      bat.push_back(b.first);
      bat_cpu.push_back(b.second);
      const auto one = timed([&] {
        for (std::int32_t i = 0; i < n; ++i)
          kvc::cpu::decode_attention(cache, seqs[static_cast<std::size_t>(i)], 0, q.data() + i * qs, s.q_heads,
                                     out.data() + i * qs, pooled);
      }, out.data());
      sin.push_back(one.first);
      sin_cpu.push_back(one.second);
      ideal.push_back(timed([&] {
        pool.parallel_for(n, [&](std::int32_t i) {
          kvc::cpu::decode_attention(cache, seqs[static_cast<std::size_t>(i)], 0, q.data() + i * qs, s.q_heads,
                                     out.data() + i * qs, serial);
        });
      }, out.data()).first);
    }
  }
  const double bytes = 2.0 * static_cast<double>(total) * s.kv_heads * s.head_dim * sizeof(kvc::half);
  state.counters["threads"] = pool.size();
  state.counters["batch_ms"] = median(bat) * 1e3;
  state.counters["seq_parallel_scaling"] = median(ser) / median(ideal);
  state.counters["scaling"] = median(ser) / median(bat);
  state.counters["speedup_vs_singles"] = median(sin) / median(bat);
  state.counters["cpu_vs_singles"] = median(sin_cpu) / median(bat_cpu);
  state.counters["bytes_per_second"] = bytes / median(bat);
}

}  // namespace

int main(int argc, char** argv) {
  const shape s{32, 8, 128};
  struct run {
    std::int32_t n, ctx;
    bool ragged;
  };
  for (const run r : {run{16, 4096, false}, run{16, 4096, true}, run{64, 512, false}}) {
    const std::string name = "BM_decode_batch/f16/32x8x128/seqs:" + std::to_string(r.n) + "/ctx:" +
                             std::to_string(r.ctx) + (r.ragged ? "/ragged" : "");
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { BM_decode_batch(st, s, r.n, r.ctx, r.ragged, 15); })
        ->Unit(benchmark::kMillisecond)
        ->Iterations(1);
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
