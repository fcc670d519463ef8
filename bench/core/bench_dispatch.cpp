// SPDX-License-Identifier: Apache-2.0
// Run-time ISA choice (docs/isa.md, issue 17 item 6). This benchmark is built as engines ship,
// with the toolchain's default target (bench/core/CMakeLists.txt: -march=x86-64 after the
// benches' -march=native), plus kvc_add_isa_variants(... ISAS avx2 avx512). Per round, alternating,
// one decode step of the same fp16 cache contents through:
//   baseline   kvc::runtime::make_cache("fp16"): this TU's own kernels (SSE2)
//   dispatched kvc::runtime::make_cache_for_cpu("fp16"): the best registered configuration this
//              CPU runs
//   avx2       make_cache_for_cpu(..., "isa_avx2_fma_f16c"), when the CPU runs it
//   BM_dispatch/fp16/<q>x<kv>x<D>/ctx:<tokens>/threads:1
//     baseline_ms, dispatched_ms, avx2_ms  medians of the calling thread's CPU time (15 rounds)
//     speedup    baseline / dispatched;  avx2_speedup  baseline / avx2
//   The label names the baseline's and the dispatched configuration.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include <kvc/runtime/make_cache.hpp>

#include "kvc_bench.hpp"

namespace {

using kvc_bench::median;
using kvc_bench::random_rows;
using kvc_bench::shape;

std::unique_ptr<kvc::runtime::any_cache> filled(std::unique_ptr<kvc::runtime::any_cache> c, shape s, std::int32_t ctx) {
  kvc_bench::append_random(*c, c->add_sequence(), s, ctx);
  return c;
}

void BM_dispatch(benchmark::State& state, shape s, std::int32_t ctx) {
  kvc::cache_config cfg;
  cfg.num_kv_heads = s.kv_heads;
  cfg.head_dim = s.head_dim;
  cfg.max_pages = s.kv_heads * (ctx / 16 + 2);
  cfg.check_finite = false;
  const bool avx2 = kvc::detail::cpu_has_avx2_fma_f16c();
  auto base = filled(kvc::runtime::make_cache("fp16", cfg), s, ctx);
  auto best = filled(kvc::runtime::make_cache_for_cpu("fp16", cfg), s, ctx);
  auto two = avx2 ? filled(kvc::runtime::make_cache_for_cpu("fp16", cfg, {}, "isa_avx2_fma_f16c"), s, ctx) : nullptr;
  const auto q = random_rows(std::size_t(s.q_heads) * s.head_dim, 3);
  std::vector<float> out(q.size());
  std::vector<double> tb, td, t2;
  for (auto _ : state) {
    for (int r = 0; r < 15; ++r) {
      tb.push_back(kvc_bench::cpu_seconds_of([&] { base->attention(0, 0, q.data(), s.q_heads, out.data()); }, out.data()));
      td.push_back(kvc_bench::cpu_seconds_of([&] { best->attention(0, 0, q.data(), s.q_heads, out.data()); }, out.data()));
      if (two)
        t2.push_back(kvc_bench::cpu_seconds_of([&] { two->attention(0, 0, q.data(), s.q_heads, out.data()); }, out.data()));
    }
  }
  state.counters["baseline_ms"] = median(tb) * 1e3;
  state.counters["dispatched_ms"] = median(td) * 1e3;
  state.counters["speedup"] = median(tb) / median(td);
  if (two) {
    state.counters["avx2_ms"] = median(t2) * 1e3;
    state.counters["avx2_speedup"] = median(tb) / median(t2);
  }
  state.SetLabel(std::string("baseline ") + base->isa() + ", dispatched " + best->isa());
}

}  // namespace

int main(int argc, char** argv) {
  const shape s{32, 8, 128};
  for (std::int32_t ctx : {4096, 32768})
    benchmark::RegisterBenchmark(("BM_dispatch/fp16/32x8x128/ctx:" + std::to_string(ctx) + "/threads:1").c_str(),
                                 [=](benchmark::State& st) { BM_dispatch(st, s, ctx); })
        ->Unit(benchmark::kMillisecond)
        ->Iterations(1);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
