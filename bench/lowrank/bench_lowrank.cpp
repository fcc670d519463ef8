// SPDX-License-Identifier: Apache-2.0
// Projected (PCA) low-rank KV: decode attention in the r-dimensional space of the bases against
// fp16 decode, same shape and context, timed alternately in this process.
//
//   BM_lowrank_paired/<coef type>/r:<rank>/<q heads>x<kv heads>x<head_dim>/ctx:<tokens>/threads:1
//   BM_lowrank_general_paired/f16coef/pre_rope/rk:32/rv:128/...: the general path (keys rebuilt
//     and rotated per token; values at full rank)
//   BM_lowrank_split_paired/f16coef/post_rope/rk:<32|64|96>/rv:128/...: two ranks, the tiled
//     kernel's split layout (keys scored in r_k dims; values at full rank)
//   BM_xkv_paired/f16/pre_rope/group:1/rk:<n>/rv:<n>/...: the xkv(...) storage (one latent per
//     token shared by the layer's kv heads, runtime/xkv_storage.hpp) at the paper's ratios of the
//     layer's width (9.4% keys, 14.1% values): every head rebuilds and rotates its keys per token
//     fp16 kv_cache<half> + cpu::decode_attention and lowrank::projected_cache +
//     cpu::projected_decode_attention called alternately (15 pairs, same queries), plus the step's
//     projections alone (q' = U_kᵀq for every query head, out = U_v a back) right after each
//     projected step. Medians of the calling thread's CPU time (robust on a shared machine):
//       fp16_cpu_ms, lowrank_cpu_ms, speedup_vs_fp16 = fp16 / lowrank,
//       proj_cpu_ms and proj_fraction = proj / lowrank (the projection overhead of a step),
//       bytes_per_token = pool bytes of the projected cache / tokens (all kv heads of the layer;
//       fp16 pages: 4 * kv_heads * head_dim), fp16_bytes_per_token the same for the fp16 cache.
// Data: uniform random K/V (full rank: only speed is measured here, not quality); the bases are
// fitted on the first 4096 tokens of each head.

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <benchmark/benchmark.h>

#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/projected_attention.hpp>
#include <kvc/lowrank/pca.hpp>
#include <kvc/runtime/xkv_storage.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/store/projected_cache.hpp>

#include "kvc_bench.hpp"

// Storage headers register nothing by being included (runtime/make_cache.hpp): the storages this
// file builds by spec are registered here, in its own ISA configuration, before any test runs.
[[maybe_unused]] static const bool storages_registered = (kvc::runtime::register_xkv_storage(), true);

