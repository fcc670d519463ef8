// SPDX-License-Identifier: Apache-2.0
// Merged tokens (kvc/merge/): what the log-weight costs in decode attention, and what a CaM merge
// step costs against a decode step.
//
//   BM_merge_paired/fp16/<q heads>x<kv heads>x<head_dim>/ctx:<tokens>/threads:1
//     one merge::merged_cache<half> with no merges (every log-weight 0), cpu::decode_attention on
//     its inner kv_cache and cpu::merged_decode_attention on it called alternately (15 pairs per
//     iteration, same queries, same pages): the bias costs what it costs. Medians of the calling
//     thread's CPU time: decode_cpu_ms, merged_cpu_ms, merged_over_decode = merged / decode; and
//     nobias_cpu_ms, the same stream kernel with no bias pointer (stream_no_bias, in the same
//     triple), merged_over_nobias = what the log-weight itself costs.
//   BM_cam_step/fp16/<shape>/ctx:<tokens>/evict:<tokens evicted per head>/threads:1
//     merge::cam_merge_layer (cam_plan + keep_layer_mix_values) on a freshly built cache
//     (the build is not timed), against merged_decode_attention on the same cache before the step:
//     cam_cpu_ms, decode_cpu_ms, cam_over_decode; and evict_only_cpu_ms (merged_cache::keep_layer
//     with the same kept sets on another fresh cache: the eviction's compaction without CaM),
//     evict_only_over_decode. evict:1 is CaM's per-step use (one token leaves
//     per decode step); evict:half a one-shot compression to half.
//   BM_merge_step/<d2o|kvmerger>/fp16/32x8x128/ctx:<tokens>/evict:<1|half>/threads:1
//     merge::d2o_merge_layer (its kept sets: the same as CaM's) or merge::kvmerger_merge_layer
//     (scores as CaM's, the kept set protected, the rest eligible) on a fresh cache, against
//     merged_decode_attention on the same cache before the step: step_cpu_ms, decode_cpu_ms,
//     step_over_decode, merged (tokens merged, summed over heads). On random keys adjacent
//     cosines are near 0, so KVMerger's figure is its scan alone (nothing merges at ε = 0.75);
//     D2O merges about half of the evicted tokens (τ is their mean similarity).
//   BM_merge_loop/<d2o|kvmerger>/fp16/32x8x128/ctx:<tokens>/threads:1
//     per-step use on one cache: 30 rounds of append one token, merged_decode_attention, then
//     d2o_merge_layer evicting one random token per head (τ carried over) or kvmerger_merge_layer
//     with every token but one random one protected: loop_step_cpu_ms, decode_cpu_ms,
//     step_over_decode (medians over the rounds). Unlike BM_merge_step's fresh caches, buffers
//     and pages are reused from round to round as in a decode loop (d2o_merge_layer's reused key
//     buffers show here, and cost there: cold memory after a cache build).
//   BM_merge_schedule/<evict|d2o|cam|kvmerger>/fp16/32x8x128/ctx:<tokens>/interval:<steps>/threads:1
//     H2O's decode loop through the run-time path kvc-llama and kvc.Cache run: a cache from
//     runtime::make_merged_cache("fp16") holding ctx tokens, then per step: append one token,
//     merged decode attention with group_probs, the attention observer fed (decode_cpu_ms, the
//     median step), then runtime::merger::after_decode_step (the compressor's decode schedule,
//     merging on the steps it says are due; evict: compressor::after_decode_step, the same
//     schedule dropping instead of merging). Budget: ctx tokens per head; interval 1 (slack 0) compresses every
//     step by one token, interval 32 (slack 32) every 32 steps by 32. compress_per_step_ms is the
//     compressions' CPU time over all steps (what a decode step pays on average);
//     overhead = compress_per_step / decode. 64 steps (two compressions at interval 32).
//   BM_merge_quant_paired/<int8|kivi4>/<shape>/ctx:<tokens>/threads:1
//     merged tokens over codes (merge::basic_merged_cache<quant_cache<Q, Q>>, no merges):
//     cpu::decode_attention on its quant_cache and cpu::merged_decode_attention on it (the same
//     quantized kernel adding the log-weights, cpu/merged_quant_attention.hpp) alternately, 15
//     pairs per iteration: quant_cpu_ms, merged_cpu_ms, merged_over_quant.
// Data: uniform random K/V and scores; the kept set is the highest-scoring tokens.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/merged_attention.hpp>
#include <kvc/cpu/merged_quant_attention.hpp>
#include <kvc/cpu/stream_attention.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/merge/cam.hpp>
#include <kvc/merge/d2o.hpp>
#include <kvc/merge/kvmerger.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/runtime/merge_registry.hpp>
#include <kvc/store/merged_cache.hpp>
#include <kvc/store/quant_cache.hpp>

