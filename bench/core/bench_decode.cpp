// SPDX-License-Identifier: Apache-2.0
// Decode attention over kvc::kv_cache: bytes/s of K+V read, and `bw_ratio`, that bandwidth over a
// plain SIMD read of a buffer much larger than the LLC with the same thread count, measured once
// in this process before the benchmarks run (median of 7 passes).
//
//   BM_decode/<dtype>/<q heads>x<kv heads>x<head_dim>/ctx:<tokens>/threads:<n>
//   BM_read/threads:<n>            the baseline loop itself under Google Benchmark (bw_ratio ~ 1)

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>

#include <kvc/cpu/decode_attention.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/types.hpp>

#include "kvc_bench.hpp"

namespace {

struct shape {
  std::int32_t q_heads, kv_heads, head_dim;
};

/// Tokens per page: the store's default (vLLM's block size).
constexpr std::int32_t page_size = 16;
/// The cache is filled like a chunked prefill: this many tokens per append.
constexpr std::int32_t prefill_chunk = 512;
/// Baseline buffer: 16x the 32 MiB LLC of the machine the targets were set on.
constexpr std::size_t read_bytes = std::size_t{512} << 20;

template <class T>
const char* dtype_name();
template <>
const char* dtype_name<float>() { return "fp32"; }
template <>
const char* dtype_name<kvc::half>() { return "fp16"; }
template <>
const char* dtype_name<kvc::bfloat16>() { return "bf16"; }

template <class T>
struct decode_data {
  kvc::kv_cache<T> cache;
  kvc::seq_id seq;
  std::vector<float> q, out;

