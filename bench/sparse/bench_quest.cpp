// SPDX-License-Identifier: Apache-2.0
// Quest's query-aware page reads (kvc/sparse/quest.hpp) against a full fp16 decode, paired.
//   BM_quest_paired/f16/<q>x<kv>x<D>/ctx:<tokens>/budget:<tokens>/threads:1
// Two fp16 caches hold the same K/V rows: a plain kv_cache<half> read whole by
// cpu::decode_attention (the best exact fp16 kernel in the repository), and one with
// cache_config::key_bounds read by cpu::quest_decode_attention. The two calls alternate (15 pairs,
// same query), then quest_select alone over every kv head; medians of the calling thread's CPU
// time:
//   fp16_cpu_ms, quest_cpu_ms, speedup_vs_fp16 = fp16 / quest,
//   select_cpu_ms and select_fraction = select / quest (the page bounds and the choice),
//   read_fraction = tokens Quest attends to / tokens held (per kv head: the budget's pages),
//   bytes_per_token and fp16_bytes_per_token: pool bytes / tokens of each cache (the bounds cost
//   2 x head_dim elements per page).
// Data: uniform random K/V. Speed only: with random keys every page's bound is alike, which
// changes nothing in the cost (every page is bounded, the budget's pages are read).

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include <kvc/cpu/decode_attention.hpp>
#include <kvc/sparse/quest.hpp>
#include <kvc/store/kv_cache.hpp>

#include "kvc_bench.hpp"

namespace {

using kvc_bench::median;
using kvc_bench::random_rows;
using kvc_bench::shape;

std::unique_ptr<kvc::kv_cache<kvc::half>> filled(shape s, std::int32_t ctx, bool bounds) {
  kvc::cache_config cfg;
  cfg.num_kv_heads = s.kv_heads;
  cfg.head_dim = s.head_dim;
  cfg.max_pages = s.kv_heads * (ctx / 16 + 2);
  cfg.check_finite = false;
  cfg.key_bounds = bounds;
  auto c = std::make_unique<kvc::kv_cache<kvc::half>>(cfg);
  kvc_bench::append_random(*c, c->add_sequence(), s, ctx);
  return c;
}

void BM_quest_paired(benchmark::State& state, shape s, std::int32_t ctx, std::int32_t budget, int pairs) {
  const auto full = filled(s, ctx, false);
  const auto bounded = filled(s, ctx, true);
  const kvc::seq_id seq = 0;  // the one sequence of a fresh kv_cache
  kvc::quest_options qo;
  qo.token_budget = budget;
  const auto q = random_rows(std::size_t(s.q_heads) * s.head_dim, 3);
  std::vector<float> out(q.size());
  const std::int32_t G = s.q_heads / s.kv_heads;
  std::vector<double> fcpu, qcpu, scpu;
  std::int64_t picked = 0;
  for (auto _ : state) {
    for (int i = 0; i < pairs; ++i) {
      fcpu.push_back(kvc_bench::cpu_seconds_of([&] { kvc::cpu::decode_attention(*full, seq, 0, q.data(), s.q_heads, out.data()); }, out.data()));
      qcpu.push_back(kvc_bench::cpu_seconds_of([&] {
        kvc::cpu::quest_decode_attention(*bounded, seq, 0, q.data(), s.q_heads, out.data(), qo);
      }, out.data()));
      picked = 0;
      scpu.push_back(kvc_bench::cpu_seconds_of([&] {
        for (std::int32_t h = 0; h < s.kv_heads; ++h)
          picked += static_cast<std::int64_t>(
              kvc::cpu::quest_select(*bounded, seq, 0, h, q.data() + std::size_t(h) * G * s.head_dim, G, qo).size());
      }, out.data()));
    }
  }
  state.counters["fp16_cpu_ms"] = median(fcpu) * 1e3;
  state.counters["quest_cpu_ms"] = median(qcpu) * 1e3;
  state.counters["speedup_vs_fp16"] = median(fcpu) / median(qcpu);
  state.counters["select_cpu_ms"] = median(scpu) * 1e3;
  state.counters["select_fraction"] = median(scpu) / median(qcpu);
  state.counters["read_fraction"] = double(std::min<std::int64_t>(picked * 16, std::int64_t(ctx) * s.kv_heads)) /
                                    (double(ctx) * s.kv_heads);
  state.counters["bytes_per_token"] = double(bounded->bytes_in_use()) / ctx;
  state.counters["fp16_bytes_per_token"] = double(full->bytes_in_use()) / ctx;
}

}  // namespace

int main(int argc, char** argv) {
  const shape s{32, 8, 128};
  struct run {
    std::int32_t ctx, budget;
  };
  for (const run r : {run{32768, 1024}, run{32768, 2048}, run{32768, 4096}, run{8192, 2048}}) {
    const std::string name = "BM_quest_paired/f16/32x8x128/ctx:" + std::to_string(r.ctx) +
                             "/budget:" + std::to_string(r.budget) + "/threads:1";
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { BM_quest_paired(st, s, r.ctx, r.budget, 15); })
        ->Unit(benchmark::kMillisecond)
        ->Iterations(1);
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