#include "kvc_bench.hpp"

namespace {

using kvc_bench::median;
using kvc_bench::random_rows;
using kvc_bench::shape;
using kvc_bench::thread_cpu_seconds;
constexpr std::int32_t chunk = 1024;

std::unique_ptr<kvc::merge::merged_cache<kvc::half>> build(shape s, std::int32_t ctx, kvc::seq_id& seq) {
  kvc::cache_config cfg;
  cfg.num_kv_heads = s.kv_heads;
  cfg.head_dim = s.head_dim;
  cfg.max_pages = s.kv_heads * (ctx / 16 + 2);
  cfg.check_finite = false;
  auto c = std::make_unique<kvc::merge::merged_cache<kvc::half>>(cfg);
  seq = c->add_sequence();
  kvc_bench::append_random(*c, seq, s, ctx, chunk);
  return c;
}

/// merged_decode_attention's work with no bias pointer: the same stream kernel, so the difference
/// to merged_decode_attention is the bias alone (the difference to decode_attention is the kernel).
void stream_no_bias(const kvc::merge::merged_cache<kvc::half>& c, kvc::seq_id seq, const float* q, std::int32_t Hq,
                    float* out) {
  const auto& kv = c.cache();
  const std::int32_t H = kv.config().num_kv_heads, D = kv.config().head_dim, G = Hq / H;
  std::vector<float> qs(static_cast<std::size_t>(Hq) * D), m(static_cast<std::size_t>(Hq)), l(m.size());
  const float scale = 1.0f / std::sqrt(float(D));
  for (std::size_t i = 0; i < qs.size(); ++i) qs[i] = q[i] * scale;
  for (std::int32_t h = 0; h < H; ++h) {
    const std::size_t o = std::size_t(h) * G;
    kvc::cpu::stream_detail::attend_stream_dispatch<kvc::cpu::default_arch, kvc::half>(
        G, kv.pool(), kv.pages(seq, 0, h).data(), kv.length(seq, 0, h), kv.config().page_size, D, qs.data() + o * D,
        nullptr, out + o * D, m.data() + o, l.data() + o);
  }
  for (std::int32_t h = 0; h < Hq; ++h)
    for (std::int32_t d = 0; d < D; ++d) out[std::size_t(h) * D + d] /= l[std::size_t(h)];
}

void BM_merge_paired(benchmark::State& state, shape s, std::int32_t ctx) {
  kvc::seq_id seq;
  auto c = build(s, ctx, seq);
  const auto q = random_rows(std::size_t(s.q_heads) * s.head_dim, 3);
  std::vector<float> out(q.size());
  std::vector<double> dcpu, mcpu, ncpu;
  for (auto _ : state) {
    for (int i = 0; i < 15; ++i) {
      double c1 = thread_cpu_seconds();
      stream_no_bias(*c, seq, q.data(), s.q_heads, out.data());
      benchmark::DoNotOptimize(out.data());
      ncpu.push_back(thread_cpu_seconds() - c1);
      double c0 = thread_cpu_seconds();
      kvc::cpu::decode_attention(c->cache(), seq, 0, q.data(), s.q_heads, out.data());
      benchmark::DoNotOptimize(out.data());
      dcpu.push_back(thread_cpu_seconds() - c0);
      c0 = thread_cpu_seconds();
      kvc::cpu::merged_decode_attention(*c, seq, 0, q.data(), s.q_heads, out.data());
      benchmark::DoNotOptimize(out.data());
      mcpu.push_back(thread_cpu_seconds() - c0);
    }
  }
  state.counters["decode_cpu_ms"] = median(dcpu) * 1e3;
  state.counters["merged_cpu_ms"] = median(mcpu) * 1e3;
  state.counters["merged_over_decode"] = median(mcpu) / median(dcpu);
  state.counters["nobias_cpu_ms"] = median(ncpu) * 1e3;
  state.counters["merged_over_nobias"] = median(mcpu) / median(ncpu);
}

template <class Q>
void BM_merge_quant_paired(benchmark::State& state, shape s, std::int32_t ctx) {
  kvc::quant_cache_config cfg;
  cfg.num_kv_heads = s.kv_heads;
  cfg.head_dim = s.head_dim;
  cfg.page_size = 32;  // whole KIVI key groups
  cfg.max_pages = s.kv_heads * (ctx / 32 + 2);
  cfg.check_finite = false;
  kvc::merge::basic_merged_cache<kvc::quant_cache<Q, Q>> c(cfg, Q{}, Q{});
  const kvc::seq_id seq = c.add_sequence();
  kvc_bench::append_random(c, seq, s, ctx, chunk);
  const auto q = random_rows(std::size_t(s.q_heads) * s.head_dim, 3);
  std::vector<float> out(q.size());
  std::vector<double> qcpu, mcpu;
  for (auto _ : state) {
    for (int i = 0; i < 15; ++i) {
      double c0 = thread_cpu_seconds();
      kvc::cpu::decode_attention(c.cache(), seq, 0, q.data(), s.q_heads, out.data());
      benchmark::DoNotOptimize(out.data());
      qcpu.push_back(thread_cpu_seconds() - c0);
      c0 = thread_cpu_seconds();
      kvc::cpu::merged_decode_attention(c, seq, 0, q.data(), s.q_heads, out.data());
      benchmark::DoNotOptimize(out.data());
      mcpu.push_back(thread_cpu_seconds() - c0);
    }
  }
  state.counters["quant_cpu_ms"] = median(qcpu) * 1e3;
  state.counters["merged_cpu_ms"] = median(mcpu) * 1e3;
  state.counters["merged_over_quant"] = median(mcpu) / median(qcpu);
}

/// Random non-negative scores per kv head and the kept sets of the highest-scoring ctx - evict.
void scores_and_kept(shape s, std::int32_t ctx, std::int32_t evict, std::vector<std::vector<float>>& scores,
                     std::vector<std::vector<std::int32_t>>& kept) {
  scores.assign(static_cast<std::size_t>(s.kv_heads), {});
  kept.assign(scores.size(), {});
  for (std::size_t h = 0; h < scores.size(); ++h) {
    auto r = random_rows(static_cast<std::size_t>(ctx), 10 + h);
    for (float& x : r) x = x * x;  // >= 0
    scores[h] = r;
    std::vector<std::int32_t> idx(static_cast<std::size_t>(ctx));
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + (ctx - evict), idx.end(),
                      [&](std::int32_t a, std::int32_t b) { return r[a] > r[b] || (r[a] == r[b] && a < b); });
    idx.resize(static_cast<std::size_t>(ctx - evict));
    std::sort(idx.begin(), idx.end());
    kept[h] = idx;
  }
}