  decode_data(shape s, std::int32_t ctx)
      : cache([&] {
          kvc::cache_config c;
          c.num_layers = 1;
          c.num_kv_heads = s.kv_heads;
          c.head_dim = s.head_dim;
          c.page_size = page_size;
          c.max_pages = s.kv_heads * ((ctx + page_size - 1) / page_size + 1);
          c.check_finite = false;
          return c;
        }()),
        seq(cache.add_sequence()),
        q(static_cast<std::size_t>(s.q_heads) * s.head_dim),
        out(q.size()) {
    kvc_bench::rng r(static_cast<std::uint64_t>(ctx) * 31 + static_cast<std::uint64_t>(s.head_dim));
    r.fill(q.data(), q.size());
    const std::size_t row = static_cast<std::size_t>(s.kv_heads) * s.head_dim;
    std::vector<float> kf(row * prefill_chunk), vf(kf.size());
    std::vector<T> k(kf.size()), v(kf.size());
    for (std::int32_t t = 0; t < ctx; t += prefill_chunk) {
      const std::int32_t n = std::min(prefill_chunk, ctx - t);
      r.fill(kf.data(), row * n);
      r.fill(vf.data(), row * n);
      for (std::size_t i = 0; i < row * n; ++i) {
        k[i] = T(kf[i]);
        v[i] = T(vf[i]);
      }
      cache.append(seq, 0, k.data(), v.data(), n);
    }
  }
};

/// One data set alive at a time (the 128k fp32 cache is 1 GiB); benchmarks are registered so
/// that those sharing data run one after the other.
std::shared_ptr<void> g_data;
std::string g_key;

template <class D, class... Args>
D& data_for(const std::string& key, Args&&... args) {
  if (g_key != key) {
    g_data.reset();
    g_key.clear();
    g_data = std::make_shared<D>(std::forward<Args>(args)...);
    g_key = key;
  }
  return *static_cast<D*>(g_data.get());
}

template <class T>
void bm_decode(benchmark::State& state, shape s, std::int32_t ctx, kvc::thread_pool* pool, double base_bw) {
  auto& d = data_for<decode_data<T>>(std::string(dtype_name<T>()) + "/" + std::to_string(s.q_heads) + "x" +
                                         std::to_string(s.kv_heads) + "x" + std::to_string(s.head_dim) + "/" +
                                         std::to_string(ctx),
                                     s, ctx);
  kvc::decode_options opt;
  opt.pool = pool;
  for (auto _ : state) {
    kvc::cpu::decode_attention(d.cache, d.seq, 0, d.q.data(), s.q_heads, d.out.data(), opt);
    benchmark::DoNotOptimize(d.out.data());
    benchmark::ClobberMemory();
  }
  const double bytes = 2.0 * s.kv_heads * ctx * s.head_dim * sizeof(T);  // K and V, every token once
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
  state.counters["bw_ratio"] = benchmark::Counter(bytes / base_bw, benchmark::Counter::kIsIterationInvariantRate);
}

struct read_data {
  std::unique_ptr<float, kvc_bench::free_deleter> buf;
  std::size_t n;
  read_data() : n(read_bytes / sizeof(float)) {
    buf.reset(static_cast<float*>(std::aligned_alloc(64, n * sizeof(float))));
    if (!buf) throw std::bad_alloc();
    for (std::size_t i = 0; i < n; ++i) buf.get()[i] = static_cast<float>(i & 1023) * 0.001f;
  }
};

void bm_read(benchmark::State& state, kvc::thread_pool* pool, double base_bw) {
  auto& d = data_for<read_data>("read");
  const std::int32_t threads = pool ? pool->size() : 1;
  const std::size_t slice = d.n / static_cast<std::size_t>(threads) / 64 * 64;
  std::vector<float> sink(static_cast<std::size_t>(threads));
  for (auto _ : state) {
    auto one = [&](std::int32_t t) { sink[static_cast<std::size_t>(t)] += kvc_bench::simd_sum(d.buf.get() + t * slice, slice); };
    if (pool && threads > 1) pool->parallel_for(threads, one);
    else one(0);
    benchmark::DoNotOptimize(sink.data());
  }
  const double bytes = static_cast<double>(slice) * threads * sizeof(float);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
  state.counters["bw_ratio"] = benchmark::Counter(bytes / base_bw, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  const std::int32_t all = std::max<std::int32_t>(1, static_cast<std::int32_t>(std::thread::hardware_concurrency()));
  static kvc::thread_pool pool(all);
  std::vector<std::int32_t> thread_counts{1};
  if (all > 1) thread_counts.push_back(all);
  std::vector<double> base(static_cast<std::size_t>(all) + 1);
  for (std::int32_t t : thread_counts) {
    base[static_cast<std::size_t>(t)] = kvc_bench::read_bandwidth(read_bytes, t > 1 ? &pool : nullptr);
    char v[64];
    std::snprintf(v, sizeof v, "%.2f GB/s", base[static_cast<std::size_t>(t)] / 1e9);
    benchmark::AddCustomContext("read_bw/threads:" + std::to_string(t), v);
  }

  for (std::int32_t t : thread_counts)
    benchmark::RegisterBenchmark(("BM_read/threads:" + std::to_string(t)).c_str(), bm_read, t > 1 ? &pool : nullptr,
                                 base[static_cast<std::size_t>(t)])
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);

  const shape shapes[] = {{32, 8, 128}, {9, 3, 64}};
  const std::int32_t contexts[] = {1024, 4096, 32768, 131072};
  auto add = [&](auto tag) {
    using T = decltype(tag);
    for (const shape& s : shapes)
      for (std::int32_t ctx : contexts)
        for (std::int32_t t : thread_counts) {
          const std::string name = std::string("BM_decode/") + dtype_name<T>() + "/" + std::to_string(s.q_heads) +
                                   "x" + std::to_string(s.kv_heads) + "x" + std::to_string(s.head_dim) +
                                   "/ctx:" + std::to_string(ctx) + "/threads:" + std::to_string(t);
          benchmark::RegisterBenchmark(name.c_str(), bm_decode<T>, s, ctx, t > 1 ? &pool : nullptr,
                                       base[static_cast<std::size_t>(t)])
              ->UseRealTime()
              ->Unit(benchmark::kMicrosecond);
        }
  };
  add(float{});
  add(kvc::half{});
  add(kvc::bfloat16{});

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
