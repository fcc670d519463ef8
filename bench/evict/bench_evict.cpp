// SPDX-License-Identifier: Apache-2.0
// Scoring + selection time of every scorer over the time of one decode attention step at the same
// context (Llama-3-8B layer shape: 32 query heads, 8 kv heads, head_dim 128, fp16 pages of 16).
// Names: BM_<scorer>/<context>. Counters:
//   overhead_ratio  amortised per-step cost / one decode step. Decode-time scorers (h2o, tova,
//                   scissorhands, a2sf) pay every step the observer update plus the extra cost of
//                   asking decode attention for probabilities, and score + select once every
//                   `interval` = 64 steps (compressor_options::interval); prefill scorers run once
//                   per prompt, so their ratio is score + select / one decode step, unamortised.
//   raw_ratio       score + select / one decode step (no amortisation).
// Times are minima over repetitions (robust on shared cores); decode runs serially, one thread.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <string>

#include <kvc/evict/evict.hpp>
#include <kvc/kvc.hpp>

namespace {

constexpr int Hq = 32, Hkv = 8, D = 128, P = 16, interval = 64;
using cache_t = kvc::kv_cache<kvc::half>;

struct setup {
  std::unique_ptr<cache_t> cache;
  kvc::seq_id seq = 0;
  int ctx = 0;
  std::vector<float> q;        // one decode query [Hq][D]
  std::vector<float> window;   // 64 window queries [64][Hq][D]
  std::vector<float> probs;    // [Hkv][ctx] group sums (decode_options::group_probs)
  double decode_s = 0, decode_probs_s = 0;
  std::vector<float> qstat_src;
  std::unique_ptr<kvc::evict::query_stats_accumulator> qacc;
  kvc::rope rope{kvc::rope_config{}};
  kvc::evict::query_stats qstats;
  std::vector<float> filters;
};

/// Minimum over `reps` single runs: robust to other processes sharing the cores.
template <class F>
double time_it(F&& f, int reps) {
  f();  // warm
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

setup& get(int ctx) {
  static std::map<int, std::unique_ptr<setup>> all;
  auto& s = all[ctx];
  if (s) return *s;
  s = std::make_unique<setup>();
  s->ctx = ctx;
  kvc::cache_config c;
  c.num_layers = 1;
  c.num_kv_heads = Hkv;
  c.head_dim = D;
  c.page_size = P;
  c.max_pages = Hkv * (ctx / P + 2);
  c.check_finite = false;
  s->cache = std::make_unique<cache_t>(c);
  s->seq = s->cache->add_sequence();
  std::mt19937_64 g(1);
  std::normal_distribution<float> nd;
  const int chunk = 1024;
  std::vector<float> k(std::size_t(chunk) * Hkv * D), v(k.size());
  for (int t0 = 0; t0 < ctx; t0 += chunk) {
    for (auto& x : k) x = nd(g);
    for (auto& x : v) x = nd(g);
    s->cache->append(s->seq, 0, k.data(), v.data(), chunk);
  }
  s->q.resize(std::size_t(Hq) * D);
  for (auto& x : s->q) x = nd(g);
  s->window.resize(std::size_t(64) * Hq * D);
  for (auto& x : s->window) x = nd(g);
  s->probs.resize(std::size_t(Hkv) * ctx);
  std::vector<float> out(std::size_t(Hq) * D);
  auto& cache = *s->cache;
  s->decode_s = time_it([&] { kvc::cpu::decode_attention(cache, s->seq, 0, s->q.data(), Hq, out.data()); }, 20);
  kvc::decode_options o;
  o.group_probs = s->probs.data();
  o.probs_stride = ctx;
  s->decode_probs_s =
      time_it([&] { kvc::cpu::decode_attention(cache, s->seq, 0, s->q.data(), Hq, out.data(), o); }, 20);
  s->qacc = std::make_unique<kvc::evict::query_stats_accumulator>(Hq, D);
  s->qacc->add(s->window.data(), 64);
  s->qstats = s->qacc->view(&s->rope);
  s->filters = kvc::evict::fit_qfilters(s->window.data(), 64, Hq, Hkv, D);
  return *s;
}

/// The observer tracks only what the scorer reads (observer_params' track_* flags).
kvc::evict::observer_params tracking(const char* name) {
  kvc::evict::observer_params p;
  const std::string n = name;
  p.track_sum = n == "h2o" || n == "rkv";
  p.track_decayed = n == "a2sf";
  p.track_last = n == "tova";
  p.track_low = n == "scissorhands";
  if (n == "a2sf") p.forgetting = 0.9f;
  return p;
}

template <class S>
void run(benchmark::State& state, const S& scorer, bool decode_time) {
  const int ctx = static_cast<int>(state.range(0));
  setup& s = get(ctx);
  kvc::evict::attention_observer observer(tracking(S::name));
  const double observe_s =
      decode_time ? time_it([&] { observer.observe_group(*s.cache, s.seq, 0, s.probs.data(), ctx, Hq / Hkv); }, 20) : 0.0;
  kvc::evict::compressor_options o;
  o.target = kvc::budget::ratio(0.75);
  o.num_q_heads = Hq;
  o.interval = interval;
  kvc::evict::compressor<S> c(scorer, o);
  kvc::evict::query_window w{s.window.data(), nullptr, 64, Hq, D};
  kvc::evict::observations obs;
  obs.window = &w;
  obs.attention = &observer;
  obs.stats = &s.qstats;
  double ss = 1e30;  // minimum over iterations, like the decode step it is compared with
  for (auto _ : state) {
    auto t0 = std::chrono::steady_clock::now();
    auto sel = c.plan(*s.cache, s.seq, 0, obs, o.target);
    benchmark::DoNotOptimize(sel.data());
    ss = std::min(ss, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  state.counters["raw_ratio"] = ss / s.decode_s;
  state.counters["decode_ms"] = s.decode_s * 1e3;
  if (decode_time) {
    const double per_step = (s.decode_probs_s - s.decode_s) + observe_s + ss / interval;
    state.counters["overhead_ratio"] = per_step / s.decode_s;
    state.counters["probs_ratio"] = (s.decode_probs_s - s.decode_s) / s.decode_s;
    state.counters["observer_ratio"] = observe_s / s.decode_s;
  } else {
    state.counters["overhead_ratio"] = ss / s.decode_s;
  }
}

namespace ev = kvc::evict;

#define KVC_BENCH(NAME, EXPR, DECODE)                                                 \
  void BM_##NAME(benchmark::State& st) { run(st, EXPR, DECODE); }                     \
  BENCHMARK(BM_##NAME)->Arg(4096)->Arg(32768)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.2)

KVC_BENCH(knorm, ev::knorm{}, false);
KVC_BENCH(keydiff, ev::keydiff{}, false);
KVC_BENCH(random, ev::random{}, false);
KVC_BENCH(lagkv, ev::lagkv{}, false);
KVC_BENCH(curdkv, ev::curdkv{}, false);
KVC_BENCH(leverage, ev::leverage{}, false);
KVC_BENCH(streaming_llm, ev::streaming_llm{}, false);
KVC_BENCH(snapkv, ev::snapkv{}, false);
KVC_BENCH(pyramidkv, ev::pyramidkv{}, false);
KVC_BENCH(finch, ev::finch{}, false);
KVC_BENCH(expected_attention, ev::expected_attention{}, false);
KVC_BENCH(qfilters, (ev::qfilters(ev::qfilters_params{get(4096).filters.data(), 1, {4, 0}})), false);
KVC_BENCH(vnorm_snapkv, ev::vnorm<ev::snapkv>{}, false);
KVC_BENCH(chunkkv_snapkv, ev::chunkkv<ev::snapkv>{}, false);
KVC_BENCH(rkv_h2o, ev::rkv<ev::h2o>{}, true);
KVC_BENCH(h2o, ev::h2o{}, true);
KVC_BENCH(tova, ev::tova{}, true);
KVC_BENCH(scissorhands, ev::scissorhands{}, true);
KVC_BENCH(a2sf, ev::a2sf{}, true);

}  // namespace

BENCHMARK_MAIN();