void BM_cam_step(benchmark::State& state, shape s, std::int32_t ctx, std::int32_t evict) {
  const auto q = random_rows(std::size_t(s.q_heads) * s.head_dim, 3);
  std::vector<float> out(q.size());
  std::vector<std::vector<float>> scores;
  std::vector<std::vector<std::int32_t>> kept;
  scores_and_kept(s, ctx, evict, scores, kept);
  std::vector<double> ccpu, dcpu, kcpu;
  for (auto _ : state) {
    for (int i = 0; i < 7; ++i) {
      state.PauseTiming();
      kvc::seq_id seq;
      auto c = build(s, ctx, seq);
      auto e = build(s, ctx, seq);
      state.ResumeTiming();
      double c1 = thread_cpu_seconds();
      e->keep_layer(seq, 0, kept);  // the same eviction without merging: the compaction alone
      kcpu.push_back(thread_cpu_seconds() - c1);
      double c0 = thread_cpu_seconds();
      kvc::cpu::merged_decode_attention(*c, seq, 0, q.data(), s.q_heads, out.data());
      benchmark::DoNotOptimize(out.data());
      dcpu.push_back(thread_cpu_seconds() - c0);
      c0 = thread_cpu_seconds();
      kvc::merge::cam_merge_layer(*c, seq, 0, scores, kept);
      ccpu.push_back(thread_cpu_seconds() - c0);
    }
  }
  state.counters["cam_cpu_ms"] = median(ccpu) * 1e3;
  state.counters["decode_cpu_ms"] = median(dcpu) * 1e3;
  state.counters["cam_over_decode"] = median(ccpu) / median(dcpu);
  state.counters["evict_only_cpu_ms"] = median(kcpu) * 1e3;
  state.counters["evict_only_over_decode"] = median(kcpu) / median(dcpu);
}

