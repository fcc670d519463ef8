// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Shared helpers of kvc's benchmarks: deterministic random data and the memory-read baseline
/// that bandwidth-bound kernels report against (`bw_ratio` = achieved bytes/s over this).

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <new>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <benchmark/benchmark.h>

#include <kvc/store/page_pool.hpp>
#include <kvc/cpu/simd.hpp>
#include <kvc/parallel/thread_pool.hpp>

namespace kvc_bench {

/// xorshift64*: cheap, deterministic, good enough for benchmark data.
class rng {
 public:
  explicit rng(std::uint64_t seed) noexcept : s_(seed * 0x9E3779B97F4A7C15ull + 1) {}
  std::uint64_t next() noexcept {
    s_ ^= s_ >> 12;
    s_ ^= s_ << 25;
    s_ ^= s_ >> 27;
    return s_ * 0x2545F4914F6CDD1Dull;
  }
  /// Uniform in [-1, 1).
  float uniform() noexcept { return static_cast<float>(static_cast<std::int64_t>(next() >> 40) - (1 << 23)) * (1.0f / (1 << 23)); }
  void fill(float* p, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) p[i] = uniform();
  }

 private:
  std::uint64_t s_;
};

/// CPU seconds of the calling thread (CLOCK_THREAD_CPUTIME_ID): time the thread ran, not time
/// other jobs held the core. Meaningful for one-thread measurements only.
inline double thread_cpu_seconds() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

/// The calling thread's CPU seconds of one call of f; `out` (the call's output) is kept from the
/// optimiser.
template <class F>
double cpu_seconds_of(F&& f, const float* out) {
  const double c0 = thread_cpu_seconds();
  f();
  benchmark::DoNotOptimize(out);
  return thread_cpu_seconds() - c0;
}

/// Median of v (the upper one of an even count).
inline double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
  return v[v.size() / 2];
}

/// A decode benchmark's attention shape.
struct shape {
  std::int32_t q_heads, kv_heads, head_dim;
};

/// n floats uniform in [-2, 2): the K, V and query rows of the decode benchmarks.
inline std::vector<float> random_rows(std::size_t n, std::uint64_t seed) {
  rng r(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = 2.0f * r.uniform();
  return v;
}

/// Appends ctx tokens of random_rows K/V ([n][kv_heads][head_dim]) to layer 0 of seq in chunks of
/// `chunk` tokens, seeds 1 + t0 and 2 + t0 for the chunk at t0: the same rows in every benchmark
/// that compares caches (any cache with append(seq, layer, k, v, n)).
template <class Cache, class Seq>
void append_random(Cache& c, Seq seq, const shape& s, std::int32_t ctx, std::int32_t chunk = 1024) {
  for (std::int32_t t0 = 0; t0 < ctx; t0 += chunk) {
    const std::int32_t n = std::min(chunk, ctx - t0);
    const auto k = random_rows(std::size_t(n) * s.kv_heads * s.head_dim, 1 + t0);
    const auto v = random_rows(k.size(), 2 + t0);
    c.append(seq, 0, k.data(), v.data(), n);
  }
}

struct free_deleter {
  void operator()(void* p) const noexcept { std::free(p); }
};

/// Sum of n floats (n a multiple of 64) with 8 independent SIMD accumulators: a load-only
/// stream whose speed is the memory system's, not the adder's.
inline float simd_sum(const float* p, std::size_t n) noexcept {
  using B = kvc::cpu::fbatch<kvc::cpu::default_arch>;
  constexpr std::size_t W = B::size;
  B a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f), a4(0.0f), a5(0.0f), a6(0.0f), a7(0.0f);
  for (std::size_t i = 0; i + 8 * W <= n; i += 8 * W) {
    a0 += B::load_aligned(p + i + 0 * W);
    a1 += B::load_aligned(p + i + 1 * W);
    a2 += B::load_aligned(p + i + 2 * W);
    a3 += B::load_aligned(p + i + 3 * W);
    a4 += B::load_aligned(p + i + 4 * W);
    a5 += B::load_aligned(p + i + 5 * W);
    a6 += B::load_aligned(p + i + 6 * W);
    a7 += B::load_aligned(p + i + 7 * W);
  }
  return kvc::cpu::reduce_add<kvc::cpu::default_arch>(((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)));
}

