// SPDX-License-Identifier: Apache-2.0
// Decode attention over kvc::kv_cache against a roofline measured in this process before the
// benchmarks run, with the same thread count: the read bandwidth (a plain SIMD sum over a 512 MiB
// buffer, 16x the 32 MiB L3, median of 7 passes) and the FMA rate (kvc_bench::fma_loop: 12
// register-resident accumulators of the widest float batch the kernel uses, median of 7 passes).
// Both go into the JSON context (read_bw/threads:<n>, fma_rate/threads:<n>, simd_arch).
//
//   BM_decode/<dtype>/<q heads>x<kv heads>x<head_dim>/ctx:<tokens>/threads:<n>
//   BM_read/threads:<n>            the bandwidth baseline loop itself, on its own buffer, under Google
//                                  Benchmark (bw_ratio ~ 1)
//
// Times are wall-clock (UseRealTime on every benchmark): with a thread pool, Google Benchmark's
// cpu_time counts only the calling thread. Every rate counter (bytes_per_second, the ratios) is
// per second of that wall-clock time.
//
// Counters, one definition each:
//   bytes_per_second  K+V bytes read per second (BM_read: bytes of the buffer summed)
//   bw_ratio          bytes_per_second / read_bw with the same thread count
//   ws_over_l3        K+V bytes (BM_read: the buffer) / the L3 size (sysconf, 32 MiB when it
//                     reports none). Below ~2 the working set is partly or wholly cache-resident and
//                     its GB/s is not a DRAM figure: bandwidth claims use ws_over_l3 >= 4 (the 32k and
//                     128k contexts at 32x8x128).
//   read_GBps, fma_G  the read bandwidth (GB/s) and FMA rate (10^9 lane FMAs/s) re-measured right
//                     after this benchmark's timed loop (see bm_decode)
//   bw_bound_ms       K+V bytes / read_GBps: the step's time if it only had to stream the cache
//   fma_bound_ms      FMAs / fma_G: the step's time if it only had to issue its FMAs
//   roof_ratio        max(bw_bound_ms, fma_bound_ms) / measured time per step (1 = on the roof)
//   pages_ms          threads:1 only: CPU ms to merely read this cache's K and V pages in the
//                     kernel's order with a SIMD sum (page_stream_seconds, median of 3): the floor
//                     of any kernel over this layout, which the contiguous read_bw probe can beat
//   pages_ratio       pages_ms / the kernel's CPU ms per step (1 = the kernel costs no more than
//                     reading its pages)
//   roof_ratio_cpu    threads:1 only: the same with the probes' and the kernel's time taken as the
//                     calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID), which other jobs on a
//                     shared machine inflate less than wall-clock time. Not defined with a pool,
//                     where the caller's CPU time misses the workers'.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <unistd.h>
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

/// L3 size in bytes from sysfs (cpu0's index3), else the 32 MiB of the machine the targets were
/// set on. Not sysconf(_SC_LEVEL3_CACHE_SIZE): under this VM's hypervisor glibc reports 320 MiB.
double l3_bytes() {
  static const double v = [] {
    if (std::FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      long kib = 0;
      char unit = 0;
      const int got = std::fscanf(f, "%ld%c", &kib, &unit);
      std::fclose(f);
      if (got >= 1 && kib > 0) return static_cast<double>(kib) * (unit == 'M' ? 1024.0 * 1024.0 : 1024.0);
    }
    return static_cast<double>(std::size_t{32} << 20);
  }();
  return v;
}

/// The roofline of one thread count.
struct roof {
  double bw = 0;   ///< read bytes/s (kvc_bench::read_probe)
  double fma = 0;  ///< lane FMAs/s (kvc_bench::fma_rate)
  double bw_cpu = 0, fma_cpu = 0;  ///< the same per CPU second of the calling thread
};

/// The 512 MiB baseline buffer, allocated once in main.
kvc_bench::read_probe* g_probe = nullptr;

/// Measures the roof with reps passes of each probe (an untimed pass first when warm).
roof measure_roof(kvc::thread_pool* pool, int reps, bool warm) {
  roof r;
  r.bw = g_probe->bandwidth(pool, reps, warm, &r.bw_cpu);
  r.fma = kvc_bench::fma_rate(pool, reps, warm ? std::int64_t{1} << 23 : std::int64_t{1} << 21, &r.fma_cpu);
  return r;
}

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