void BM_merge_step(benchmark::State& state, bool d2o, shape s, std::int32_t ctx, std::int32_t evict) {
  const auto q = random_rows(std::size_t(s.q_heads) * s.head_dim, 3);
  std::vector<float> out(q.size());
  std::vector<std::vector<float>> scores;
  std::vector<std::vector<std::int32_t>> kept;
  scores_and_kept(s, ctx, evict, scores, kept);
  std::vector<double> scpu, dcpu;
  std::int64_t merged = 0;
  for (auto _ : state) {
    for (int i = 0; i < 5; ++i) {
      state.PauseTiming();
      kvc::seq_id seq;
      auto c = build(s, ctx, seq);
      state.ResumeTiming();
      double c0 = thread_cpu_seconds();
      kvc::cpu::merged_decode_attention(*c, seq, 0, q.data(), s.q_heads, out.data());
      benchmark::DoNotOptimize(out.data());
      dcpu.push_back(thread_cpu_seconds() - c0);
      c0 = thread_cpu_seconds();
      if (d2o) {
        kvc::merge::d2o_threshold thr;
        merged = kvc::merge::d2o_merge_layer(*c, seq, 0, kept, thr).merged;
      } else {
        merged = kvc::merge::kvmerger_merge_layer(*c, seq, 0, scores, kept).removed;
      }
      scpu.push_back(thread_cpu_seconds() - c0);
    }
  }
  state.counters["step_cpu_ms"] = median(scpu) * 1e3;
  state.counters["decode_cpu_ms"] = median(dcpu) * 1e3;
  state.counters["step_over_decode"] = median(scpu) / median(dcpu);
  state.counters["merged"] = static_cast<double>(merged);
}

