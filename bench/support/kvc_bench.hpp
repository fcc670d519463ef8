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
#include <memory>
#include <new>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

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

/// Read bandwidth in bytes/s of `threads` threads (the pool's, or the caller alone when pool is
/// null) summing disjoint slices of a buffer of `bytes` (choose it much larger than the LLC):
/// the median of `reps` timed passes after one untimed pass.
inline double read_bandwidth(std::size_t bytes, kvc::thread_pool* pool, int reps = 7) {
  const std::int32_t threads = pool ? pool->size() : 1;
  const std::size_t n = bytes / sizeof(float) / (64 * static_cast<std::size_t>(threads)) * 64 * threads;
  // Allocated the way kvc::page_pool allocates its arena (2 MiB aligned, huge pages advised), so
  // the baseline and the cache pay the same TLB costs.
  const std::size_t huge = kvc::page_pool::huge_page;
  const std::size_t reserved = (n * sizeof(float) + huge - 1) / huge * huge;
  std::unique_ptr<float, free_deleter> buf(static_cast<float*>(std::aligned_alloc(huge, reserved)));
  if (!buf) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  (void)::madvise(buf.get(), reserved, MADV_HUGEPAGE);
#endif
  for (std::size_t i = 0; i < n; ++i) buf.get()[i] = static_cast<float>(i & 1023) * 0.001f;
  const std::size_t slice = n / static_cast<std::size_t>(threads);
  std::vector<float> sink(static_cast<std::size_t>(threads));
  auto pass = [&] {
    auto one = [&](std::int32_t t) { sink[static_cast<std::size_t>(t)] += simd_sum(buf.get() + t * slice, slice); };
    if (pool && threads > 1) pool->parallel_for(threads, one);
    else one(0);
  };
  pass();
  std::vector<double> bw;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    pass();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    bw.push_back(static_cast<double>(n * sizeof(float)) / s);
  }
  volatile float keep = sink[0];
  (void)keep;
  std::nth_element(bw.begin(), bw.begin() + static_cast<std::ptrdiff_t>(bw.size() / 2), bw.end());
  return bw[bw.size() / 2];
}

}  // namespace kvc_bench