/// Seconds to read every K and V row of the cache's layer 0 in the decode kernel's order (per kv
/// head, a tile of 16 rows of K, then the same rows of V) with a sum as the only arithmetic: what
/// one thread takes merely to stream these pages, the floor of any kernel that reads them all
/// (median of reps passes). The contiguous read_bw probe can be faster: a head's pages are K and
/// V blocks of page_size rows, not one run.
template <class T>
double page_stream_seconds(const decode_data<T>& d, int reps) {
  using A = kvc::cpu::default_arch;
  using B = kvc::cpu::fbatch<A>;
  constexpr std::size_t W = B::size;
  std::vector<typename kvc::kv_cache<T>::view_type> buf;
  const auto heads = d.cache.layer(d.seq, 0, buf);
  const std::int32_t D = heads.head_dim();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const double c0 = kvc_bench::thread_cpu_seconds();
    B acc[4] = {B(0.0f), B(0.0f), B(0.0f), B(0.0f)};  // independent chains: the adds never wait
    for (std::int32_t h = 0; h < heads.num_kv_heads(); ++h) {
      const auto& K = heads.keys(h);
      const auto& V = heads.values(h);
      const std::int32_t n = static_cast<std::int32_t>(K.extent(0));
      for (std::int32_t t0 = 0; t0 < n; t0 += page_size) {
        for (const auto* view : {&K, &V}) {
          const auto run = view->run(t0, 0);
          const T* row = view->data_handle() + run.offset;
          for (std::int32_t i = 0; i < run.length; ++i, row += run.token_stride)
          {
            std::size_t e = 0;
            for (; e + 4 * W <= static_cast<std::size_t>(D); e += 4 * W)
              for (std::size_t j = 0; j < 4; ++j) acc[j] += kvc::cpu::load_as_float<A>(row + e + j * W);
            for (; e + W <= static_cast<std::size_t>(D); e += W) acc[0] += kvc::cpu::load_as_float<A>(row + e);
          }
        }
      }
    }
    benchmark::DoNotOptimize(acc[0] + acc[1] + acc[2] + acc[3]);
    t.push_back(kvc_bench::thread_cpu_seconds() - c0);
  }
  return kvc_bench::median(t);
}