void BM_merge_loop(benchmark::State& state, bool d2o, shape s, std::int32_t ctx) {
  const auto q = random_rows(std::size_t(s.q_heads) * s.head_dim, 3);
  std::vector<float> out(q.size());
  std::vector<double> scpu, dcpu;
  for (auto _ : state) {
    state.PauseTiming();
    kvc::seq_id seq;
    auto c = build(s, ctx, seq);  // room for 2 pages more per head: 30 appended tokens fit
    state.ResumeTiming();
    kvc::merge::d2o_threshold thr;
    std::uint64_t pick = 12345;
    for (int round = 0; round < 30; ++round) {
      const auto kv = random_rows(std::size_t(s.kv_heads) * s.head_dim, 100 + round);
      c->append(seq, 0, kv.data(), kv.data(), 1);
      double c0 = thread_cpu_seconds();
      kvc::cpu::merged_decode_attention(*c, seq, 0, q.data(), s.q_heads, out.data());
      benchmark::DoNotOptimize(out.data());
      dcpu.push_back(thread_cpu_seconds() - c0);
      std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(s.kv_heads));
      std::vector<std::vector<float>> scores(kept.size());
      for (std::int32_t h = 0; h < s.kv_heads; ++h) {
        const std::int32_t n = c->length(seq, 0, h);
        pick = pick * 6364136223846793005ull + 1442695040888963407ull;
        const std::int32_t drop = static_cast<std::int32_t>((pick >> 33) % static_cast<std::uint64_t>(n - 1));
        for (std::int32_t t = 0; t < n; ++t)
          if (t != drop) kept[static_cast<std::size_t>(h)].push_back(t);
        scores[static_cast<std::size_t>(h)].assign(static_cast<std::size_t>(n), 0.0f);
      }
      c0 = thread_cpu_seconds();
      if (d2o) kvc::merge::d2o_merge_layer(*c, seq, 0, kept, thr);
      else kvc::merge::kvmerger_merge_layer(*c, seq, 0, scores, kept);
      scpu.push_back(thread_cpu_seconds() - c0);
    }
  }
  state.counters["loop_step_cpu_ms"] = median(scpu) * 1e3;
  state.counters["decode_cpu_ms"] = median(dcpu) * 1e3;
  state.counters["step_over_decode"] = median(scpu) / median(dcpu);
}

void BM_merge_schedule(benchmark::State& state, const std::string& merge, shape s, std::int32_t ctx,
                       std::int32_t interval) {
  constexpr std::int32_t steps = 64;
  kvc::cache_config cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = s.kv_heads;
  cfg.head_dim = s.head_dim;
  cfg.max_pages = s.kv_heads * ((ctx + steps) / 16 + 4);
  cfg.check_finite = false;
  kvc::evict::compressor_options co;
  co.target = kvc::budget::tokens(ctx);
  co.interval = interval;
  co.slack = interval > 1 ? interval : 0;
  co.num_q_heads = s.q_heads;
  const kvc::evict::compressor<kvc::evict::h2o> comp0(kvc::evict::h2o{}, co);
  const auto q = random_rows(std::size_t(s.q_heads) * s.head_dim, 3);
  std::vector<float> out(q.size()), gp;
  std::vector<double> dcpu;
  double ccpu = 0;
  for (auto _ : state) {
    state.PauseTiming();
    auto c = kvc::runtime::make_merged_cache("fp16", cfg);
    const kvc::seq_id seq = c->add_sequence();
    kvc_bench::append_random(*c, seq, s, ctx, chunk);
    auto comp = comp0;
    kvc::evict::attention_observer obs;
    std::optional<kvc::runtime::merger> m;
    if (!merge.empty()) m.emplace(kvc::runtime::make_merge_policy(kvc::runtime::parse_spec(merge).at(0)));
    state.ResumeTiming();
    for (std::int32_t step = 0; step < steps; ++step) {
      const auto kv = random_rows(std::size_t(s.kv_heads) * s.head_dim, 100 + step);
      c->append(seq, 0, kv.data(), kv.data(), 1);
      double c0 = thread_cpu_seconds();
      std::int32_t longest = 0;
      for (std::int32_t h = 0; h < s.kv_heads; ++h) longest = std::max(longest, c->length(seq, 0, h));
      gp.assign(std::size_t(s.kv_heads) * longest, 0.0f);
      kvc::decode_options o;
      o.group_probs = gp.data();
      o.probs_stride = longest;
      c->attention(seq, 0, q.data(), s.q_heads, out.data(), o);
      kvc::runtime::any_cache_view view{c.get()};
      obs.observe_group(view, seq, 0, gp.data(), longest, s.q_heads / s.kv_heads);
      benchmark::DoNotOptimize(out.data());
      dcpu.push_back(thread_cpu_seconds() - c0);
      c0 = thread_cpu_seconds();
      kvc::evict::observations ob;
      ob.attention = &obs;
      if (!m) comp.after_decode_step(view, seq, 0, ob);
      else m->after_decode_step(comp, *c, seq, 0, ob);
      ccpu += thread_cpu_seconds() - c0;
    }
  }
  const double per_step = ccpu / (static_cast<double>(steps) * static_cast<double>(state.iterations()));
  state.counters["decode_cpu_ms"] = median(dcpu) * 1e3;
  state.counters["compress_per_step_ms"] = per_step * 1e3;
  state.counters["overhead"] = per_step / median(dcpu);
}

}  // namespace