/// n floats allocated the way kvc::page_pool allocates its arena (2 MiB aligned, huge pages
/// advised), so a read baseline and the cache pay the same TLB costs; filled with small values.
inline std::unique_ptr<float, free_deleter> arena_like_buffer(std::size_t n) {
  const std::size_t huge = kvc::page_pool::huge_page;
  const std::size_t reserved = (n * sizeof(float) + huge - 1) / huge * huge;
  std::unique_ptr<float, free_deleter> buf(static_cast<float*>(std::aligned_alloc(huge, reserved)));
  if (!buf) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  (void)::madvise(buf.get(), reserved, MADV_HUGEPAGE);
#endif
  for (std::size_t i = 0; i < n; ++i) buf.get()[i] = static_cast<float>(i & 1023) * 0.001f;
  return buf;
}

/// A buffer of about `bytes` (choose it much larger than the LLC) and the read bandwidth of
/// summing it: `threads` threads (the pool's, or the caller alone when pool is null) sum disjoint
/// slices. Kept alive so that a benchmark can re-measure next to its own timing.
class read_probe {
 public:
  explicit read_probe(std::size_t bytes) : n_(bytes / sizeof(float) / 1024 * 1024), buf_(arena_like_buffer(n_)) {}
  const float* data() const noexcept { return buf_.get(); }
  std::size_t size() const noexcept { return n_; }
  /// One pass: sums the buffer, returns the floats summed (n rounded down to whole slices).
  std::size_t pass(kvc::thread_pool* pool) {
    const std::int32_t threads = pool ? pool->size() : 1;
    const std::size_t slice = n_ / static_cast<std::size_t>(threads) / 64 * 64;
    std::vector<float> sink(static_cast<std::size_t>(threads));
    auto one = [&](std::int32_t t) { sink[static_cast<std::size_t>(t)] += simd_sum(buf_.get() + t * slice, slice); };
    if (pool && threads > 1) pool->parallel_for(threads, one);
    else one(0);
    keep_ += sink[0];
    return slice * static_cast<std::size_t>(threads);
  }
  /// Bytes/s of wall-clock time: the median of `reps` timed passes (after one untimed pass when
  /// warm). With cpu_rate, also the median bytes per CPU second of the calling thread.
  double bandwidth(kvc::thread_pool* pool, int reps = 7, bool warm = true, double* cpu_rate = nullptr) {
    if (warm) pass(pool);
    std::vector<double> bw, bw_cpu;
    for (int r = 0; r < reps; ++r) {
      const double c0 = thread_cpu_seconds();
      const auto t0 = std::chrono::steady_clock::now();
      const std::size_t n = pass(pool);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double c = thread_cpu_seconds() - c0;
      bw.push_back(static_cast<double>(n * sizeof(float)) / s);
      bw_cpu.push_back(static_cast<double>(n * sizeof(float)) / c);
    }
    if (cpu_rate) *cpu_rate = median(bw_cpu);
    return median(bw);
  }

 private:
  std::size_t n_;
  std::unique_ptr<float, free_deleter> buf_;
  volatile float keep_ = 0;
};

/// Read bandwidth in bytes/s of `threads` threads (the pool's, or the caller alone when pool is
/// null) summing disjoint slices of a buffer of `bytes` (choose it much larger than the LLC):
/// the median of `reps` timed passes after one untimed pass.
inline double read_bandwidth(std::size_t bytes, kvc::thread_pool* pool, int reps = 7) {
  read_probe p(bytes);
  return p.bandwidth(pool, reps);
}