/// Roofline of one decode step (one layer, one sequence, ctx tokens):
///   FMAs  = 2 * G * D per token and kv head (q.k, then p.v; G = q_heads / kv_heads)
///         = 2 * G * D * ctx * kv_heads
///   bytes = 2 * ctx * kv_heads * D * sizeof(T)   (K and V, every token read once)
///   bound = max(bytes / read_bw, FMAs / fma_rate);  roof_ratio = bound / measured time.
/// At 32k tokens, 32/8/128, fp16: G = 4, FMAs = 2 * 4 * 128 * 32768 * 8 = 268,435,456 and
/// bytes = 2 * 32768 * 8 * 128 * 2 = 134,217,728 (128 MiB, 4x the L3). On the Zen 4 VM of
/// bench/results/decode.md (16 lane FMAs per cycle, two 8-wide pipes or one 16-wide, ~3.6 GHz:
/// 57.5 GFMA/s measured; one-thread reads 28 GB/s), the FMA bound is 2.68e8 / 5.75e10 = 4.7 ms
/// (64 cycles per token and kv head) and the bandwidth bound 1.34e8 / 2.8e10 = 4.8 ms: about equal,
/// so roof_ratio >= 0.8 needs the kernel within ~6 ms. The softmax (one exp per score, G per token and kv head) and the
/// fp16 -> fp32 conversions are not in the bound: they are what the kernel spends above it.
///
/// The roof is measured twice: once at process start (7 passes each, into the JSON context, and the
/// base of bw_ratio), and again right after each timed loop (3 passes each, ~0.2 s, untimed), and
/// the bounds and roof_ratio use the second, so that a machine shared with other jobs loads the
/// roof and the kernel alike (read_GBps and fma_G are that paired measurement).
template <class T>
void bm_decode(benchmark::State& state, shape s, std::int32_t ctx, kvc::thread_pool* pool, roof base) {
  auto& d = data_for<decode_data<T>>(std::string(dtype_name<T>()) + "/" + std::to_string(s.q_heads) + "x" +
                                         std::to_string(s.kv_heads) + "x" + std::to_string(s.head_dim) + "/" +
                                         std::to_string(ctx),
                                     s, ctx);
  kvc::decode_options opt;
  opt.pool = pool;
  const double c0 = kvc_bench::thread_cpu_seconds();
  for (auto _ : state) {
    kvc::cpu::decode_attention(d.cache, d.seq, 0, d.q.data(), s.q_heads, d.out.data(), opt);
    benchmark::DoNotOptimize(d.out.data());
    benchmark::ClobberMemory();
  }
  const double cpu_per_step = (kvc_bench::thread_cpu_seconds() - c0) / static_cast<double>(state.iterations());
  const double bytes = 2.0 * s.kv_heads * ctx * s.head_dim * sizeof(T);  // K and V, every token once
  const double group = static_cast<double>(s.q_heads) / s.kv_heads;
  const double fmas = 2.0 * group * s.head_dim * ctx * s.kv_heads;
  const roof now = measure_roof(pool, 3, false);
  const double bw_bound = bytes / now.bw, fma_bound = fmas / now.fma;
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
  state.counters["bw_ratio"] = benchmark::Counter(bytes / base.bw, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["ws_over_l3"] = bytes / l3_bytes();
  state.counters["bw_bound_ms"] = bw_bound * 1e3;
  state.counters["fma_bound_ms"] = fma_bound * 1e3;
  state.counters["read_GBps"] = now.bw / 1e9;
  state.counters["fma_G"] = now.fma / 1e9;
  state.counters["roof_ratio"] =
      benchmark::Counter(std::max(bw_bound, fma_bound), benchmark::Counter::kIsIterationInvariantRate);
  if (!pool) {  // one thread: CPU time is the thread's whole work, so a CPU-time roof is defined
    state.counters["roof_ratio_cpu"] = std::max(bytes / now.bw_cpu, fmas / now.fma_cpu) / cpu_per_step;
    const double pages = page_stream_seconds(d, 3);
    state.counters["pages_ms"] = pages * 1e3;
    state.counters["pages_ratio"] = pages / cpu_per_step;
  }
}

void bm_read(benchmark::State& state, kvc::thread_pool* pool, roof base) {
  // The baseline's own buffer and loop (same allocation, alignment and huge-page advice).
  std::size_t floats = 0;
  for (auto _ : state) floats = g_probe->pass(pool);
  const double bytes = static_cast<double>(floats) * sizeof(float);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
  state.counters["bw_ratio"] = benchmark::Counter(bytes / base.bw, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["ws_over_l3"] = bytes / l3_bytes();
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  const std::int32_t all = std::max<std::int32_t>(1, static_cast<std::int32_t>(std::thread::hardware_concurrency()));
  static kvc::thread_pool pool(all);
  std::vector<std::int32_t> thread_counts{1};
  if (all > 1) thread_counts.push_back(all);
  static kvc_bench::read_probe probe(read_bytes);
  g_probe = &probe;
  std::vector<roof> base(static_cast<std::size_t>(all) + 1);
  benchmark::AddCustomContext("simd_arch", std::string(kvc::cpu::default_arch::name()) + ", " +
                                               std::to_string(kvc::cpu::fbatch<kvc::cpu::default_arch>::size) +
                                               " floats per batch");
  for (std::int32_t t : thread_counts) {
    roof& r = base[static_cast<std::size_t>(t)];
    r = measure_roof(t > 1 ? &pool : nullptr, 7, true);
    char v[64];
    std::snprintf(v, sizeof v, "%.2f GB/s", r.bw / 1e9);
    benchmark::AddCustomContext("read_bw/threads:" + std::to_string(t), v);
    std::snprintf(v, sizeof v, "%.2f GFMA/s", r.fma / 1e9);
    benchmark::AddCustomContext("fma_rate/threads:" + std::to_string(t), v);
    if (t == 1) {  // per CPU second of the thread: what roof_ratio_cpu divides by
      std::snprintf(v, sizeof v, "%.2f GB/s, %.2f GFMA/s", r.bw_cpu / 1e9, r.fma_cpu / 1e9);
      benchmark::AddCustomContext("per_cpu_second/threads:1", v);
    }
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