int main(int argc, char** argv) {
  for (shape s : {shape{32, 8, 128}, shape{16, 4, 64}})
    for (std::int32_t ctx : {4096, 32768}) {
      const std::string sh = std::to_string(s.q_heads) + "x" + std::to_string(s.kv_heads) + "x" + std::to_string(s.head_dim);
      benchmark::RegisterBenchmark(("BM_merge_paired/fp16/" + sh + "/ctx:" + std::to_string(ctx) + "/threads:1").c_str(),
                                   [=](benchmark::State& st) { BM_merge_paired(st, s, ctx); })
          ->Unit(benchmark::kMillisecond)
          ->Iterations(1);
    }
  for (std::int32_t ctx : {4096, 32768}) {
    const std::string tail = "/32x8x128/ctx:" + std::to_string(ctx) + "/threads:1";
    benchmark::RegisterBenchmark(("BM_merge_quant_paired/int8" + tail).c_str(),
                                 [=](benchmark::State& st) { BM_merge_quant_paired<kvc::quant::int8>(st, {32, 8, 128}, ctx); })
        ->Unit(benchmark::kMillisecond)
        ->Iterations(1);
    benchmark::RegisterBenchmark(("BM_merge_quant_paired/kivi4" + tail).c_str(),
                                 [=](benchmark::State& st) { BM_merge_quant_paired<kvc::quant::kivi<4>>(st, {32, 8, 128}, ctx); })
        ->Unit(benchmark::kMillisecond)
        ->Iterations(1);
  }
  const shape s{32, 8, 128};
  const std::int32_t ctx = 4096;
  for (std::int32_t evict : {1, ctx / 2}) {
    const std::string name = "BM_cam_step/fp16/32x8x128/ctx:" + std::to_string(ctx) +
                             "/evict:" + (evict == 1 ? std::string("1") : std::string("half")) + "/threads:1";
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { BM_cam_step(st, s, ctx, evict); })
        ->Unit(benchmark::kMillisecond)
        ->Iterations(1);
  }
  for (bool d2o : {true, false})
    for (std::int32_t evict : {1, ctx / 2}) {
      const std::string name = std::string("BM_merge_step/") + (d2o ? "d2o" : "kvmerger") +
                               "/fp16/32x8x128/ctx:" + std::to_string(ctx) + "/evict:" +
                               (evict == 1 ? std::string("1") : std::string("half")) + "/threads:1";
      benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { BM_merge_step(st, d2o, s, ctx, evict); })
          ->Unit(benchmark::kMillisecond)
          ->Iterations(1);
    }
  for (bool d2o : {true, false}) {
    const std::string name = std::string("BM_merge_loop/") + (d2o ? "d2o" : "kvmerger") + "/fp16/32x8x128/ctx:" +
                             std::to_string(ctx) + "/threads:1";
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { BM_merge_loop(st, d2o, s, ctx); })
        ->Unit(benchmark::kMillisecond)
        ->Iterations(1);
  }
  for (const char* merge : {"", "d2o", "cam", "kvmerger"})
    for (std::int32_t c : {4096, 32768})
      for (std::int32_t interval : {1, 32}) {
        const std::string name = std::string("BM_merge_schedule/") + (*merge ? merge : "evict") +
                                 "/fp16/32x8x128/ctx:" + std::to_string(c) + "/interval:" + std::to_string(interval) +
                                 "/threads:1";
        benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { BM_merge_schedule(st, merge, s, c, interval); })
            ->Unit(benchmark::kMillisecond)
            ->Iterations(1);
      }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