/// `iters` rounds of 12 independent vector FMAs (a = a * x + y) on register-resident
/// accumulators of kvc::cpu::default_arch's float batch, the widest the decode kernels use. Twelve
/// chains cover the FMA latency times the issue rate of current x86 cores (8 in flight: 4 cycles x
/// 2 FMAs per cycle on Haswell-to-Skylake and on Zen 4 with 256-bit vectors; Zen 4 issues one
/// 512-bit FMA per cycle). x < 1 and y small keep the values near y / (1 - x): no
/// overflow, no denormals. Returns a sum so the work is live.
inline float fma_loop(std::int64_t iters, float x, float y) noexcept {
  using B = kvc::cpu::fbatch<kvc::cpu::default_arch>;
  const B bx(x), by(y);
  B a0(0.0f), a1(0.1f), a2(0.2f), a3(0.3f), a4(0.4f), a5(0.5f), a6(0.6f), a7(0.7f), a8(0.8f), a9(0.9f),
      a10(1.0f), a11(1.1f);
  for (std::int64_t i = 0; i < iters; ++i) {
    a0 = xsimd::fma(a0, bx, by);
    a1 = xsimd::fma(a1, bx, by);
    a2 = xsimd::fma(a2, bx, by);
    a3 = xsimd::fma(a3, bx, by);
    a4 = xsimd::fma(a4, bx, by);
    a5 = xsimd::fma(a5, bx, by);
    a6 = xsimd::fma(a6, bx, by);
    a7 = xsimd::fma(a7, bx, by);
    a8 = xsimd::fma(a8, bx, by);
    a9 = xsimd::fma(a9, bx, by);
    a10 = xsimd::fma(a10, bx, by);
    a11 = xsimd::fma(a11, bx, by);
  }
  return kvc::cpu::reduce_add<kvc::cpu::default_arch>(((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) +
                                                      ((a8 + a9) + (a10 + a11)));
}

/// Peak FMA rate in scalar (lane) FMAs per second of `threads` threads (the pool's, or the caller
/// alone when pool is null), each running fma_loop: the median of `reps` timed passes after one
/// untimed pass. One FMA of the decode arithmetic (q.k or p.v, one channel of one head) is one
/// lane FMA here, so FMAs / this rate is the time the arithmetic alone needs.
/// With cpu_rate, also the median lane FMAs per CPU second of the calling thread.
inline double fma_rate(kvc::thread_pool* pool, int reps = 7, std::int64_t iters = std::int64_t{1} << 23,
                       double* cpu_rate = nullptr) {
  const std::int32_t threads = pool ? pool->size() : 1;
  constexpr double lanes = static_cast<double>(kvc::cpu::fbatch<kvc::cpu::default_arch>::size);
  // x and y through volatiles: the compiler cannot fold the loop to its closed form.
  volatile float vx = 0.999999f, vy = 1e-6f;
  const float x = vx, y = vy;
  std::vector<float> sink(static_cast<std::size_t>(threads));
  auto pass = [&] {
    auto one = [&](std::int32_t t) { sink[static_cast<std::size_t>(t)] += fma_loop(iters, x, y); };
    if (pool && threads > 1) pool->parallel_for(threads, one);
    else one(0);
  };
  pass();
  std::vector<double> rate, rate_cpu;
  for (int r = 0; r < reps; ++r) {
    const double c0 = thread_cpu_seconds();
    const auto t0 = std::chrono::steady_clock::now();
    pass();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double c = thread_cpu_seconds() - c0;
    rate.push_back(static_cast<double>(iters) * 12.0 * lanes * threads / s);
    rate_cpu.push_back(static_cast<double>(iters) * 12.0 * lanes * threads / c);
  }
  volatile float keep = sink[0];
  (void)keep;
  if (cpu_rate) *cpu_rate = median(rate_cpu);
  return median(rate);
}

}  // namespace kvc_bench