namespace {

using kvc_bench::median;
using kvc_bench::random_rows;
using kvc_bench::shape;
constexpr std::int32_t chunk = 1024;

/// The fp16 cache of (shape, ctx), built once: the same K/V rows the projected caches project.
kvc::kv_cache<kvc::half>& fp16_cache(shape s, std::int32_t ctx, kvc::seq_id& seq) {
  static std::map<std::string, std::unique_ptr<kvc::kv_cache<kvc::half>>> caches;
  const std::string key = std::to_string(s.kv_heads) + "x" + std::to_string(s.head_dim) + "/" + std::to_string(ctx);
  auto& c = caches[key];
  if (!c) {
    kvc::cache_config cfg;
    cfg.num_kv_heads = s.kv_heads;
    cfg.head_dim = s.head_dim;
    cfg.max_pages = s.kv_heads * (ctx / 16 + 2);
    cfg.check_finite = false;
    c = std::make_unique<kvc::kv_cache<kvc::half>>(cfg);
    kvc_bench::append_random(*c, c->add_sequence(), s, ctx, chunk);
  }
  seq = 0;  // the one sequence of a fresh kv_cache has id 0
  return *c;
}

template <class T>
std::unique_ptr<kvc::lowrank::projected_cache<T>> projected(shape s, std::int32_t ctx, std::int32_t r, kvc::seq_id& seq,
                                                            std::int32_t rv = 0, bool pre_rope = false) {
  kvc::lowrank::projected_config cfg;
  cfg.num_kv_heads = s.kv_heads;
  cfg.head_dim = s.head_dim;
  cfg.rank = r;
  cfg.value_rank = rv;
  cfg.pre_rope = pre_rope;
  cfg.rope.head_dim = s.head_dim;
  if (rv == 0) rv = r;
  cfg.max_pages = s.kv_heads * (ctx / 16 + 2);
  auto c = std::make_unique<kvc::lowrank::projected_cache<T>>(cfg);
  const std::int32_t fit = std::min(ctx, 4096), H = s.kv_heads, D = s.head_dim;
  std::vector<float> fk, fv;
  for (std::int32_t t0 = 0; t0 < fit; t0 += chunk) {
    auto k = random_rows(std::size_t(chunk) * H * D, 1 + t0), v = random_rows(k.size(), 2 + t0);
    fk.insert(fk.end(), k.begin(), k.end());
    fv.insert(fv.end(), v.begin(), v.end());
  }
  for (std::int32_t h = 0; h < H; ++h)
    c->set_basis(0, h, kvc::lowrank::fit_basis(fk.data() + h * D, fit, D, H * D, kvc::lowrank::rank_spec::of_count(r)),
                 kvc::lowrank::fit_basis(fv.data() + h * D, fit, D, H * D, kvc::lowrank::rank_spec::of_count(rv)));
  seq = c->add_sequence();
  kvc_bench::append_random(*c, seq, s, ctx, chunk);
  return c;
}

/// fp16 decode and projected_decode_attention alternated, `pairs` pairs per iteration. With
/// pre_rope the cache runs the general path, which has no separate projection step: no
/// projection counters then. Post-RoPE keys at two ranks run the tiled kernel's split layout.
template <class T>
void BM_lowrank_paired(benchmark::State& state, shape s, std::int32_t ctx, std::int32_t r, std::int32_t rv = 0,
                       bool pre_rope = false, int pairs = 15) {
  kvc::seq_id fseq, pseq;
  auto& fc = fp16_cache(s, ctx, fseq);
  auto pc = projected<T>(s, ctx, r, pseq, rv, pre_rope);
  const bool tiled = !pre_rope;  // one rank or two: the r-space kernel, with its projections
  const auto q = random_rows(std::size_t(s.q_heads) * s.head_dim, 3);
  std::vector<float> out(q.size()), qp(std::size_t(s.q_heads) * r), acc(std::size_t(s.q_heads) * pc->value_rank());
  std::vector<double> fcpu, pcpu, proj;
  for (auto _ : state) {
    for (int i = 0; i < pairs; ++i) {
      fcpu.push_back(kvc_bench::cpu_seconds_of([&] { kvc::cpu::decode_attention(fc, fseq, 0, q.data(), s.q_heads, out.data()); }, out.data()));
      pcpu.push_back(
          kvc_bench::cpu_seconds_of([&] { kvc::cpu::projected_decode_attention(*pc, pseq, 0, q.data(), s.q_heads, out.data()); }, out.data()));
      if (!tiled) continue;
      // The step's projections alone, on the same bases (L2-resident as in the step).
      proj.push_back(kvc_bench::cpu_seconds_of(
          [&] {
            kvc::cpu::lowrank_detail::project_queries<kvc::cpu::default_arch>(*pc, 0, q.data(), s.q_heads, qp.data());
            benchmark::DoNotOptimize(qp.data());
            kvc::cpu::lowrank_detail::back_project_all<kvc::cpu::default_arch>(*pc, 0, acc.data(), s.q_heads, out.data());
          },
          out.data()));
    }
  }
  state.counters["fp16_cpu_ms"] = median(fcpu) * 1e3;
  state.counters["lowrank_cpu_ms"] = median(pcpu) * 1e3;
  state.counters["speedup_vs_fp16"] = median(fcpu) / median(pcpu);
  if (tiled) {
    state.counters["proj_cpu_ms"] = median(proj) * 1e3;
    state.counters["proj_fraction"] = median(proj) / median(pcpu);
  }
  state.counters["bytes_per_token"] = double(pc->bytes_in_use()) / ctx;
  state.counters["fp16_bytes_per_token"] = double(fc.bytes_in_use()) / ctx;
}

/// fp16 decode and an xkv cache's attention (one layer, its prompt moved to latents), alternated.
void BM_xkv_paired(benchmark::State& state, shape s, std::int32_t ctx, std::int32_t rk, std::int32_t rv, int pairs) {
  kvc::seq_id fseq;
  auto& fc = fp16_cache(s, ctx, fseq);
  kvc::cache_config cfg;
  cfg.num_kv_heads = s.kv_heads;
  cfg.head_dim = s.head_dim;
  cfg.max_pages = s.kv_heads * (ctx / 16 + 2);
  kvc::rope_config rc;
  rc.head_dim = s.head_dim;
  kvc::runtime::storage_options o;
  o.rope = &rc;
  auto c = kvc::runtime::make_cache("xkv(group=1,rank=" + std::to_string(rk) + ",vrank=" + std::to_string(rv) + ")", cfg, o);
  const kvc::seq_id xs = c->add_sequence();
  kvc_bench::append_random(*c, xs, s, ctx, chunk);
  const auto q = random_rows(std::size_t(s.q_heads) * s.head_dim, 3);
  c->observe_window(xs, 0, q.data(), 1, s.q_heads);  // the end of the prompt: fit and move
  std::vector<float> out(q.size());
  std::vector<double> fcpu, xcpu;
  for (auto _ : state) {
    for (int i = 0; i < pairs; ++i) {
      fcpu.push_back(kvc_bench::cpu_seconds_of([&] { kvc::cpu::decode_attention(fc, fseq, 0, q.data(), s.q_heads, out.data()); }, out.data()));
      xcpu.push_back(kvc_bench::cpu_seconds_of([&] { c->attention(xs, 0, q.data(), s.q_heads, out.data(), {}); }, out.data()));
    }
  }
  state.counters["fp16_cpu_ms"] = median(fcpu) * 1e3;
  state.counters["lowrank_cpu_ms"] = median(xcpu) * 1e3;
  state.counters["speedup_vs_fp16"] = median(fcpu) / median(xcpu);
  state.counters["bytes_per_token"] = double(c->bytes_in_use()) / ctx;
  state.counters["fp16_bytes_per_token"] = double(fc.bytes_in_use()) / ctx;
}

template <class T>
void register_all(const char* type) {
  const shape s{32, 8, 128};
  const std::int32_t ctx = 32768;
  for (std::int32_t r : {16, 32, 64}) {
    if (!std::is_same<T, kvc::half>::value && r != 32) continue;  // fp32 coefficients: r = D/4 only, for the choice
    const std::string name = std::string("BM_lowrank_paired/") + type + "/r:" + std::to_string(r) + "/32x8x128/ctx:" +
                             std::to_string(ctx) + "/threads:1";
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { BM_lowrank_paired<T>(st, s, ctx, r); })
        ->Unit(benchmark::kMillisecond)
        ->Iterations(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all<kvc::half>("f16coef");
  register_all<float>("f32coef");
  // Keys at D/4 and whole values (the cache a model needs, docs/results.md) before RoPE: the
  // general path. After RoPE, keys at rk of 128 and whole values: the split layout of the tiled
  // kernel, which ThinK's caches use (think(ratio=0.5) is rk = 64, ratio=0.25 rk = 96).
  for (std::int32_t rk : {-32, 32, 64, 96}) {
    const bool pre = rk < 0;
    const std::int32_t r = pre ? -rk : rk;
    const std::string name = std::string(pre ? "BM_lowrank_general_paired/f16coef/pre_rope" : "BM_lowrank_split_paired/f16coef/post_rope") +
                             "/rk:" + std::to_string(r) + "/rv:128/32x8x128/ctx:32768/threads:1";
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) {
      BM_lowrank_paired<kvc::half>(st, shape{32, 8, 128}, 32768, r, 128, pre, pre ? 5 : 15);
    })->Unit(benchmark::kMillisecond)->Iterations(1);
  }
  // xKV-1 at the published ratios of the layer's width 8 x 128 = 1024: r_k = 97, r_v = 145.
  benchmark::RegisterBenchmark("BM_xkv_paired/f16/pre_rope/group:1/rk:97/rv:145/32x8x128/ctx:32768/threads:1",
                               [](benchmark::State& st) { BM_xkv_paired(st, shape{32, 8, 128}, 32768, 97, 145, 5); })
      ->Unit(benchmark::kMillisecond)
      ->Iterations(1);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
